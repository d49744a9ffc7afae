"""A JWT from a file that something else keeps fresh (a run token, a sidecar's output).

The expiry is the JWT `exp`, read with pyjwt without verifying the signature (the proxy does not hold the
issuer's key; the upstream verifies). The file is re-read when it changes and ahead of expiry; an expired token
with no newer one makes the route unready.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from proxy.config.settings import JWT_FILE, JwtFileAuth
from proxy.credentials.files import FileSignature, SecretFileError, file_signature, read_secret_file
from proxy.credentials.tokens import PermanentError, Token, TransientError, jwt_claims


class JwtFileSource:
    auth_type = JWT_FILE

    def __init__(self, *, auth: JwtFileAuth) -> None:
        self.path = auth.token_file
        self.poll_seconds = auth.reload_seconds
        self._signature: FileSignature | None = None

    async def fetch(self, previous: Token | None) -> Token:
        self._signature = file_signature(self.path)
        try:
            token = read_secret_file(self.path)
        except SecretFileError as exc:
            raise TransientError(f"token file: {exc}") from exc
        claims = jwt_claims(token)
        if claims is None:
            raise PermanentError("token file: not a JWT")
        exp = claims.get("exp")
        if not isinstance(exp, int | float):
            raise PermanentError("token file: the JWT has no numeric exp claim")
        return Token(value=token, expires_at=float(exp), refresh_at=None)

    async def watch(self, changed: Callable[[str], Awaitable[None]]) -> None:
        """Poll the file; a change (kubelet's symlink swap included) triggers a re-read at once."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            if file_signature(self.path) != self._signature:
                await changed("file_changed")

    async def revoke(self, token: Token) -> None:
        return None

    async def close(self) -> None:
        return None
