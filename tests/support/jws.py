"""Hand-built compact JWS tokens for the attack tests.

PyJWT refuses to build most malformed tokens (duplicate members, `alg: none` with a
signature, public keys as HMAC secrets), so segments are assembled here from raw JSON
text and signed with `hmac` or PyJWT's algorithm objects (which sign with `cryptography`
and produce the JWS signature encodings: raw r||s for ECDSA).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt

from authproxy.keys.issuer import SigningKey

#: level -> (type claim, audience), as in TEST_POLICY (`tests/support/policies.py`).
LEVELS = {
    "2fa": ("2fa_pending", "2fa-verification"),
    "refresh": ("refresh", "token-refresh"),
    "access": ("access", "api-access"),
}
ISSUER = "test-issuer"
_HMAC = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


class Raw(str):
    """JSON text inserted verbatim (NaN, 1e400, a 500-digit integer, nested arrays)."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def json_text(value: Any) -> str:
    """Compact JSON; a list of (name, value) pairs becomes an object that may repeat names."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(p, tuple) for p in value):
        return "{" + ",".join(f"{json.dumps(k)}:{json_text(v)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{json_text(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, separators=(",", ":"))


def segment(value: Any) -> str:
    """A base64url segment: bytes as they are, str as JSON text, anything else as JSON."""
    if isinstance(value, bytes):
        return b64url(value)
    if isinstance(value, str) and not isinstance(value, Raw):
        return b64url(value.encode())
    return b64url(json_text(value).encode())


def sign(alg: str, key: Any, data: bytes) -> bytes:
    """Sign `data` for `alg`; HMAC keys are any bytes (PEM, DER, JWK text are all fine)."""
    if alg in _HMAC:
        return hmac.new(key, data, _HMAC[alg]).digest()
    return jwt.get_algorithm_by_name(alg).sign(data, key)


def craft(
    header: Any, payload: Any, *, key: Any = None, alg: str | None = None, signature: Any = None
) -> str:
    """`header.payload.signature`; signed with `key` for `alg` (default: the header's)
    unless `signature` (bytes, or an already encoded str) is given."""
    h, p = segment(header), segment(payload)
    if signature is None:
        if alg is None:
            alg = header["alg"] if isinstance(header, dict) else dict(header)["alg"]
        signature = sign(alg, key, f"{h}.{p}".encode())
    if isinstance(signature, bytes):
        signature = b64url(signature)
    return f"{h}.{p}.{signature}"


def signed(sk: SigningKey, payload: Any, **header: Any) -> str:
    """A token signed by a configured key, with its alg and kid plus `header` members."""
    return craft({"alg": sk.alg, "kid": sk.kid, **header}, payload, key=sk.key)


def claims(level: str = "access", ttl: int = 300, **overrides: Any) -> dict[str, Any]:
    """A claim set that satisfies `level`; an override of None removes the claim."""
    now = int(time.time())
    token_type, audience = LEVELS[level]
    result: dict[str, Any] = {
        "sub": "alice",
        "type": token_type,
        "aud": audience,
        "iss": ISSUER,
        "iat": now,
        "exp": now + ttl,
    }
    for name, value in overrides.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def pairs(level: str = "access", **overrides: Any) -> list[tuple[str, Any]]:
    """`claims()` as (name, value) pairs, ready to get duplicates or raw values appended."""
    return list(claims(level, **overrides).items())
