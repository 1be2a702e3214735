"""The auth headers' one owner: which request headers a client may not pass to the
backend, and which headers the proxy sets there. Both front ends use these rules — the
sidecar rewrites the headers itself (`relay_headers`), ext_authz tells Envoy what to set
and remove (`ext_authz/answer.py`).

The strip rule (`client_may_not_send`): every `x-auth-*` key (any case, underscore
spellings too; on every method, public ones included) and the policy's `strip_headers`
(identity headers of other auth proxies, method/URL override headers; see
`policy/strip_headers.py`); `authorization` goes too unless the rule forwards the token.
The inject rule (`identity_headers`): the verified identity's headers and the client
certificate's principal. The names the proxy may set (`names_set_by`) are removed when a
call does not set them, so a client can never supply one.

What reaches the backend through the sidecar: the client's metadata minus hop-by-hop and
transport headers and minus what the strip rule removes, plus the identity headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from authproxy.decide.bearer import AUTHORIZATION
from authproxy.decide.decision import Decision
from authproxy.decide.identity import BUILTIN_HEADERS, PEER, is_identity_header
from authproxy.policy.model import Policy
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
    out.extend((k.encode(), v.encode()) for k, v in identity_headers(decision))
    return out


def client_may_not_send(name: str, strip: StripHeaders) -> bool:
    """The strip rule for a request header `name` (lower case), `authorization` aside: an
    identity header, or one the policy's `strip_headers` removes."""
    return is_identity_header(name) or strip.matches(name)


def _dropped(k: str, keep_token: bool, strip: StripHeaders) -> bool:
    return (
        k in RELAY_HOP_BY_HOP
        or k[:1] == ":"
        or (k == AUTHORIZATION and not keep_token)
        or client_may_not_send(k, strip)
    )


def identity_headers(decision: Decision) -> tuple[tuple[str, str], ...]:
    """The inject rule: the headers an allowed call carries to the backend — the
    verified identity's, and the client certificate's principal."""
    headers = decision.identity.headers if decision.identity is not None else ()
    if decision.principal is not None:
        headers = (*headers, (PEER, decision.principal))
    return headers


def names_set_by(policy: Policy) -> frozenset[str]:
    """Every header name the proxy may set under `policy` (the built-in identity headers
    and the policy's `claim_headers`): removed from a call that does not set it."""
    return BUILTIN_HEADERS.union(name for name, _ in policy.claim_headers)
