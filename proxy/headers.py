"""Pure header functions: hop-by-hop stripping, credential injection, request ids. No I/O here."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from email.utils import formatdate
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 7.6.1 plus the de-facto ones. Proxy-* headers are dropped by prefix below.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        # The proxy answers 100-continue itself; forwarding it would stall the upstream exchange.
        "expect",
    }
)
RESPONSE_DROP: Final = frozenset(
    {"connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade"}
)

REQUEST_ID: Final = "x-request-id"
CLIENT_REQUEST_ID: Final = "x-ms-client-request-id"
DEPLOYMENT: Final = "azureml-model-deployment"
_REQUEST_ID_RE: Final = re.compile(r"^[!-~]{1,200}$")  # printable ASCII, no spaces, bounded


def connection_tokens(values: Iterable[str]) -> set[str]:
    """Header names listed in Connection headers; they are hop-by-hop for this hop only."""
    names: set[str] = set()
    for value in values:
        for token in value.split(","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return names


_ID_BYTES: Final = 16
_ID_BATCH: Final = 256  # ids per getrandom() call: one system call per request was a measurable cost
_random: Final = bytearray()


def _forget_random() -> None:
    _random.clear()  # a forked child must never hand out its parent's ids


os.register_at_fork(after_in_child=_forget_random)


def new_request_id() -> str:
    """32 random hex digits from the OS's CSPRNG, like uuid4().hex without building a UUID."""
    if not _random:
        _random[:] = os.urandom(_ID_BYTES * _ID_BATCH)
    rid = _random[-_ID_BYTES:].hex()
    del _random[-_ID_BYTES:]
    return rid


def request_id(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> str | None:
    """The caller's request id, a fresh one when absent, or None when the caller's is unusable."""
    rid = headers.get(CLIENT_REQUEST_ID) or headers.get(REQUEST_ID)
    if rid is None:
        return new_request_id()
    return rid if _REQUEST_ID_RE.match(rid) else None


def upstream_request_headers(
    incoming: CIMultiDict[str] | CIMultiDictProxy[str],
    *,
    credential: tuple[str, str] | None,
    keep_caller_credential: bool,
    rid: str,
    deployment: str | None,
) -> CIMultiDict[str]:
    """Headers to send upstream: caller's end-to-end headers, one credential, the request id."""
    drop = HOP_BY_HOP
    conn = incoming.getall("connection", ())
    if conn:
        drop = drop | connection_tokens(conn)
    cred_name = credential[0].lower() if credential else None
    caller_has_cred = cred_name is not None and cred_name in incoming
    keep_cred = keep_caller_credential and caller_has_cred
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lname = name.lower()
        if lname in drop or lname.startswith("proxy-"):
            continue
        if lname == "authorization" or lname == cred_name:
            # Callers never pass a credential through unless the route opted in.
            if not (keep_cred and lname == cred_name):
                continue
        elif lname in (REQUEST_ID, CLIENT_REQUEST_ID):
            continue
        elif deployment is not None and lname == DEPLOYMENT:
            continue
        out.add(name, value)
    if credential is not None and not keep_cred:
        out[credential[0]] = credential[1]
    if deployment is not None:
        out[DEPLOYMENT] = deployment
    out[CLIENT_REQUEST_ID] = rid
    out[REQUEST_ID] = rid
    return out


_date: Final = ["", -1]  # (formatted, second): formatting the date once a second, not once an answer


def http_date() -> str:
    """The current time as an HTTP Date value."""
    now = int(time.time())
    if _date[1] != now:
        _date[0] = formatdate(now, usegmt=True)
        _date[1] = now
    return str(_date[0])


def downstream_response_headers(upstream: Iterable[tuple[str, str]], *, rid: str) -> list[tuple[str, str]]:
    """Headers to return to the caller, in the upstream's order: its end-to-end headers plus our request id, and
    a Date when the upstream sent none (RFC 9110 6.6.1). A list of pairs, built in one pass."""
    out: list[tuple[str, str]] = []
    named: set[str] = set()
    dated = False
    for name, value in upstream:
        lname = name.lower()
        if lname == "date":
            dated = True
        if lname in RESPONSE_DROP:
            if lname == "connection":
                named |= connection_tokens((value,))
            continue
        if lname.startswith("proxy-") or lname == REQUEST_ID or lname == CLIENT_REQUEST_ID:
            continue
        out.append((name, value))
    named -= RESPONSE_DROP  # "Connection: keep-alive" names nothing new
    named.discard("content-length")  # the answer's framing, which the proxy passes on: never dropped by name
    if named:
        out = [(name, value) for name, value in out if name.lower() not in named]
    if not dated:
        out.append(("Date", http_date()))
    out.append((REQUEST_ID, rid))
    out.append((CLIENT_REQUEST_ID, rid))
    return out


def render_credential(template: str, secret: str, placeholder: str = "{key}") -> str:
    """The header value for `secret`: the template's first `placeholder` ({key} for key kinds, {token} for token
    kinds) replaced. Every credential kind renders its header here. `secret` must be free of control characters."""
    return template.replace(placeholder, secret, 1)
