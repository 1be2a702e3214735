"""Verification keys: what one key is, which algorithms it allows, and the set of them.

Keys come only from configuration — JWKS files and URLs, OIDC discovery, PEM public keys,
HMAC secrets in environment variables (see `keys/sources.py`) — never from a token (`jku`,
`x5u`, `jwk`, `x5c` are ignored).
Each key's algorithm allowlist derives from the key itself: an RSA key never verifies HS*,
an HMAC secret never verifies RS*/ES*, and nothing verifies `none`. A key that declares
`alg` allows only that algorithm. Keys marked `use: enc`, or whose `key_ops` lack
`verify`, are not used for verification. A key bound to an issuer (`--oidc-issuer`,
`--issuer-jwks`) verifies only tokens whose `iss` is that issuer. A key with a
`retire_at` member (unix seconds, written by `authproxy keygen --rotate`) stops being used
at that time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from authproxy.keys.jsonstrict import loads_strict

log = logging.getLogger("authproxy.keys")

RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
OKP_CURVES = ("Ed25519", "Ed448")
HMAC_ALGS = {"HS256": 32, "HS384": 48, "HS512": 64}  # alg -> minimum secret bytes (RFC 7518 3.2)
MIN_RSA_BITS = 2048
#: JWK member (unix seconds) after which the key is no longer used: `keygen --rotate`.
RETIRE_AT = "retire_at"
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")
_THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "oct": ("k", "kty"),
}


class KeyLoadError(Exception):
    """A key source that cannot be used; the message names the source and the problem."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    kty: str
    source: str
    #: algorithm name -> PyJWK bound to that algorithm (PyJWT verifies with exactly it)
    algorithms: Mapping[str, jwt.PyJWK]
    #: Tokens this key verifies must claim this `iss`; None: any issuer the level accepts.
    issuer: str | None = None
    #: Unix time after which the key is no longer used (`keygen --rotate`); None: never.
    retire_at: float | None = None
    #: The public JWK (kid, kty, key members, alg, use), for publishing; None for HMAC.
    public: Mapping[str, Any] | None = None


class KeySet:
    """The verification keys in use, looked up by `kid`. Two issuers may use the same
    `kid` (each issuer's keys verify only its own tokens); one issuer may not."""

    def __init__(self, keys: Iterable[VerificationKey] = ()) -> None:
        self.by_kid: dict[str, tuple[VerificationKey, ...]] = {}
        for key in keys:
            same = self.by_kid.get(key.kid, ())
            for other in same:
                if other.issuer == key.issuer:
                    raise KeyLoadError(
                        f"{key.source}: key id {key.kid!r} is already used by {other.source}"
                    )
            self.by_kid[key.kid] = (*same, key)

    def __len__(self) -> int:
        return sum(len(keys) for keys in self.by_kid.values())

    def __iter__(self) -> Iterator[VerificationKey]:
        for keys in self.by_kid.values():
            yield from keys

    def for_algorithm(self, alg: str) -> list[VerificationKey]:
        """Keys that accept `alg` (used for tokens without a `kid`)."""
        return [k for k in self if alg in k.algorithms]

    def missing(self, key_ids: Iterable[str]) -> list[str]:
        return sorted(k for k in key_ids if k not in self.by_kid)


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url), used as the default `kid`."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty", ""))
    if members is None:
        raise KeyLoadError(f"cannot compute a thumbprint for key type {jwk.get('kty')!r}")
    missing = [m for m in members if not isinstance(jwk.get(m), str)]
    if missing:
        raise KeyLoadError(f"{jwk['kty']} key lacks member(s) {', '.join(missing)}")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(value: str) -> bytes:
    """Unpadded base64url (as in JWS and JWK) to bytes; raises ValueError."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def key_from_jwk(
    jwk: Mapping[str, Any], source: str, issuer: str | None = None
) -> VerificationKey | None:
    """Build a verification key from one JWK; None if the JWK is not for verification.
    `issuer`: the only `iss` the key may verify tokens of (None: any)."""
    if not isinstance(jwk, Mapping):
        raise KeyLoadError(f"{source}: a JWK must be a JSON object")
    kty = jwk.get("kty")
    if kty not in _THUMBPRINT_MEMBERS:
        raise KeyLoadError(f"{source}: unsupported key type {kty!r}")
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid):
        raise KeyLoadError(f"{source}: 'kid' must be a non-empty string")
    if kid is None:
        try:
            kid = jwk_thumbprint(jwk)
        except KeyLoadError as e:
            raise KeyLoadError(f"{source}: {e}") from None
    where = f"{source} (kid {kid!r})"
    if kty != "oct" and any(m in jwk for m in _PRIVATE_MEMBERS):
        raise KeyLoadError(f"{where}: contains private key material; configure only the public key")
    use = jwk.get("use")
    key_ops = jwk.get("key_ops")
    if use is not None and use != "sig":
        log.warning("%s: skipped, 'use' is %r (not 'sig')", where, use)
        return None
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        log.warning("%s: skipped, 'key_ops' %r does not include 'verify'", where, key_ops)
        return None
    algs = _allowed_algorithms(jwk, kty, where)
    bound: dict[str, jwt.PyJWK] = {}
    for alg in algs:
        try:
            bound[alg] = jwt.PyJWK(dict(jwk), algorithm=alg)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
            raise KeyLoadError(f"{where}: invalid key: {e}") from None
    sample = next(iter(bound.values()))
    if isinstance(sample.key, rsa.RSAPublicKey) and sample.key.key_size < MIN_RSA_BITS:
        raise KeyLoadError(
            f"{where}: RSA key has {sample.key.key_size} bits; at least {MIN_RSA_BITS} are required"
        )
    retire_at = jwk.get(RETIRE_AT)
    if retire_at is not None and (
        isinstance(retire_at, bool) or not isinstance(retire_at, int | float)
    ):
        raise KeyLoadError(f"{where}: '{RETIRE_AT}' must be a number (unix seconds)")
    public = None
    if kty != "oct":
        public = {m: jwk[m] for m in _THUMBPRINT_MEMBERS[kty]}
        public.update(kid=kid, use="sig")
        if len(algs) == 1:
            public["alg"] = algs[0]
    return VerificationKey(
        kid=kid,
        kty=kty,
        source=source,
        algorithms=bound,
        issuer=issuer,
        retire_at=None if retire_at is None else float(retire_at),
        public=public,
    )


def _allowed_algorithms(jwk: Mapping[str, Any], kty: str, where: str) -> tuple[str, ...]:
    declared = jwk.get("alg")
    if declared is not None and not isinstance(declared, str):
        raise KeyLoadError(f"{where}: 'alg' must be a string")
    if kty == "RSA":
        possible: tuple[str, ...] = RSA_ALGS
    elif kty == "EC":
        crv = jwk.get("crv")
        if crv not in EC_ALGS:
            raise KeyLoadError(f"{where}: unsupported EC curve {crv!r}")
        possible = (EC_ALGS[crv],)
    elif kty == "OKP":
        if jwk.get("crv") not in OKP_CURVES:
            raise KeyLoadError(f"{where}: unsupported OKP curve {jwk.get('crv')!r}")
        possible = ("EdDSA",)
    else:  # oct
        k = jwk.get("k")
        if not isinstance(k, str):
            raise KeyLoadError(f"{where}: an 'oct' key needs 'k'")
        try:
            size = len(b64url_decode(k))
        except ValueError:
            raise KeyLoadError(f"{where}: 'k' is not base64url") from None
        possible = tuple(alg for alg, need in HMAC_ALGS.items() if size >= need)
        if not possible:
            raise KeyLoadError(
                f"{where}: HMAC secret has {size} bytes; at least 32 are required for HS256"
            )
    if declared is None:
        return possible
    if declared not in possible:
        raise KeyLoadError(
            f"{where}: 'alg' {declared!r} cannot be used with this key "
            f"(possible: {', '.join(possible)})"
        )
    return (declared,)


def load_jwks_file(path: str, issuer: str | None = None) -> list[VerificationKey]:
    """Keys from a JWKS document (`{"keys": [...]}`) or a single JWK; every key must be
    usable (a file is the operator's own: a bad key in it is an error, not skipped)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyLoadError(f"{path}: cannot read JWKS: {e.strerror}") from None
    return keys_from_jwks(data, path, issuer, strict=True)


def keys_from_jwks(
    data: bytes, source: str, issuer: str | None = None, strict: bool = True
) -> list[VerificationKey]:
    """Keys from a JWKS document's bytes. `strict`: any unusable JWK is an error; else
    (a remote set, which may publish keys of types we do not support) unusable JWKs are
    skipped with a warning, but a set with no usable key at all is still an error."""
    try:
        doc = loads_strict(data)
    except ValueError as e:
        raise KeyLoadError(f"{source}: not a valid JSON document: {e}") from None
    if isinstance(doc, dict) and "keys" in doc:
        jwks = doc["keys"]
        if not isinstance(jwks, list):
            raise KeyLoadError(f"{source}: 'keys' must be a list")
    elif isinstance(doc, dict) and "kty" in doc and strict:
        jwks = [doc]
    else:
        raise KeyLoadError(f'{source}: expected a JWKS ({{"keys": [...]}}) or a single JWK')
    keys: list[VerificationKey] = []
    for i, jwk in enumerate(jwks):
        if not strict and isinstance(jwk, Mapping) and jwk.get("kty") == "oct":
            # A secret in a published set is no secret: anyone could sign with it.
            log.warning("skipped a key: %s[%d] is a symmetric (oct) key in a remote set", source, i)
            continue
        try:
            key = key_from_jwk(jwk, f"{source}[{i}]", issuer)
        except KeyLoadError as e:
            if strict:
                raise
            log.warning("skipped a key: %s", e)
            continue
        if key is not None:
            keys.append(key)
    if not strict and not keys:
        raise KeyLoadError(f"{source}: the key set has no usable verification key")
    return keys


def public_jwk(public_key: Any) -> dict[str, Any]:
    """The JWK (as a dict, without `kid`) of a `cryptography` public key."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public_key))
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public_key))
    if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public_key))
    raise KeyLoadError(f"unsupported public key type {type(public_key).__name__}")


def load_pem_public_key(
    path: str, kid: str | None = None, issuer: str | None = None
) -> VerificationKey:
    """A PEM public key (RSA, EC or Ed25519/Ed448); `kid` defaults to its thumbprint."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyLoadError(f"{path}: cannot read PEM key: {e.strerror}") from None
    if b"PRIVATE KEY" in data:
        raise KeyLoadError(f"{path}: is a private key; configure the public key instead")
    try:
        public_key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise KeyLoadError(f"{path}: not a PEM public key: {e}") from None
    jwk = public_jwk(public_key)
    jwk["kid"] = kid or jwk_thumbprint(jwk)
    key = key_from_jwk(jwk, path, issuer)
    assert key is not None  # a JWK without use/key_ops is always a verification key
    return key


def hmac_key(secret: bytes, kid: str, source: str) -> VerificationKey:
    jwk = {"kty": "oct", "k": b64url(secret), "kid": kid}
    key = key_from_jwk(jwk, source)
    assert key is not None
    return key


def secret_from_env(name: str) -> bytes:
    """The HMAC secret (raw bytes) in environment variable `name`; KeyLoadError if unset."""
    value = os.environ.get(name)
    if not value:
        raise KeyLoadError(
            f"environment variable {name} is not set or empty (it holds an HMAC secret)"
        )
    return value.encode()


def load_hmac_env(name: str, kid: str | None = None) -> VerificationKey:
    """An HMAC verification key (at least 32 bytes) from environment variable `name`."""
    return hmac_key(secret_from_env(name), kid or name, f"${name}")


def split_kid(spec: str) -> tuple[str | None, str]:
    """`KID=SOURCE` -> (KID, SOURCE); plain `SOURCE` -> (None, SOURCE)."""
    kid, sep, source = spec.partition("=")
    return (kid, source) if sep and kid and source else (None, spec)


class CurrentKeys(Protocol):
    """What keeps a key set current (`keys/ring.py`'s `KeyRing`)."""

    @property
    def current(self) -> KeySet: ...
