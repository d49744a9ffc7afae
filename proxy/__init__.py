"""aml-auth-proxy: a sidecar that injects Azure Machine Learning credentials into scoring calls."""

import os

__version__ = "0.1.0"

if os.environ.get("AML_AUTH_PROXY_PURE_PYTHON") == "1":
    from proxy._pure import prefer_sources

    prefer_sources()
