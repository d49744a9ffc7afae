"""Signing and checking the emulator's JWTs: one RSA key per issuer, RS256, checked against the emulator's clock.

Three issuers use this: the Entra ID stand-in (access tokens), the "Kubernetes service-account issuer" (workload
identity assertions) and AML (scoring tokens). Their keys are made on first use, because an RSA key takes a
noticeable moment and most emulator runs need only one of them, or none.

Expiry is never left to pyjwt: it reads the real clock, while the emulator may run its clock ahead or behind
(`EmulatorState.now()`), so `SigningKey.decode` takes `now` and checks `exp` and `nbf` itself.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection, Mapping
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ALGORITHM = "RS256"
RSA_KEY_BITS = 2048

# The audiences Azure Resource Manager accepts; azureml-core asks for the first form with its trailing slash.
ARM_AUDIENCES = frozenset(
    {
        "https://management.azure.com",
        "https://management.azure.com/",
        "https://management.core.windows.net",
        "https://management.core.windows.net/",
    }
)
# What a managed online endpoint with auth_mode aad_token accepts.
ML_AUDIENCES = frozenset({"https://ml.azure.com", "https://ml.azure.com/"})
# What Azure OpenAI's data plane accepts: Cognitive Services, and on a Foundry resource its own audience too
# (scopes https://cognitiveservices.azure.com/.default and https://ai.azure.com/.default).
OPENAI_AUDIENCES = frozenset(
    {
        "https://cognitiveservices.azure.com",
        "https://cognitiveservices.azure.com/",
        "https://ai.azure.com",
        "https://ai.azure.com/",
    }
)
# The audience Entra ID requires in a federated (workload identity) client assertion.
WORKLOAD_IDENTITY_AUDIENCE = "api://AzureADTokenExchange"
DEFAULT_SCOPE_SUFFIX = "/.default"

Rejection = Literal["invalid", "audience", "expired", "not_yet_valid"]


class TokenRejected(Exception):
    """A presented JWT is not acceptable; `reason` says why, without quoting the token."""

    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(detail)
        self.reason: Rejection = reason
        self.detail = detail


def scope_to_audience(scope: str) -> str | None:
    """The resource a client-credentials scope names (`<resource>/.default`), or None when it is not such a scope.

    Only the suffix is cut: `https://management.core.windows.net//.default` names `https://management.core.windows.net/`.
    """
    if not scope.endswith(DEFAULT_SCOPE_SUFFIX):
        return None
    resource = scope[: -len(DEFAULT_SCOPE_SUFFIX)]
    return resource or None


def aml_audience(api: str, service: str) -> str:
    """The `aud` of an AML scoring token for one service."""
    return f"aml:{api}:{service}"


def token_digest(token: str) -> str:
    """SHA-256 hex of a token: safe to keep, compare and log instead of the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


class SigningKey:
    """An RS256 key pair for one issuer, generated on first use; `kid` names it in JWT headers and the JWKS."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.kid = f"{name}-{secrets.token_hex(8)}"
        self._private: rsa.RSAPrivateKey | None = None

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        if self._private is None:
            self._private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        return self._private

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self.private_key, algorithm=ALGORITHM, headers={"kid": self.kid})

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWK, the way Entra's discovery keys list it."""
        jwk: dict[str, Any] = dict(RSAAlgorithm.to_jwk(self.public_key, as_dict=True))
        jwk.update({"kid": self.kid, "use": "sig", "alg": ALGORITHM})
        return jwk

    def decode(self, token: str, *, audiences: Collection[str], now: float) -> dict[str, Any]:
        """The claims of `token` if it is signed by this key, for one of `audiences`, and valid at `now`."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.public_key,
                algorithms=[ALGORITHM],
                audience=list(audiences),
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["aud", "exp", "nbf", "iat"],
                },
            )
        except jwt.InvalidAudienceError as exc:
            raise TokenRejected("audience", "the token is for another audience") from exc
        except jwt.InvalidTokenError as exc:
            raise TokenRejected("invalid", "the token is malformed or not signed by the expected issuer") from exc
        exp, nbf = claims["exp"], claims["nbf"]
        if not _is_number(exp) or not _is_number(nbf):
            raise TokenRejected("invalid", "the token's exp and nbf must be numbers")
        if now >= exp:
            raise TokenRejected("expired", "the token has expired")
        if now < nbf:
            raise TokenRejected("not_yet_valid", "the token is not valid yet")
        return claims


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class SigningKeys:
    """The emulator's issuers."""

    def __init__(self) -> None:
        self.entra = SigningKey("entra")
        self.service_account = SigningKey("sa")
        self.aml = SigningKey("aml")
