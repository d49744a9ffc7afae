"""Exceptions that subclass built-in exception types other than Exception.

They live here, in a module mypyc does not compile: a compiled class cannot inherit from most built-in types
(see setup.py and docs/performance.md, "Compiled with mypyc").
"""

from __future__ import annotations


class CallerGone(ConnectionResetError):
    """The caller closed its connection (or its sending side) before its request or answer was done."""
