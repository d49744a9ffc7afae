"""Cross-field checks of one route (the schema checks each key alone): names, URLs, the credential header and
template, which keys go together, and the share timing rule. Each problem names its key."""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any

from yarl import URL

from proxy.config.settings import (
    AML_KEYS,
    AZURE_PROXY_MIN_IDENTITY,
    IDENTITY_TYPES,
    KEY_FILE,
    SHARED_TYPES,
    placeholder_for,
)

_SECRET_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_FORBIDDEN_INJECT_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "x-request-id",
        "x-ms-client-request-id",
    }
)


class Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.lines.append(f"{where}: {message}")


def fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_route(values: dict[str, Any], where: str, problems: Problems) -> URL | None:
    """Cross-field checks of one route; returns the parsed upstream URL."""
    name = values["name"]
    if isinstance(name, str) and not _NAME_RE.match(name):
        problems.add(f"{where}name", f"{fmt(name)} is not allowed; use a-z, 0-9, '_' and '-', at most 63")
    url: URL | None = None
    upstream = values["upstream"]
    if isinstance(upstream, str):
        try:
            url = URL(upstream)
        except (ValueError, TypeError):
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            problems.add(f"{where}upstream", f"{fmt(upstream)} is not allowed; expected an http(s) URL")
            url = None
        elif url.user or url.password or url.query_string or url.fragment:
            problems.add(
                f"{where}upstream",
                f"{fmt(upstream)} is not allowed; no credentials, query or fragment in the URL",
            )
            url = None
    match = values["match"]
    if isinstance(match, str) and (not match.startswith("/") or "?" in match or "/../" in match + "/"):
        problems.add(f"{where}match", f"{fmt(match)} is not allowed; expected a path prefix starting with /")
    header = values["auth.header"]
    if isinstance(header, str):
        if not _TOKEN_RE.match(header):
            problems.add(f"{where}auth.header", f"{fmt(header)} is not allowed; expected an HTTP header name")
        elif header.lower() in _FORBIDDEN_INJECT_HEADERS or header.lower().startswith("proxy-"):
            problems.add(f"{where}auth.header", f"{fmt(header)} is not allowed; it is a framing or reserved header")
    auth_type = values["auth.type"]
    placeholder = placeholder_for(auth_type if isinstance(auth_type, str) else KEY_FILE)
    template = values["auth.template"]
    if isinstance(template, str):
        rest = template.replace(placeholder, "", 1)
        if placeholder not in template or "{" in rest or "}" in rest:
            problems.add(
                f"{where}auth.template",
                f"{fmt(template)} is not allowed; it must contain {placeholder} exactly once and no other braces",
            )
        elif not template.isprintable():
            problems.add(f"{where}auth.template", f"{fmt(template)} is not allowed; control characters")
    if auth_type == AML_KEYS and (values["auth.service"] is None) == (values["auth.endpoint"] is None):
        problems.add(f"{where}auth.service", "aml-keys needs exactly one of auth.service (v1) or auth.endpoint (v2)")
    if auth_type == AML_KEYS and values["auth.service"] and not values["auth.mms_url"]:
        problems.add(f"{where}auth.mms_url", f"is required with auth.type {auth_type!r} and auth.service (v1)")
    for key in ("auth.mms_url", "auth.arm_url", "auth.identity.authority_host"):
        _check_https(values.get(key), f"{where}{key}", problems)
    if isinstance(values.get("auth.url"), str):
        _check_http_url(values["auth.url"], f"{where}auth.url", problems)
    _check_secret_refs(values, where, problems)
    identity_type = values.get("auth.identity.type")
    if auth_type in IDENTITY_TYPES and identity_type == "client_secret":
        secret_ref = values.get("auth.identity.client_secret_ref.name")
        for key in ("auth.identity.client_secret_file", "auth.identity.tenant_id", "auth.identity.client_id"):
            if values.get(key) is None and not (key.endswith("_file") and secret_ref is not None):
                problems.add(f"{where}{key}", "is required with auth.identity.type 'client_secret'")
    if auth_type in IDENTITY_TYPES and values.get("auth.identity.azure_proxy") is True:
        _check_azure_proxy(identity_type, f"{where}auth.identity.azure_proxy", problems)
    if auth_type in SHARED_TYPES:
        _check_share(values, where, problems)
    return url


def installed_azure_identity() -> str | None:
    """The installed azure-identity's version, read from its package metadata (azure-identity is not imported:
    check-config stays light); None when it is not installed."""
    try:
        return importlib.metadata.version("azure-identity")
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string ("1.27.0b1" -> (1, 27, 0))."""
    numbers: list[int] = []
    for part in version.split(".")[:3]:
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits[0]))
        if digits[0] != part:
            break
    return tuple(numbers)


def _check_azure_proxy(identity_type: Any, where: str, problems: Problems) -> None:
    """auth.identity.azure_proxy: workload identity only, and an azure-identity that knows enable_azure_proxy
    (older ones take the keyword silently and would go to Entra ID directly, where an identity binding has no
    federated credential)."""
    if identity_type != "workload":
        problems.add(where, f"is used only with auth.identity.type 'workload' (not {identity_type!r})")
        return
    version = installed_azure_identity()
    needed = ".".join(map(str, AZURE_PROXY_MIN_IDENTITY))
    if version is None or _release(version) < AZURE_PROXY_MIN_IDENTITY:
        problems.add(
            where,
            f"true needs azure-identity >= {needed} (WorkloadIdentityCredential's enable_azure_proxy); installed: "
            f"{version or 'none'}; upgrade azure-identity or set it to false",
        )


def _check_share(values: dict[str, Any], where: str, problems: Problems) -> None:
    """share.*: Kubernetes names, and the timing rule that lets a new leader refresh before the refresh time."""
    lease, secret = values["share.lease"], values["share.secret"]
    lease_seconds, renew = values["share.lease_seconds"], values["share.renew_seconds"]
    if lease is None:
        if secret is not None:
            problems.add(f"{where}share.secret", "is only used with share.lease")
        return
    for key, name in (("share.lease", lease), ("share.secret", secret)):
        if isinstance(name, str) and not _DNS_SUBDOMAIN_RE.match(name):
            problems.add(
                f"{where}{key}", f"{fmt(name)} is not allowed; a Kubernetes name: a-z, 0-9, '-' and '.', at most 253"
            )
    if isinstance(lease, str) and secret is None and len(lease) > 247:
        problems.add(f"{where}share.lease", "is too long for the default share.secret <lease>-token; set share.secret")
    if not isinstance(lease_seconds, int) or not isinstance(renew, float):
        return
    if renew >= lease_seconds:
        problems.add(
            f"{where}share.renew_seconds",
            f"{renew:g} is not allowed; expected less than share.lease_seconds ({lease_seconds})",
        )
    margin = values["auth.refresh.margin_seconds"]
    if isinstance(margin, float) and lease_seconds + renew > margin:
        problems.add(
            f"{where}share.lease_seconds",
            f"{lease_seconds} + share.renew_seconds {renew:g} is more than auth.refresh.margin_seconds ({margin:g}): "
            "a replica taking over from a dead leader would refresh after the token's refresh time; "
            "raise auth.refresh.margin_seconds to at least lease_seconds + renew_seconds",
        )


def _check_secret_refs(values: dict[str, Any], where: str, problems: Problems) -> None:
    """*_secret_ref: name and key together, valid Kubernetes names, and never beside the file they replace."""
    for ref in ("auth.primary_secret_ref", "auth.secondary_secret_ref", "auth.identity.client_secret_ref"):
        name, key = values.get(f"{ref}.name"), values.get(f"{ref}.key")
        if (name is None) != (key is None):
            missing, given = ("key", "name") if key is None else ("name", "key")
            problems.add(f"{where}{ref}.{missing}", f"is required with {ref}.{given}")
        if isinstance(name, str) and not _DNS_SUBDOMAIN_RE.match(name):
            problems.add(f"{where}{ref}.name", f"{fmt(name)} is not allowed; expected a Secret name (a-z 0-9 - .)")
        if isinstance(key, str) and not _SECRET_KEY_RE.match(key):
            problems.add(f"{where}{ref}.key", f"{fmt(key)} is not allowed; expected a Secret key (a-z A-Z 0-9 - . _)")
    pairs = (
        ("auth.primary_file", "auth.primary_secret_ref"),
        ("auth.secondary_file", "auth.secondary_secret_ref"),
        ("auth.identity.client_secret_file", "auth.identity.client_secret_ref"),
    )
    for file_key, ref in pairs:
        if values.get(file_key) is not None and values.get(f"{ref}.name") is not None:
            problems.add(f"{where}{ref}", f"set {file_key} or {ref}, not both")
    files = values.get("auth.primary_file") is not None or values.get("auth.secondary_file") is not None
    refs = any(values.get(f"auth.{slot}_secret_ref.name") is not None for slot in ("primary", "secondary"))
    if files and refs and not (values.get("auth.primary_file") and values.get("auth.primary_secret_ref.name")):
        problems.add(f"{where}auth", "a route reads its keys from files or from Secrets, not both")
    if values.get("auth.identity.client_secret_ref.name") is not None and values.get("auth.identity.type") not in (
        None,
        "client_secret",
    ):
        problems.add(f"{where}auth.identity.client_secret_ref", "is used only with auth.identity.type 'client_secret'")


def _check_https(value: Any, where: str, problems: Problems) -> None:
    if not isinstance(value, str):
        return
    url = _check_http_url(value, where, problems)
    if url is not None and url.scheme != "https":
        problems.add(where, f"{fmt(value)} is not allowed; expected an https URL (credentials travel on it)")


def _check_http_url(value: str, where: str, problems: Problems) -> URL | None:
    try:
        url = URL(value)
    except (ValueError, TypeError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
        problems.add(where, f"{fmt(value)} is not allowed; expected an http(s) URL without query")
        return None
    return url
