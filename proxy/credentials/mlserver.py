"""Machine Learning Server (operationalization) login: login, refresh-token rotation, revoke at shutdown.

Wire format: shared/docs/aml-protocol.md §6. A refresh returns a new access/refresh pair and invalidates the old
one, so the pair is replaced as a whole. A refresh refused with 401 (revoked or expired) falls back to a login.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from proxy.clock import Clock, SystemClock
from proxy.config.settings import MLSERVER, MlServerAuth
from proxy.credentials.files import SecretFileError, read_secret_file
from proxy.credentials.http import CredentialHttp, epoch, jwt_times, require
from proxy.credentials.tokens import NothingToWatch, PermanentError, Token, skew_corrected
from proxy.logs import REDACTOR


def _plus_one(iat: float | None) -> float | None:
    return None if iat is None else iat + 1.0  # whole seconds, truncated


class MlServerSource(NothingToWatch):
    auth_type = MLSERVER

    def __init__(self, *, auth: MlServerAuth, base_url: str, clock: Clock | None = None) -> None:
        self.auth = auth
        self.clock = clock or SystemClock()
        self.base = base_url.rstrip("/")
        self.http = CredentialHttp(what="ML Server login", ca_file=auth.ca_file, timeout=auth.refresh.timeout_seconds)

    def _credentials(self) -> dict[str, str]:
        try:
            username = read_secret_file(self.auth.username_file)
            password = read_secret_file(self.auth.password_file)
        except SecretFileError as exc:
            raise PermanentError(f"ML Server credential file: {exc}") from exc
        REDACTOR.add(password)
        return {"username": username, "password": password}

    async def fetch(self, previous: Token | None) -> Token:
        refresh_token = previous.state if previous is not None else None
        if isinstance(refresh_token, str):
            try:
                answer = await self.http.request(
                    "POST", self.base + "/login/refreshToken", json_body={"refreshToken": refresh_token}
                )
                return self._token(answer.body, answer.server_now)
            except PermanentError:
                pass  # the refresh token was revoked or expired: log in again
        answer = await self.http.request("POST", self.base + "/login", json_body=self._credentials())
        return self._token(answer.body, answer.server_now)

    def _token(self, body: dict[str, Any], server_now: float | None) -> Token:
        what = "ML Server login"
        require(body, what, "access_token", "refresh_token")
        access = str(body["access_token"])
        refresh = str(body["refresh_token"])
        REDACTOR.add(access, refresh, owner=f"mlserver:{id(self)}")
        local_now = self.clock.time()
        if body.get("expires_on") is not None:  # the swagger types it as a string; examples send numbers
            expires_at = skew_corrected(
                epoch(body, what, "expires_on"),
                server_now=server_now or _plus_one(jwt_times(access)[0]),
                local_now=local_now,
            )
        else:
            expires_at = local_now + epoch(body, what, "expires_in")
        return Token(value=access, expires_at=expires_at, refresh_at=None, state=refresh)

    async def revoke(self, token: Token) -> None:
        if isinstance(token.state, str):
            url = f"{self.base}/login/refreshToken?refreshToken={quote(token.state, safe='')}"
            await self.http.request("DELETE", url, expect_json=False)

    async def close(self) -> None:
        await self.http.close()
