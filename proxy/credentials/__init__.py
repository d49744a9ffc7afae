"""How to get a credential: one module per kind, each behind the `CredentialProvider` protocol in base.py."""
