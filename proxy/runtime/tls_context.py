"""`ssl.SSLContext`s for the frame relay, built from the PEM material `runtime/tls.py` has checked:
the listener's (ALPN h2, TLS 1.2 or newer, client certificates required and verified
when there is a client CA) and the backend connections' (ALPN h2, the backend's name
verified against the trust roots, an optional client certificate)."""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

ALPN = ["h2"]


def _load_pair(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """`load_cert_chain` reads files only: a private (0600) file in a private directory,
    removed at once."""
    with tempfile.TemporaryDirectory(prefix="authproxy-tls-") as directory:
        path = Path(directory) / "pair.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem + b"\n" + chain_pem)
        context.load_cert_chain(path)


def server_context(chain_pem: bytes, key_pem: bytes, client_roots: bytes | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    _load_pair(context, chain_pem, key_pem)
    if client_roots is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_roots.decode("ascii"))
    return context


def client_context(
    roots: bytes | None, chain_pem: bytes | None = None, key_pem: bytes | None = None
) -> ssl.SSLContext:
    """Without `roots`: the system's trust store."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    if roots is not None:
        context.load_verify_locations(cadata=roots.decode("ascii"))
    if chain_pem is not None and key_pem is not None:
        _load_pair(context, chain_pem, key_pem)
    return context
