"""Generating signing keys: a private PEM (mode 0600) and the public JWKS that verifies it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .issuer import SigningKey, load_signing_key

ALGORITHMS = ("RS256", "ES256", "EdDSA")


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
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)  # also when the file existed with wider permissions


def add_to_jwks(jwks_path: Path, jwk: dict[str, Any]) -> None:
    """Add (or replace, by kid) a public JWK in a JWKS file, creating it if needed."""
    keys: list[dict[str, Any]] = []
    if jwks_path.exists():
        keys = json.loads(jwks_path.read_text()).get("keys", [])
    keys = [k for k in keys if k.get("kid") != jwk["kid"]] + [jwk]
    jwks_path.parent.mkdir(parents=True, exist_ok=True)
    jwks_path.write_text(json.dumps({"keys": keys}, indent=2) + "\n")


def keygen(alg: str, private_path: Path, jwks_path: Path, kid: str | None = None) -> SigningKey:
    """Write a new private key and add its public JWK to `jwks_path`; return the key."""
    write_private_pem(generate_private_key(alg), private_path)
    key = load_signing_key(private_path, kid)
    jwk = key.public_jwk()
    assert jwk is not None
    add_to_jwks(jwks_path, jwk)
    return key
