"""Reading and checking TLS files: each PEM file is read (at most 1 MiB) and checked
with `cryptography` before it is used — certificates parse, a private key is unencrypted,
of a kind TLS takes and matches the first certificate (the leaf), a CA file holds
certificates. A problem is one `TlsError` line naming the flag, the file and what is
wrong. What passes is re-encoded as plain PEM: exactly what was checked is what the
`ssl.SSLContext`s and gRPC credentials are built from (`runtime/tls.py`).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

log = logging.getLogger("authproxy.tls")

#: PEM files larger than this are refused unread (a mistaken path to a big file).
MAX_PEM_BYTES = 1024 * 1024
_BEGIN_CERT = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"


class TlsError(Exception):
    """A TLS file the proxy cannot use: one line naming the flag, the file and the problem."""


# -- reading and checking files ---------------------------------------------------------


def read_pem(flag: str, path: str) -> bytes:
    """The bytes of the file `flag` names, refused unread when over `MAX_PEM_BYTES`."""
    try:
        p = Path(path)
        if p.stat().st_size > MAX_PEM_BYTES:
            raise TlsError(f"{flag} {path}: larger than {MAX_PEM_BYTES} bytes; not a PEM file")
        return p.read_bytes()
    except OSError as e:
        raise TlsError(f"{flag} {path}: cannot read it: {e.strerror or e}") from None


def certificates(flag: str, path: str, data: bytes) -> list[x509.Certificate]:
    """Every PEM certificate in `data` (at least one)."""
    if _BEGIN_CERT not in data:
        if _PRIVATE_KEY in data:
            raise TlsError(f"{flag} {path}: holds a private key, not a PEM certificate")
        raise TlsError(f"{flag} {path}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TlsError(f"{flag} {path}: a PEM certificate in it cannot be parsed ({e})") from None


def private_key(flag: str, path: str, data: bytes):
    """The unencrypted RSA, EC or Ed25519 private key in `data`."""
    if _PRIVATE_KEY not in data:
        if _BEGIN_CERT in data:
            raise TlsError(f"{flag} {path}: holds a certificate, not a PEM private key")
        raise TlsError(f"{flag} {path}: no PEM private key (-----BEGIN ... PRIVATE KEY-----) in it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise TlsError(
            f"{flag} {path}: the private key is encrypted; give an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TlsError(f"{flag} {path}: the private key cannot be parsed ({e})") from None
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise TlsError(
            f"{flag} {path}: a {type(key).__name__} key; TLS needs an RSA, EC or Ed25519 key"
        )
    return key


def spki(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pem_of(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class KeyPair:
    """A checked certificate chain and its key, re-encoded for gRPC."""

    chain: tuple[x509.Certificate, ...]
    chain_pem: bytes
    key_pem: bytes

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def key_pair(
    cert_flag: str, cert_path: str, cert: bytes, key_flag: str, key_path: str, key: bytes
) -> KeyPair:
    """A certificate chain and the key that matches its first certificate (the leaf)."""
    chain = certificates(cert_flag, cert_path, cert)
    private = private_key(key_flag, key_path, key)
    public = spki(private.public_key())
    if public != spki(chain[0].public_key()):
        order = [i for i, c in enumerate(chain) if spki(c.public_key()) == public]
        raise TlsError(
            f"{key_flag} {key_path}: does not match the certificate in {cert_flag} {cert_path}"
            + (f" (it matches certificate {order[0] + 1}; put the leaf first)" if order else "")
        )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return KeyPair(tuple(chain), pem_of(chain), key_pem)


def roots_pem(flag: str, path: str, data: bytes) -> bytes:
    """A CA file's certificates, as plain PEM."""
    if _BEGIN_CERT not in data:
        raise TlsError(f"{flag} {path}: contains no PEM certificates (-----BEGIN CERTIFICATE-----)")
    return pem_of(certificates(flag, path, data))


def describe(cert: x509.Certificate) -> str:
    return (
        f"subject {cert.subject.rfc4514_string()!r}, serial {cert.serial_number:x},"
        f" valid until {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    )


def warn_validity(flag: str, path: str, cert: x509.Certificate) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if now > cert.not_valid_after_utc:
        log.warning(
            "%s %s: the certificate expired at %s; using it anyway (peers will refuse it)",
            flag,
            path,
            f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
        )
    elif now < cert.not_valid_before_utc:
        log.warning(
            "%s %s: the certificate is not valid before %s; using it anyway",
            flag,
            path,
            f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}",
        )


def files_digest(contents: Iterable[bytes | None]) -> bytes:
    """One digest of a set of files' contents (None: a file the set does not have)."""
    h = hashlib.sha256()
    for data in contents:
        if data is None:
            h.update(b"\x00none")
        else:
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
    return h.digest()
