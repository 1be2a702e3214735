"""Rewriting request metadata between the client and the backend.

What reaches the backend: the client's metadata minus hop-by-hop and transport headers,
minus every `x-auth-*` key (on every method, public ones included), minus the policy's
`strip_headers` (identity headers of other auth proxies, method/URL override headers; see
`policy/strip_headers.py`), minus `authorization` unless the rule forwards the token — plus the
verified identity headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from authproxy.decide.bearer import AUTHORIZATION
from authproxy.decide.decision import Decision
from authproxy.decide.identity import PEER, is_identity_header
from authproxy.policy.strip_headers import DEFAULT_STRIP, StripHeaders

#: What the relay removes and sets per hop: connection-specific (RFC 9113 8.2.2) and
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

_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")


class InvalidMetadata(ValueError):
    """Client metadata that cannot be relayed (gRPC allows printable ASCII in text values)."""


def relay_headers(
    incoming: Iterable[tuple[bytes, bytes]],
    decision: Decision,
    strip: StripHeaders = DEFAULT_STRIP,
) -> list[tuple[bytes, bytes]]:
    """The header fields to send upstream for an allowed call, without the ones `strip`
    names (the policy's `strip_headers`): HTTP/2 header fields as they came (names are
    lower case on HTTP/2; `-bin` values stay base64), pseudo-headers left out. Raises
    InvalidMetadata for a text value that is not printable ASCII."""
    keep_token = decision.forward_token
    out: list[tuple[bytes, bytes]] = []
    for key, value in incoming:
        k = key.decode("latin-1")
        if _dropped(k, keep_token, strip):
            continue
        if not k.endswith("-bin") and _NOT_PRINTABLE.search(value):
            raise InvalidMetadata(f"metadata {k[:64]!r} has a value that is not printable ASCII")
        out.append((key, value))
    out.extend((k.encode(), v.encode()) for k, v in _added(decision))
    return out


def _dropped(k: str, keep_token: bool, strip: StripHeaders) -> bool:
    return (
        k in RELAY_HOP_BY_HOP
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
