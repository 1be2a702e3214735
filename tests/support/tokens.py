"""Tokens for tests: `minted` (a real token from the test issuer) and `bearer` (it as
metadata) for every test; keys, a test policy and hand-crafted tokens for the
verification-related tests.

Tokens are built by hand (header and payload JSON signed with PyJWT's algorithm objects)
so tests can produce what PyJWT's own encoder refuses: duplicate JSON keys, `alg: none`,
non-string claims, a header that is not an object, and so on.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from typing import Any

from jwt.algorithms import get_default_algorithms

from authproxy.decide.pipeline import Authorizer
from authproxy.keys.issuer import TokenIssuer
from authproxy.keys.keygen import generate_private_key
from authproxy.keys.keyset import KeySet, VerificationKey, hmac_key, key_from_jwk, public_jwk
from authproxy.keys.verify import TokenVerifier
from authproxy.policy.loader import parse_policy
from authproxy.policy.model import Policy

#: A fixed "now" for every time-dependent test; move it with `Clock.advance`, never sleep.
NOW = 1_700_000_000
HMAC_SECRET = b"refresh-secret-0123456789abcdef-0123456789"  # 42 bytes: HS256 only
ISSUER = "auth-service"

POLICY_FILE = "verify-policy.yaml"
POLICY_YAML = """\
version: 1
default: deny
issuer: auth-service
leeway: 30s
tokens:
  2fa:     {type: 2fa_pending, audience: 2fa-verification}
  refresh: {type: refresh, audience: token-refresh, keys: [refresh-hmac]}
  access:  {type: access, audience: api-access}
methods:
  /api.v1.Auth/Login: public
  /api.v1.Auth/Verify2FA: 2fa
  /api.v1.Auth/Refresh: refresh
  /api.v1.User/Get: access
  /api.v1.User/Admin: {level: access, roles: [admin, ops]}
  /api.v1.User/Write: {level: access, permissions: [users.read, users.write]}
  /api.v1.User/Scoped: {level: access, scopes: [read, write]}
  /api.v1.User/Forward: {level: access, forward_token: true}
  /admin.v1.Ops/Shutdown: deny
"""

#: The method of the policy above for each level.
METHOD_FOR = {
    "public": "/api.v1.Auth/Login",
    "2fa": "/api.v1.Auth/Verify2FA",
    "refresh": "/api.v1.Auth/Refresh",
    "access": "/api.v1.User/Get",
}
TYPE_FOR = {"2fa": "2fa_pending", "refresh": "refresh", "access": "access"}
AUDIENCE_FOR = {"2fa": "2fa-verification", "refresh": "token-refresh", "access": "api-access"}


class Clock:
    """A settable clock for `TokenVerifier(clock=...)`."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def b64url(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, separators=(",", ":")).encode()


def sign_raw(header: Any, payload: Any, key: Any, alg: str) -> str:
    """A compact JWS of exactly these header/payload bytes (dicts are JSON-encoded)."""
    signing_input = f"{b64url(_json_bytes(header))}.{b64url(_json_bytes(payload))}"
    algorithm = get_default_algorithms()[alg]
    signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key))
    return f"{signing_input}.{b64url(signature)}"


def unsigned(header: Any, payload: Any, signature: bytes = b"") -> str:
    """A token with the given header/payload and an arbitrary (or empty) signature."""
    return f"{b64url(_json_bytes(header))}.{b64url(_json_bytes(payload))}.{b64url(signature)}"


@cache
def rsa_key() -> Any:
    return generate_private_key("RS256")


@cache
def ec_key() -> Any:
    return generate_private_key("ES256")


@cache
def other_ec_key() -> Any:
    return generate_private_key("ES256")


@cache
def ed_key() -> Any:
    return generate_private_key("EdDSA")


#: name -> (private key factory, alg, kid). "ec-other" claims the kid of "ec".
SIGNERS: dict[str, tuple[Any, str, str]] = {
    "ec": (ec_key, "ES256", "ec"),
    "rsa": (rsa_key, "RS256", "rsa"),
    "ed": (ed_key, "EdDSA", "ed"),
    "hmac": (lambda: HMAC_SECRET, "HS256", "refresh-hmac"),
    "ec-other": (other_ec_key, "ES256", "ec"),
}


def verification_key(private: Any, kid: str, source: str = "test-jwks") -> VerificationKey:
    jwk = {**public_jwk(private.public_key()), "kid": kid}
    key = key_from_jwk(jwk, source)
    assert key is not None
    return key


def keyset() -> KeySet:
    """The verification keys matching SIGNERS (except the impostor "ec-other")."""
    return KeySet(
        [
            verification_key(ec_key(), "ec"),
            verification_key(rsa_key(), "rsa"),
            verification_key(ed_key(), "ed"),
            hmac_key(HMAC_SECRET, "refresh-hmac", "$REFRESH_SECRET"),
        ]
    )


def policy(text: str = POLICY_YAML) -> Policy:
    return parse_policy(text, POLICY_FILE)


def claims(level: str = "access", **overrides: Any) -> dict[str, Any]:
    """Valid claims for `level` at NOW; an override of None removes that claim."""
    base: dict[str, Any] = {
        "sub": "alice",
        "type": TYPE_FOR[level],
        "aud": AUDIENCE_FOR[level],
        "iss": ISSUER,
        "iat": NOW,
        "exp": NOW + 600,
        "jti": "jti-1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(
    level: str = "access",
    signer: str | None = None,
    header: dict[str, Any] | None = None,
    **overrides: Any,
) -> str:
    """A correctly signed token for `level` (refresh tokens default to the HMAC key)."""
    name = signer or ("hmac" if level == "refresh" else "ec")
    factory, alg, kid = SIGNERS[name]
    hdr = {"alg": alg, "typ": "JWT", "kid": kid, **(header or {})}
    return sign_raw(hdr, claims(level, **overrides), factory(), alg)


def signed(header_json: str, payload: Any, signer: str = "ec") -> str:
    """Sign a hand-written header JSON string (and payload) with a configured key."""
    factory, alg, _ = SIGNERS[signer]
    return sign_raw(header_json, payload, factory(), alg)


def bearer_value(token: str) -> str:
    """The `authorization` value carrying `token` (the one place tests write the scheme)."""
    return f"Bearer {token}"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata (or header pairs) carrying `token` as the bearer credential; `dict()`
    of it is the HTTP headers."""
    return (("authorization", bearer_value(token)),)


def minted(
    issuer: TokenIssuer,
    subject: str = "alice",
    level: str = "access",
    ttl: int = 300,
    **claims: Any,
) -> str:
    """A token of `level` for `subject`, minted by the test issuer (the product's
    `TokenIssuer`, signing with the test keys), valid for `ttl` seconds."""
    return issuer.mint(level, subject, ttl=ttl, **claims).token


def authorizer(
    clock: Clock | None = None, cache_size: int = 10_000, text: str = POLICY_YAML
) -> Authorizer:
    """The pipeline on the test keys and the policy `text` (state steps left out)."""
    verifier = TokenVerifier(keyset(), cache_size=cache_size, clock=clock or Clock())
    return Authorizer(policy(text), verifier)
