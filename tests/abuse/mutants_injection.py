"""Weakenings that the header-injection tests must catch (run by `make mutants`)."""

from tests.mutation import Mutant

MUTANTS = [
    Mutant(
        name="a fetched token with CR/LF is installed",
        path="proxy/refresher.py",
        old="        if not all(_header_safe(v) for v in (token.value, token.secondary) if v is not None):",
        new="        if False:",
        tests=("tests/test_refresher.py::test_a_credential_that_would_inject_a_header_is_refused_and_never_installed",),
    ),
    Mutant(
        name="a key file with control characters is used",
        path="proxy/credentials/files.py",
        old="    if not key.isprintable():",
        new="    if False:",
        tests=("tests/abuse/test_header_injection.py",),
    ),
    Mutant(
        name="a key file's trailing newline is sent",
        path="proxy/credentials/files.py",
        old='.encode("ascii").decode("ascii")).strip()',
        new='.encode("ascii").decode("ascii")).lstrip()',
        tests=("tests/abuse/test_header_injection.py",),
    ),
    Mutant(
        name="config strings may hold CR, LF or NUL",
        path="proxy/config/reader.py",
        old=r'        if any(ch in value for ch in "\r\n\x00"):',
        new="        if False:",
        tests=("tests/abuse/test_header_injection.py",),
    ),
]
