"""aml-auth-proxy: a sidecar that injects Azure Machine Learning credentials into scoring calls."""

__version__ = "0.1.0"
