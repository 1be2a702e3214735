"""Generating signing keys: a private PEM (mode 0600) and the public JWKS that verifies it.

Rotation (`rotate`) adds a new signing key while the old public keys stay published until
the tokens they signed have expired: every other key in the JWKS gets the member
`"retire_at": <unix seconds>` (the proxy stops using a key once that time has passed), and
keys whose `retire_at` has passed are removed from the file on every run.

Both files are replaced in one rename (a temporary file in the same directory, then
`os.replace`), so a watcher (the proxy's JWKS reload, the example backend's key reload)
never reads half a file. The JWKS is written before the private key: the new public key
is published before anything can sign with the new private key.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authproxy.keys.issuer import SigningKey, load_signing_key
from authproxy.keys.jsonstrict import loads_strict
from authproxy.keys.keyset import KeyLoadError, jwk_thumbprint, public_jwk
from authproxy.state.atomic_file import write_atomically

ALGORITHMS = ("RS256", "ES256", "EdDSA")
#: The JWK member (a number, unix seconds) after which a key is no longer used.
RETIRE_AT = "retire_at"
#: Mode of a JWKS file keygen creates (public keys: readable by the proxy's user).
JWKS_MODE = 0o644


class KeygenError(ValueError):
    """A keygen run that cannot go ahead; the message says why (the CLI exits 2)."""


@dataclass(frozen=True, slots=True)
class KeygenResult:
    key: SigningKey
    #: (kid, retire_at) of the keys this run marked for retirement.
    retiring: list[tuple[str, int]] = field(default_factory=list)
    #: (kid, retire_at) of the keys this run removed because their time had passed.
    pruned: list[tuple[str | None, int]] = field(default_factory=list)
    #: (kid, retire_at) of the keys that were already retiring and still are.
    still_retiring: list[tuple[str | None, int]] = field(default_factory=list)
    #: The key that signed until now (rotate), when its public key is not in the JWKS.
    unpublished_old_kid: str | None = None


def generate_private_key(alg: str) -> Any:
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported algorithm {alg!r} (choose from {', '.join(ALGORITHMS)})")


def write_private_pem(private_key: Any, path: Path) -> None:
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, pem, 0o600)


def read_jwks(jwks_path: Path) -> list[Any]:
    """The keys of a JWKS file (a single JWK counts as a set of one); [] if there is no file."""
    try:
        data = jwks_path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise KeygenError(f"{jwks_path}: cannot read JWKS: {e.strerror}") from None
    try:
        doc = loads_strict(data)
    except ValueError as e:
        raise KeygenError(f"{jwks_path}: not a valid JSON document: {e}") from None
    if isinstance(doc, dict) and isinstance(doc.get("keys"), list):
        keys = doc["keys"]
    elif isinstance(doc, dict) and "kty" in doc and "keys" not in doc:
        keys = [doc]
    else:
        raise KeygenError(f'{jwks_path}: expected a JWKS ({{"keys": [...]}}) or a single JWK')
    for i, jwk in enumerate(keys):
        if isinstance(jwk, dict) and RETIRE_AT in jwk and not _is_time(jwk[RETIRE_AT]):
            raise KeygenError(
                f"{jwks_path}[{i}]: '{RETIRE_AT}' must be a number (unix seconds), "
                f"got {jwk[RETIRE_AT]!r}"
            )
    return keys


def write_jwks(jwks_path: Path, keys: list[Any]) -> None:
    try:
        mode = jwks_path.stat().st_mode & 0o777  # keep the mode of the file replaced
    except FileNotFoundError:
        mode = JWKS_MODE
    jwks_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(jwks_path, (json.dumps({"keys": keys}, indent=2) + "\n").encode(), mode)


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _prune(keys: list[Any], now: float) -> tuple[list[Any], list[tuple[str | None, int]]]:
    """Keys whose `retire_at` has not passed, and (kid, retire_at) of those that have."""
    kept, pruned = [], []
    for jwk in keys:
        if isinstance(jwk, dict) and RETIRE_AT in jwk and jwk[RETIRE_AT] <= now:
            pruned.append((jwk.get("kid"), int(jwk[RETIRE_AT])))
        else:
            kept.append(jwk)
    return kept, pruned


def add_to_jwks(
    jwks_path: Path, jwk: dict[str, Any], clock: Callable[[], float] = time.time
) -> list[tuple[str | None, int]]:
    """Add (or replace, by kid) a public JWK in a JWKS file, creating it if needed; keys
    past their `retire_at` are removed. Returns (kid, retire_at) of the removed keys."""
    keys, pruned = _prune(read_jwks(jwks_path), clock())
    keys = [k for k in keys if not (isinstance(k, dict) and k.get("kid") == jwk["kid"])] + [jwk]
    write_jwks(jwks_path, keys)
    return pruned


def keygen(alg: str, private_path: Path, jwks_path: Path, kid: str | None = None) -> SigningKey:
    """Write a new private key and add its public JWK to `jwks_path`; return the key.

    Overwrites `private_path` (the CLI refuses that without --force or --rotate)."""
    return keygen_run(alg, private_path, jwks_path, kid).key


def keygen_run(
    alg: str,
    private_path: Path,
    jwks_path: Path,
    kid: str | None = None,
    clock: Callable[[], float] = time.time,
) -> KeygenResult:
    """`keygen`, telling which keys it pruned from the JWKS."""
    private = generate_private_key(alg)
    key = _signing_key(private, alg, kid)
    jwk = key.public_jwk()
    assert jwk is not None
    pruned = add_to_jwks(jwks_path, jwk, clock)
    write_private_pem(private, private_path)
    return KeygenResult(key, pruned=pruned)


def rotate(
    alg: str,
    private_path: Path,
    jwks_path: Path,
    retire_after: float,
    kid: str | None = None,
    clock: Callable[[], float] = time.time,
) -> KeygenResult:
    """Replace the signing key at `private_path` with a new one and publish it in
    `jwks_path`; every other key there without a retire time retires `retire_after`
    seconds from now, keys already past theirs are removed.

    `retire_after` must be at least the longest lifetime of the tokens the old key signed:
    until then the proxy still accepts them."""
    if not retire_after > 0 or not math.isfinite(retire_after):
        raise KeygenError("--retire-after must be a positive duration")
    if not private_path.exists():
        raise KeygenError(
            f"--rotate: {private_path} does not exist; there is no key to rotate "
            "(run keygen without --rotate to create the first one)"
        )
    try:
        old = load_signing_key(private_path)
    except KeyLoadError as e:
        raise KeygenError(
            f"--rotate: {e}; replace it with keygen --force (no rotation) if it is lost"
        ) from None
    now = clock()
    keys, pruned = _prune(read_jwks(jwks_path), now)

    private = generate_private_key(alg)
    key = _signing_key(private, alg, kid)
    jwk = key.public_jwk()
    assert jwk is not None
    if any(isinstance(k, dict) and k.get("kid") == key.kid for k in keys):
        raise KeygenError(
            f"{jwks_path} already has a key with kid {key.kid!r}; rotating needs a new kid"
        )

    old_thumbprint = jwk_thumbprint(public_jwk(old.key.public_key()))
    published = False
    retire_at = math.ceil(now + retire_after)
    retiring: list[tuple[str, int]] = []
    still: list[tuple[str | None, int]] = []
    for entry in keys:
        if not isinstance(entry, dict):
            continue
        published = published or _thumbprint(entry) == old_thumbprint
        if RETIRE_AT in entry:
            still.append((entry.get("kid"), int(entry[RETIRE_AT])))
        else:
            entry[RETIRE_AT] = retire_at
            retiring.append((str(entry.get("kid", _thumbprint(entry))), retire_at))
    write_jwks(jwks_path, [*keys, jwk])  # published first: nothing signs with it yet
    write_private_pem(private, private_path)
    return KeygenResult(
        key,
        retiring=retiring,
        pruned=pruned,
        still_retiring=still,
        unpublished_old_kid=None if published else old.kid,
    )


def _signing_key(private: Any, alg: str, kid: str | None) -> SigningKey:
    return SigningKey(kid or jwk_thumbprint(public_jwk(private.public_key())), alg, private)


def _thumbprint(jwk: dict[str, Any]) -> str | None:
    try:
        return jwk_thumbprint(jwk)
    except KeyLoadError:
        return None
