"""What the client library raises, and how it reads the proxy's reason from a gRPC error.

    ClientAuthError            everything the library raises itself
    ├── LoginRequiredError     log in (again): the session holds no usable token
    │   └── NoTokenError       ... and so nothing was sent (a call or `refresh()`
    │                          before login, or after logout)
    └── RefreshError           the refresh failed for a passing reason: tokens kept

`except LoginRequiredError` therefore also catches `NoTokenError`: both mean "show the
login screen".
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from authproxy.decide.reasons import ERROR_DOMAIN, Reason
from authproxy.wire.grpc_status import DETAILS_KEY

_TOKEN_EXPIRED = Reason.TOKEN_EXPIRED.value


class ClientAuthError(Exception):
    """Raised by the client library itself, before or instead of a call."""


class LoginRequiredError(ClientAuthError):
    """The session's tokens are gone (refresh refused, or no refresh token left): the user
    must log in again. The session holds no tokens any more."""


class NoTokenError(LoginRequiredError):
    """The method needs a token the session does not hold (not logged in yet, or logged
    out): nothing was sent. Raised for a call before login and for `refresh()` before
    login alike; a `LoginRequiredError`, so either `except` catches it."""

    def __init__(self, method: str, level: str, hint: str) -> None:
        """`method`: the path that needed the token; `level`: its level; `hint`: what to
        do about it."""
        super().__init__(
            f"{method} needs a token of level {str(level)!r} and this session holds none: {hint}"
        )
        self.method = method
        self.level = level


class RefreshError(ClientAuthError):
    """The refresh call failed for a reason that is not about the tokens (the proxy or
    backend unreachable, a timeout, a rate limit): the tokens are kept, so a later call
    tries again."""


def denial_reason(error: grpc.RpcError) -> str | None:
    """The proxy's machine-readable reason (`TOKEN_EXPIRED`, ...) from the error's
    `grpc-status-details-bin`; `domain/REASON` for another domain's ErrorInfo; None when
    there is none (for example, when the backend answered)."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:
            return None  # not a google.rpc.Status: no reason to read
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return (
                    info.reason if info.domain == ERROR_DOMAIN else f"{info.domain}/{info.reason}"
                )
    return None


def is_token_expired(error: BaseException | None) -> bool:
    """A call the proxy refused because its token had expired."""
    return (
        isinstance(error, grpc.RpcError)
        and error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        and denial_reason(error) == _TOKEN_EXPIRED
    )
