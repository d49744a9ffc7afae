"""Weakenings that the secrets-at-DEBUG tests must catch (run by `make mutants`)."""

from tests.mutation import Mutant

_T = "tests/abuse/test_secrets_debug.py::"
_ALL_PATHS = (_T + "test_no_secret_anywhere_with_everything_at_debug_and_every_error_path",)

MUTANTS = [
    Mutant(
        name="the credential's repr shows its value",
        path="proxy/credentials/base.py",
        old='        return f"Credential(header={self.header!r}, label={self.label!r})"',
        new='        return f"Credential(header={self.header!r}, value={self.value!r})"',
        tests=(_T + "test_credential_and_token_reprs_never_show_the_value",),
    ),
    Mutant(
        name="the failover log line names the key it switched to",
        path="proxy/credentials/keys.py",
        old="report_failover(route=self._route, to=other, metrics=self._metrics, events=self._events)",
        new="report_failover(route=self._route, to=cred.value, metrics=self._metrics, events=self._events)",
        tests=_ALL_PATHS,
    ),
    Mutant(
        name="the parser's message (with the caller's header) in the error body and log",
        path="proxy/server.py",
        old='            raise Refused(431, "header field too large")',
        new='            raise Refused(431, "header field too large: " + value.decode("latin-1")[:300])',
        tests=_ALL_PATHS,
    ),
    Mutant(
        name="a bad key file's content in the error",
        path="proxy/credentials/files.py",
        old='        raise SecretFileError("contains control characters")',
        new='        raise SecretFileError(f"contains control characters: {key}")',
        tests=_ALL_PATHS,
    ),
]
