"""The client certificate's identity (its principal) on an mTLS connection, for `peers:`
rules and `x-auth-peer`: the `spiffe://` URI SAN of an X.509-SVID, else the subject."""

from __future__ import annotations

import asyncio
import logging
import ssl

from cryptography import x509

log = logging.getLogger("authproxy.tls")

_PRINCIPALS: dict[bytes, str | None] = {}
_PRINCIPALS_MAX = 1024


def transport_principal(transport: asyncio.BaseTransport) -> str | None:
    """The verified client certificate's identity on a TLS connection of the sidecar: its
    `spiffe://` URI SAN (an X.509-SVID), else its subject as an RFC 4514 string; None
    when the connection has no client certificate. Only meaningful on a listener that
    requires and verifies client certificates (`ServerTls` with a client CA): there no
    handshake completes without a certificate that chains to the CA. Nothing the client
    sends in headers counts."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return _principal(ssl.DER_cert_to_PEM_cert(der).encode("ascii"))


def _principal(pem: bytes) -> str | None:
    """`principal_of`, remembered for the last `_PRINCIPALS_MAX` certificates."""
    try:
        return _PRINCIPALS[pem]
    except KeyError:
        pass
    principal = principal_of(pem)
    if len(_PRINCIPALS) >= _PRINCIPALS_MAX:
        del _PRINCIPALS[next(iter(_PRINCIPALS))]  # the oldest entry
    _PRINCIPALS[pem] = principal
    return principal


def principal_of(pem: bytes) -> str | None:
    """A certificate's principal (see `transport_principal`). A certificate with more than
    one `spiffe://` URI SAN names no single identity: None (and logged)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        log.warning(
            "a client certificate the TLS handshake accepted cannot be parsed; no principal"
        )
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    spiffe = [u for u in uris if u[:9].lower() == "spiffe://"]
    if len(spiffe) == 1:
        return spiffe[0]
    if spiffe:
        log.warning(
            "client certificate %r has %d SPIFFE ids; it names no single identity",
            cert.subject.rfc4514_string(),
            len(spiffe),
        )
        return None
    subject = cert.subject.rfc4514_string()
    return subject or None
