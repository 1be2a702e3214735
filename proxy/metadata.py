"""Rewriting request metadata between the client and the backend.

What reaches the backend: the client's metadata minus hop-by-hop and transport headers,
minus every `x-auth-*` key (on every method, public ones included), minus the policy's
`strip_headers` (identity headers of other auth proxies, method/URL override headers; see
`strip_headers.py`), minus `authorization` unless the rule forwards the token — plus the
verified identity headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .bearer import AUTHORIZATION
from .decision import Decision
from .identity import PEER, is_identity_header
from .strip_headers import DEFAULT_STRIP, StripHeaders

Metadata = tuple[tuple[str, str | bytes], ...]

#: What the frame relay removes and sets per hop: connection-specific (RFC 9113 8.2.2) and
#: transport headers. Messages travel as they are (compressed or not), so `content-type`,
#: `grpc-encoding`, `grpc-accept-encoding`, `te` and `user-agent` go through;
#: `grpc-timeout` is rewritten to the time remaining.
RELAY_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "grpc-timeout",  # carried as the remaining deadline instead
    }
)
#: The grpc.aio front end's: its gRPC library also sets the message framing and its own
#: `user-agent` per hop (it decompresses and recompresses).
HOP_BY_HOP = RELAY_HOP_BY_HOP | {
    "te",
    "content-type",
    "user-agent",
    "grpc-encoding",
    "grpc-accept-encoding",
}

_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")


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
    out: list[tuple[str, str | bytes]] = []
    for key, value in incoming:
        k = key.lower()
        if _dropped(k, HOP_BY_HOP, keep_token, strip):
            continue
        if isinstance(value, str) and not (value.isascii() and value.isprintable()):
            raise InvalidMetadata(f"metadata {k[:64]!r} has a value that is not printable ASCII")
        out.append((k, value))
    out.extend(_added(decision))
    return tuple(out)


def relay_headers(
    incoming: Iterable[tuple[bytes, bytes]],
    decision: Decision,
    strip: StripHeaders = DEFAULT_STRIP,
) -> list[tuple[bytes, bytes]]:
    """`upstream_metadata` for the frame relay: HTTP/2 header fields as they came (names
    are lower case on HTTP/2; `-bin` values stay base64), pseudo-headers left out."""
    keep_token = decision.forward_token
    out: list[tuple[bytes, bytes]] = []
    for key, value in incoming:
        k = key.decode("latin-1")
        if _dropped(k, RELAY_HOP_BY_HOP, keep_token, strip):
            continue
        if not k.endswith("-bin") and _NOT_PRINTABLE.search(value):
            raise InvalidMetadata(f"metadata {k[:64]!r} has a value that is not printable ASCII")
        out.append((key, value))
    out.extend((k.encode(), v.encode()) for k, v in _added(decision))
    return out


def _dropped(k: str, hop_by_hop: frozenset[str], keep_token: bool, strip: StripHeaders) -> bool:
    return (
        k in hop_by_hop
        or is_identity_header(k)
        or k[:1] == ":"
        or (k == AUTHORIZATION and not keep_token)
        or k in strip.names
        or k.startswith(strip.prefixes)
        or ("_" in k and strip.matches(k))
    )


def _added(decision: Decision) -> list[tuple[str, str]]:
    """The verified identity headers (and the client certificate's principal)."""
    out = list(decision.identity.headers) if decision.identity is not None else []
    if decision.principal is not None:
        out.append((PEER, decision.principal))
    return out
