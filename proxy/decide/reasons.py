"""Why a request was denied: machine-readable reasons and the gRPC status each maps to.

Every deny carries one `Reason`. Front ends translate it: the gRPC sidecar puts it in a
`google.rpc.ErrorInfo` inside `grpc-status-details-bin`; the Envoy ext_authz front ends
map the same reason to an HTTP status (see `ext_authz/answer.py`). The reason strings are part of the public contract.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import grpc

#: `ErrorInfo.domain` of every reason this proxy emits.
ERROR_DOMAIN = "authproxy"


class Reason(StrEnum):
    # The caller is not authenticated (gRPC UNAUTHENTICATED).
    TOKEN_MISSING = "TOKEN_MISSING"
    TOKEN_MALFORMED = "TOKEN_MALFORMED"
    TOKEN_TOO_LARGE = "TOKEN_TOO_LARGE"
    TOKEN_AMBIGUOUS = "TOKEN_AMBIGUOUS"  # more than one authorization header
    ALGORITHM_NOT_ALLOWED = "ALGORITHM_NOT_ALLOWED"
    KEY_NOT_FOUND = "KEY_NOT_FOUND"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    TOKEN_NOT_YET_VALID = "TOKEN_NOT_YET_VALID"
    MISSING_CLAIM = "MISSING_CLAIM"
    INVALID_CLAIM = "INVALID_CLAIM"
    WRONG_TOKEN_TYPE = "WRONG_TOKEN_TYPE"
    WRONG_AUDIENCE = "WRONG_AUDIENCE"
    WRONG_ISSUER = "WRONG_ISSUER"
    TOKEN_REVOKED = "TOKEN_REVOKED"  # its jti, or its subject before its iat, was revoked
    REFRESH_REUSED = "REFRESH_REUSED"  # a single-use token presented a second time
    # The caller is authenticated but not allowed (gRPC PERMISSION_DENIED).
    INSUFFICIENT_ROLE = "INSUFFICIENT_ROLE"
    INSUFFICIENT_PERMISSION = "INSUFFICIENT_PERMISSION"
    INSUFFICIENT_SCOPE = "INSUFFICIENT_SCOPE"
    # A rule's `when:` conditions: a claim without the value asked for, or a request header
    # that is not the claim it is bound to.
    CLAIM_MISMATCH = "CLAIM_MISMATCH"
    HEADER_MISMATCH = "HEADER_MISMATCH"
    # A rule's `request:` fields: a field of the request message is not the caller's claim
    # (or the message cannot be read); the proxy cannot read fields yet (UNAVAILABLE).
    FIELD_MISMATCH = "FIELD_MISMATCH"
    FIELDS_UNAVAILABLE = "FIELDS_UNAVAILABLE"
    METHOD_DENIED = "METHOD_DENIED"
    METHOD_MALFORMED = "METHOD_MALFORMED"
    # The rule names the peers (client certificates) it accepts; this one is not among them.
    PEER_NOT_ALLOWED = "PEER_NOT_ALLOWED"
    # An open stream that a newly loaded policy version would refuse.
    POLICY_CHANGED = "POLICY_CHANGED"
    # The request itself cannot be judged (gRPC INVALID_ARGUMENT): a path with dot
    # segments or encoded slashes, or an ext_authz check without HTTP attributes.
    REQUEST_MALFORMED = "REQUEST_MALFORMED"
    # Too many calls for the rule's rate limit (gRPC RESOURCE_EXHAUSTED, HTTP 429).
    RATE_LIMITED = "RATE_LIMITED"
    # Shared state (revocation, single use, rate limits) cannot be consulted: fail closed
    # (UNAVAILABLE).
    STATE_UNAVAILABLE = "STATE_UNAVAILABLE"
    # The verification keys a token needs cannot be had: the remote key set has never
    # loaded (identity provider down at start): fail closed (UNAVAILABLE).
    KEYS_UNAVAILABLE = "KEYS_UNAVAILABLE"

    @property
    def status(self) -> grpc.StatusCode:
        return _STATUS.get(self, grpc.StatusCode.UNAUTHENTICATED)


#: Denies for a requirement or condition of the rule that the caller did not meet (roles,
#: permissions, scopes, `when:`, `request:`): their messages are worded from the policy
#: alone, naming claims, headers and fields, never their values.
UNMET = frozenset(
    (
        Reason.INSUFFICIENT_ROLE,
        Reason.INSUFFICIENT_PERMISSION,
        Reason.INSUFFICIENT_SCOPE,
        Reason.CLAIM_MISMATCH,
        Reason.HEADER_MISMATCH,
        Reason.FIELD_MISMATCH,
    )
)

_STATUS = {
    r: grpc.StatusCode.PERMISSION_DENIED
    for r in (
        *UNMET,
        Reason.METHOD_DENIED,
        Reason.METHOD_MALFORMED,
        Reason.POLICY_CHANGED,
        Reason.PEER_NOT_ALLOWED,
    )
}
_STATUS[Reason.REQUEST_MALFORMED] = grpc.StatusCode.INVALID_ARGUMENT
_STATUS[Reason.RATE_LIMITED] = grpc.StatusCode.RESOURCE_EXHAUSTED
_STATUS[Reason.STATE_UNAVAILABLE] = grpc.StatusCode.UNAVAILABLE
_STATUS[Reason.KEYS_UNAVAILABLE] = grpc.StatusCode.UNAVAILABLE
_STATUS[Reason.FIELDS_UNAVAILABLE] = grpc.StatusCode.UNAVAILABLE


class Denied(Exception):
    """Raised inside the pipeline to stop with a reason; never escapes `Authorizer.decide`."""

    def __init__(self, reason: Reason, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        #: Seconds after which the same call may succeed (rate limits).
        self.retry_after = retry_after


def shown(value: Any, limit: int = 64) -> str:
    """`repr(value)`, cut to `limit` characters: deny messages never echo attacker input
    at length (trailers have size limits, and logs should stay readable)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
