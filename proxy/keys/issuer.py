"""Issuing tokens: the code `authproxy token mint` and the example auth service share.

Claims follow the design of the example backend's auth API (`api.v1`): sub, type, aud and
iss from the policy's `tokens` section, iat, exp, a random jti, and optional roles,
permissions and scope.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authproxy.keys.keyset import HMAC_ALGS, KeyLoadError, jwk_thumbprint, public_jwk
from authproxy.policy.model import Policy

_EC_ALG = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    alg: str
    key: Any = field(repr=False)  # a cryptography private key, or the HMAC secret bytes

    def public_jwk(self) -> dict[str, Any] | None:
        """The public JWK to publish (with kid, alg, use); None for HMAC secrets."""
        if isinstance(self.key, bytes):
            return None
        jwk = public_jwk(self.key.public_key())
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}


def load_signing_key(path: str | Path, kid: str | None = None) -> SigningKey:
    """A PEM private key; alg follows the key (RSA: RS256, EC: ES256/384/512, Ed25519: EdDSA)."""
    try:
        data = Path(path).read_bytes()
        private = serialization.load_pem_private_key(data, password=None)
    except OSError as e:
        raise KeyLoadError(f"{path}: cannot read private key: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise KeyLoadError(f"{path}: not an unencrypted PEM private key: {e}") from None
    if isinstance(private, rsa.RSAPrivateKey):
        alg = "RS256"
    elif isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name in _EC_ALG:
        alg = _EC_ALG[private.curve.name]
    elif isinstance(private, ed25519.Ed25519PrivateKey):
        alg = "EdDSA"
    else:
        raise KeyLoadError(f"{path}: unsupported private key type {type(private).__name__}")
    return SigningKey(kid or jwk_thumbprint(public_jwk(private.public_key())), alg, private)


def hmac_signing_key(secret: bytes, kid: str, alg: str = "HS256") -> SigningKey:
    if alg not in HMAC_ALGS:
        raise KeyLoadError(f"unsupported HMAC algorithm {alg!r}")
    if len(secret) < HMAC_ALGS[alg]:
        raise KeyLoadError(f"HMAC secret has {len(secret)} bytes; {alg} needs {HMAC_ALGS[alg]}")
    return SigningKey(kid, alg, secret)


@dataclass(frozen=True, slots=True)
class MintedToken:
    token: str
    jti: str
    exp: int
    expires_in: int
    claims: dict[str, Any]


class TokenIssuer:
    """Mints tokens for the policy's levels, each signed with that level's key."""

    def __init__(
        self,
        policy: Policy,
        keys: Mapping[str, SigningKey],
        clock: Callable[[], float] = time.time,
    ) -> None:
        missing = [level for level in keys if level not in policy.tokens]
        if missing:
            raise ValueError(f"the policy defines no tokens for level(s) {', '.join(missing)}")
        self.policy = policy
        self.keys = dict(keys)
        self.clock = clock

    def mint(
        self,
        level: str,
        subject: str,
        *,
        ttl: float,
        roles: Iterable[str] | None = None,
        permissions: Iterable[str] | None = None,
        scopes: Iterable[str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> MintedToken:
        spec = self.policy.tokens[level]
        key = self.keys.get(level)
        if key is None:
            raise ValueError(f"no signing key configured for {level} tokens")
        now = int(self.clock())
        exp = now + int(ttl)
        audiences = sorted(spec.audiences)
        claims: dict[str, Any] = {
            "sub": subject,
            spec.type_claim: spec.type,
            "aud": audiences[0] if len(audiences) == 1 else audiences,
            "iat": now,
            "exp": exp,
            "jti": secrets.token_urlsafe(16),
        }
        if spec.issuers:
            claims["iss"] = sorted(spec.issuers)[0]
        if roles is not None:
            claims["roles"] = list(roles)
        if permissions is not None:
            claims["permissions"] = list(permissions)
        if scopes is not None:
            claims["scope"] = list(scopes)
        if extra:
            claims.update(extra)
        token = jwt.encode(claims, key.key, algorithm=key.alg, headers={"kid": key.kid})
        return MintedToken(token, claims["jti"], exp, exp - now, claims)
