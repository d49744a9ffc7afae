"""AKS identity-binding token proxy stand-in: what AZURE_KUBERNETES_TOKEN_PROXY points at.

With identity bindings, the pod does not call Entra ID itself: azure-identity's
`WorkloadIdentityCredential(enable_azure_proxy=True)` sends the same token request (POST
/{tenant}/oauth2/v2.0/token with the service-account token as client assertion) to the cluster's token proxy, over
HTTPS with the TLS server name AZURE_KUBERNETES_SNI_NAME and the CA of AZURE_KUBERNETES_CA_FILE (or _CA_DATA), and
the proxy exchanges it with Entra ID for the identity the binding names.

This stand-in does what a client can observe of that: it refuses a TLS handshake whose SNI is not the configured
name (the real proxy's certificate is issued for that name only, not for its address), and forwards the token
request to the emulator's Entra stand-in, answering with its answer. It counts what it saw, so a test can prove
the token came through it. The caller brings the server certificate (for `sni_name`) and the CA clients trust.
"""

from __future__ import annotations

import ssl
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

TOKEN_PATH = "/{tenant}/oauth2/v2.0/token"


class TokenProxyStandIn:
    """One token proxy: the SNI name it answers to, and where it forwards token requests (the Entra stand-in)."""

    def __init__(self, *, sni_name: str, entra_url: str, entra_ca_file: str | Path | None = None) -> None:
        self.sni_name = sni_name
        self.entra_url = entra_url.rstrip("/")
        self._entra_ca_file = str(entra_ca_file) if entra_ca_file is not None else None
        self.sni_seen: Counter[str | None] = Counter()  # every handshake's server name, refused ones included
        self.token_calls: Counter[str] = Counter()  # forwarded token requests, by client_id
        self.paths: list[str] = []
        self._client: aiohttp.ClientSession | None = None

    def server_context(self, cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
        """A TLS server context that records the client's SNI and refuses any other name than `sni_name`."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert_file), str(key_file))

        def check_sni(_conn: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> int | None:
            self.sni_seen[name] += 1
            return None if name == self.sni_name else ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

        context.sni_callback = check_sni
        return context

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(TOKEN_PATH, self._token)
        app.on_cleanup.append(self._close)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        body = await request.read()
        form = await request.post()
        client_id = form.get("client_id")
        self.token_calls[client_id if isinstance(client_id, str) else ""] += 1
        self.paths.append(request.path)
        headers = {"Content-Type": request.headers.get("Content-Type", "application/x-www-form-urlencoded")}
        async with self._session().post(self.entra_url + request.path, data=body, headers=headers) as answer:
            payload = await answer.read()
            content_type = answer.headers.get("Content-Type", "application/json")
            return web.Response(status=answer.status, body=payload, headers={"Content-Type": content_type})

    def _session(self) -> aiohttp.ClientSession:
        if self._client is None:
            trust = ssl.create_default_context(cafile=self._entra_ca_file) if self._entra_ca_file else True
            self._client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust))
        return self._client

    async def _close(self, _app: web.Application) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
