# aml-auth-proxy: a sidecar that injects Azure Machine Learning credentials into scoring calls.
# Two stages: the wheel and a venv are built in the first; the second is a slim Python with only that venv.
# The first is the full Debian Python image because it has the C compiler that mypyc needs for the request
# path's modules (setup.py); both stages use the same Python version, so the compiled modules fit the second.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-bookworm AS build
# Fail the build rather than ship the slower pure-Python request path.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 AML_AUTH_PROXY_COMPILE=1
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY proxy/ proxy/
# The same two commands tests/test_image.py runs: build the wheel, install it (and only it) into a clean venv.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/aml-auth-proxy \
 && /opt/aml-auth-proxy/bin/pip install --no-cache-dir /wheels/aml_auth_proxy-*.whl \
 && /opt/aml-auth-proxy/bin/pip uninstall --yes pip setuptools \
 && /opt/aml-auth-proxy/bin/python -m compileall -q /opt/aml-auth-proxy/lib

FROM python:${PYTHON_VERSION}-slim-bookworm
LABEL org.opencontainers.image.title="aml-auth-proxy" \
      org.opencontainers.image.description="Sidecar reverse proxy that injects Azure ML credentials" \
      org.opencontainers.image.licenses="MIT"
# Read-only root filesystem: no bytecode writes, temp files only under /tmp (mount an emptyDir there).
ENV PATH=/opt/aml-auth-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
COPY --from=build /opt/aml-auth-proxy /opt/aml-auth-proxy
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["aml-auth-proxy"]
CMD ["run", "--config", "/etc/aml-auth-proxy/config.yaml"]
