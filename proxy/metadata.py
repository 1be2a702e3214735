"""Rewriting request metadata between the client and the backend.

What reaches the backend: the client's metadata minus hop-by-hop and transport headers,
minus every `x-auth-*` key (on every method, public ones included), minus the policy's
`strip_headers` (identity headers of other auth proxies, method/URL override headers; see
`strip_headers.py`), minus `authorization` unless the rule forwards the token — plus the
verified identity headers.
"""

from __future__ import annotations

from collections.abc import Iterable

from .bearer import AUTHORIZATION
from .decision import Decision
from .identity import PEER, is_identity_header
from .strip_headers import DEFAULT_STRIP, StripHeaders

Metadata = tuple[tuple[str, str | bytes], ...]

#: Connection-specific (RFC 9113 8.2.2) and transport headers that are set per hop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "transfer-encoding",
        "upgrade",
        "te",
        "host",
        "content-length",
        "content-type",
        "user-agent",  # each hop's gRPC library sets its own
        "grpc-timeout",  # carried as the remaining deadline instead
        "grpc-encoding",
        "grpc-accept-encoding",
    }
)


class InvalidMetadata(ValueError):
    """Client metadata that cannot be relayed (gRPC allows printable ASCII in text values)."""


def upstream_metadata(
    incoming: Iterable[tuple[str, str | bytes]],
    decision: Decision,
    strip: StripHeaders = DEFAULT_STRIP,
) -> Metadata:
    """The metadata to send upstream for an allowed call, without the headers `strip`
    names (the policy's `strip_headers`); raises InvalidMetadata."""
    keep_token = decision.forward_token
    names, prefixes = strip.names, strip.prefixes
    out: list[tuple[str, str | bytes]] = []
    for key, value in incoming:
        k = key.lower()
        if (
            k in HOP_BY_HOP
            or is_identity_header(k)
            or k[:1] == ":"
            or (k == AUTHORIZATION and not keep_token)
            or k in names
            or k.startswith(prefixes)
            or ("_" in k and strip.matches(k))
        ):
            continue
        if isinstance(value, str) and not (value.isascii() and value.isprintable()):
            raise InvalidMetadata(f"metadata {k[:64]!r} has a value that is not printable ASCII")
        out.append((k, value))
    if decision.identity is not None:
        out.extend(decision.identity.headers)
    if decision.principal is not None:
        out.append((PEER, decision.principal))
    return tuple(out)
