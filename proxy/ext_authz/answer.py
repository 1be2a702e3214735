"""The Envoy ext_authz contract, shared by the gRPC (`ext_authz/grpc_check.py`) and HTTP
(`ext_authz/http_check.py`) front ends: what a request looks like, and what Envoy is told.

Allow (`Allow`): the identity headers are *set* on the upstream request (overwrite, never
append); every other identity header name — the ones this policy can set, plus every
`x-auth-*` the client sent — the policy's `strip_headers` (every exact name, seen or not,
and the names the client sent that a prefix matches) and `authorization` (unless the rule
forwards it) are removed. Envoy applies removals after sets, so a removed name is never
one we set.

Deny (`Deny`): 401 with an RFC 6750 `www-authenticate` challenge when the caller is not
authenticated, 403 when it is not allowed, 400 for a request that cannot be judged, 429
when rate limited; a JSON body `{"error", "reason", "message"}`. For a gRPC request the
reply also carries `grpc-status`, `grpc-status-details-bin` (the same ErrorInfo as the
sidecar) and a plain-text body, which Envoy turns into `grpc-message`.

Both carry `metadata` for Envoy's dynamic metadata (namespace
`envoy.filters.http.ext_authz`): the decision, and on allow the verified claims.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote

import grpc

from authproxy.decide.auth_headers import client_may_not_send, identity_headers, names_set_by
from authproxy.decide.bearer import AUTHORIZATION
from authproxy.decide.decision import Decision
from authproxy.decide.identity import Identity
from authproxy.decide.pipeline import Authorizer
from authproxy.decide.reasons import Denied, Reason
from authproxy.decide.request_fields import MAX_UNCOMPRESSED, field_check
from authproxy.policy.model import Policy
from authproxy.policy.strip_headers import StripHeaders
from authproxy.wire.grpc_protocol import MessageReader
from authproxy.wire.grpc_status import DETAILS_KEY, deny_details
from authproxy.wire.message_types import MessageTypes

Headers = tuple[tuple[str, str], ...]
T = TypeVar("T")

GRPC_CONTENT_TYPE = "application/grpc"
WWW_AUTHENTICATE = "www-authenticate"
RETRY_AFTER = "retry-after"

HTTP_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
_INSUFFICIENT = (
    Reason.INSUFFICIENT_ROLE,
    Reason.INSUFFICIENT_PERMISSION,
    Reason.INSUFFICIENT_SCOPE,
)
# RFC 6750 3: error_description is %x20-21 / %x23-5B / %x5D-7E (no quote, no backslash).
_NOT_DESCRIPTION_SAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
# gRPC percent-encodes grpc-message: everything but printable ASCII, and "%" itself.
_GRPC_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class CheckRequest(NamedTuple):
    """What both front ends extract from Envoy: method, path (query kept), headers, and
    the client's address (for rate limits keyed by `peer`), and the client certificate's
    identity when Envoy verified one (for `peers:`)."""

    method: str
    path: str
    headers: Headers
    peer: str | None = None
    principal: str | None = None
    #: The request body Envoy sent (`with_request_body`, `pack_as_bytes`); None: none.
    body: bytes | None = None

    @property
    def grpc(self) -> bool:
        """A gRPC request (`is_grpc`)."""
        return is_grpc(self.headers)


def is_grpc(headers: Headers) -> bool:
    """A gRPC request: its content-type is `application/grpc` or `application/grpc+...`."""
    for key, value in headers:
        if len(key) == 12 and key.lower() == "content-type":
            return value.lower().startswith(GRPC_CONTENT_TYPE)
    return False


@dataclass(frozen=True, slots=True)
class Allow:
    headers: Headers  # set (overwrite) on the upstream request
    remove: tuple[str, ...]  # removed from the upstream request
    metadata: dict[str, Any]
    #: Front ends keep their rendering of this answer here (`rendered_as`).
    rendered: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def rendered_as(self, front_end: str, render: Callable[[Allow], T]) -> T:
        """This allow as `front_end` renders it: made once, then kept with the allow, which
        equal requests share (`allow_for`). The rendering must never be mutated."""
        found = self.rendered.get(front_end)
        if found is None:
            found = self.rendered[front_end] = render(self)
        return found


@dataclass(frozen=True, slots=True)
class Deny:
    status: int  # HTTP
    grpc_code: int
    message: str  # "REASON: what the request needs"
    headers: Headers  # for the client
    body: str
    metadata: dict[str, Any]


class Allows:
    """The `Allow`s one front end hands out, shared between equal requests (same identity,
    rule, policy version, principal and headers to remove), and the request header names
    it has classified for the current policy's `strip_headers`. Bounded: each starts over
    when full, since header names and odd header sets come from clients."""

    LIMIT = 4096

    def __init__(self) -> None:
        self.answers: dict[tuple, tuple[Identity | None, Allow]] = {}
        self._kinds_of: StripHeaders | None = None
        self._kinds: dict[str, str | bool] = {}

    def kinds(self, strip: StripHeaders) -> dict[str, str | bool]:
        """Header names classified for `strip` (a new policy's forgets the last one's)."""
        if self._kinds_of is not strip:
            self._kinds_of, self._kinds = strip, {}
        elif len(self._kinds) >= self.LIMIT:
            self._kinds = {}
        return self._kinds

    def remember(self, key: tuple, identity: Identity | None, allow: Allow) -> None:
        if len(self.answers) >= self.LIMIT:
            self.answers.clear()
        self.answers[key] = (identity, allow)


async def answer(
    authorizer: Authorizer,
    request: CheckRequest,
    allows: Allows,
    types: MessageTypes | None = None,
    decide_http: Callable[..., Awaitable[Decision]] | None = None,
) -> Allow | Deny:
    """Decide an Envoy check and translate the decision (the gRPC front end's path; the
    HTTP front end takes the same steps inline, `CheckHttpServer.check`). `types`: request
    message types, for rules that check request fields in the body Envoy sends;
    `decide_http`: the front end's `Authorizer.decide_http` (traced, with tracing on)."""
    policy = authorizer.policy  # one snapshot: the reply's header names match the decision
    grpc = request.grpc
    decide = authorizer.decide_http if decide_http is None else decide_http
    decision = await decide(
        request.method, request.path, request.headers, grpc, policy, request.peer, request.principal
    )
    if decision.allowed and decision.rule.request is not None:
        decision = check_body(authorizer, decision, request, types)
    if not decision.allowed:
        return deny_for(decision, grpc)
    return allow_for(decision, request.headers, policy, allows)


def refuse(authorizer: Authorizer, request: CheckRequest, message: str) -> Deny:
    """The answer to a check that cannot be judged at all (REQUEST_MALFORMED)."""
    decision = authorizer.malformed(request.path[:256] or "<check>", message)
    return deny_for(decision, request.grpc)


def allow_for(decision: Decision, headers: Headers, policy: Policy, allows: Allows) -> Allow:
    """The `Allow` of an allowed decision for a request with `headers`.

    An allow depends only on the identity, the rule, the policy version and which headers
    must go, so equal inputs share one `Allow` from `allows` (and the front ends' rendering
    of it).
    """
    strip = policy.strip_headers
    kinds = allows.kinds(strip)
    incoming: list[str] = []
    authorization = False
    for name, _ in headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _classify(name, strip, kinds)
        if kind is True:
            authorization = True
        elif kind:
            incoming.append(kind)
    if authorization and decision.forward_token:
        authorization = False  # the rule forwards it
    identity = decision.identity
    key: tuple = (
        id(identity), decision.rule.pattern, decision.policy_version, decision.principal,
        authorization,
    )  # fmt: skip
    if incoming:
        key = (*key, *sorted(incoming))
    found = allows.answers.get(key)
    allow = found[1] if found is not None and found[0] is identity else None
    if allow is None:
        names = set(names_set_by(policy)).union(incoming, strip.names)
        if authorization:
            names.add(AUTHORIZATION)
        headers = identity_headers(decision)
        names.difference_update(name for name, _ in headers)
        allow = _allow(decision, headers, tuple(sorted(names)))
        allows.remember(key, identity, allow)
    return allow


def _classify(name: str, strip: StripHeaders, kinds: dict[str, str | bool]) -> str | bool:
    """What a request header name means for an allow: the lowercase name when it must be
    removed although the allow's fixed set does not name it (an identity header the client
    sent; a `strip_headers` prefix or `_` spelling match), True for `authorization`
    (removed unless the rule forwards it), False for anything else. Remembered in `kinds`."""
    lower = name.lower()
    kind: str | bool
    # Names in `strip.names` are in every allow's set already.
    if lower not in strip.names and client_may_not_send(lower, strip):
        kind = lower
    else:
        kind = lower == AUTHORIZATION
    kinds[name] = kind
    return kind


def _allow(
    decision: Decision, headers: tuple[tuple[str, str], ...], remove: tuple[str, ...]
) -> Allow:
    identity = decision.identity
    metadata: dict[str, Any] = _decision_metadata(decision)
    if identity is not None:
        metadata.update(
            subject=identity.subject,
            token_type=identity.token_type,
            roles=list(identity.roles),
            permissions=list(identity.permissions),
            scopes=list(identity.scopes),
            claims=identity.claims,
        )
    return Allow(headers, remove, metadata)


def deny_for(decision: Decision, grpc: bool) -> Deny:
    """The `Deny` of a refused decision; `grpc`: the request is a gRPC call."""
    reason = decision.reason
    assert reason is not None
    status = HTTP_STATUS.get(decision.status, 403)
    headers: list[tuple[str, str]] = []
    description = _NOT_DESCRIPTION_SAFE.sub("?", decision.message)[:256]
    if status == 401:
        # RFC 6750 3.1: no error code when the request has no credentials at all.
        challenge = (
            "Bearer"
            if reason is Reason.TOKEN_MISSING
            else f'Bearer error="invalid_token", error_description="{description}"'
        )
        headers.append((WWW_AUTHENTICATE, challenge))
    elif reason in _INSUFFICIENT:
        headers.append(
            (
                WWW_AUTHENTICATE,
                f'Bearer error="insufficient_scope", error_description="{description}"',
            )
        )
    if decision.retry_after is not None:  # RFC 9110 10.2.3: whole seconds
        headers.append((RETRY_AFTER, str(max(1, math.ceil(decision.retry_after)))))
    message, trailers = deny_details(decision)
    code = decision.status.value[0]
    if grpc:
        headers.append(("grpc-status", str(code)))
        headers.append(("grpc-message", quote(message, safe=_GRPC_MESSAGE_SAFE)))
        headers.append((DETAILS_KEY, base64.b64encode(trailers[0][1]).decode().rstrip("=")))
        # Envoy turns the body into grpc-message and the content-type into application/grpc.
        headers.append(("content-type", "text/plain; charset=utf-8"))
        body = message
    else:
        headers.append(("content-type", "application/json"))
        body = json.dumps(
            {
                "error": decision.status.name.lower(),
                "reason": reason.value,
                "message": decision.message,
            }
        )
    metadata = _decision_metadata(decision)
    metadata["reason"] = reason.value
    return Deny(status, code, message, tuple(headers), body, metadata)


def _decision_metadata(decision: Decision) -> dict[str, Any]:
    return {
        "decision": "allow" if decision.allowed else "deny",
        "level": decision.level,
        "rule": decision.rule.pattern,
        "policy_version": decision.policy_version,
    }


def check_body(
    authorizer: Authorizer, decision: Decision, request: CheckRequest, types: MessageTypes | None
) -> Decision:
    """An allowed decision whose rule checks request fields, judged on the gRPC messages
    in the body Envoy sent: the same decision, or the deny (`Authorizer.refuse_later`)."""
    try:
        fields = field_check(decision, types)
        if fields is None:
            return decision
        body = request.body
        if not body:
            raise Denied(
                Reason.FIELDS_UNAVAILABLE,
                "Envoy sent no request body: configure ext_authz with_request_body"
                " (pack_as_bytes: true) for this route",
            )
        reader = MessageReader()
        messages, _ = reader.feed(body)
        if reader.held or not messages:
            raise Denied(
                Reason.FIELD_MISMATCH,
                "the request body ends inside a message (raise with_request_body"
                " max_request_bytes, or the message is malformed)",
            )
        encoding = next((v for k, v in request.headers if k.lower() == "grpc-encoding"), None)
        for compressed, payload in messages:
            fields.check(
                compressed, payload, encoding and encoding.encode("latin-1"), MAX_UNCOMPRESSED
            )
    except Denied as denied:
        return authorizer.refuse_later(decision, denied)
    return decision
