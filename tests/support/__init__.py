"""Helpers the tests share, imported as a library (conftest.py holds only fixtures and hooks)."""
