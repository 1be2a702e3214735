"""Client interceptors that attach, for each method, the token its policy level needs.

For every call the policy (the same file the proxy enforces) gives the method's level:
`public` and `deny` methods get no token; `2fa`, `refresh` and `access` methods get the
session's token of that kind, and none held is a `NoTokenError` before anything is sent.
An access token within the refresh skew of its expiry is refreshed first (one refresh for
all concurrent calls). A unary call the proxy refuses with TOKEN_EXPIRED is refreshed
and sent once more; a streaming call is not (messages may already have been exchanged:
the error reaches the caller, and the next call refreshes).

A call that already carries an `authorization` header is left as it is: the caller chose
its credentials.

`aio_interceptors(...)` gives the four grpc.aio interceptors (grpc.aio needs one object
per call kind); `SyncInterceptor` serves all four kinds on `grpc.intercept_channel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import grpc

from authproxy.decide.bearer import AUTHORIZATION
from authproxy.policy.model import ACCESS, DENY, PUBLIC, REFRESH, TWO_FA

from .errors import NoTokenError, is_token_expired
from .levels import MethodLevels
from .refresh import AsyncRefreshCall, Refresher, SyncRefreshCall
from .tokens import StoredToken, TokenStore

_HINTS = {
    TWO_FA: "log in first: login() keeps the 2FA token when the account has two-factor auth",
    REFRESH: "log in first",
    ACCESS: "log in first",
}


class TokenChooser:
    """Which token a method gets: the policy's level, then the store (and the refresher)."""

    def __init__(self, levels: MethodLevels, store: TokenStore, refresher: Refresher) -> None:
        self.levels = levels
        self.store = store
        self.refresher = refresher

    def level(self, method: str) -> str:
        return self.levels.level(method)

    def held(self, method: str, level: str) -> StoredToken | None:
        """The token for a level, without refreshing; None when the level needs none, or
        when it is an access token that must be refreshed first."""
        if level in (PUBLIC, DENY):
            return None
        if level == ACCESS:
            token = self.refresher.fresh()
            if token is None and self.store.get(ACCESS) is None and self.store.get(REFRESH) is None:
                raise NoTokenError(method, level, _HINTS[level])
            return token
        token = self.store.get(level)
        if token is None:
            raise NoTokenError(method, level, _HINTS[level])
        return token

    def token(self, method: str, level: str, refresh: SyncRefreshCall) -> StoredToken | None:
        token = self.held(method, level)
        if token is None and level == ACCESS:
            token = self.refresher.refresh(self.store.get(ACCESS), refresh)
        return token

    async def token_async(
        self, method: str, level: str, refresh: AsyncRefreshCall
    ) -> StoredToken | None:
        token = self.held(method, level)
        if token is None and level == ACCESS:
            token = await self.refresher.refresh_async(self.store.get(ACCESS), refresh)
        return token


def method_name(details: grpc.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


def has_authorization(metadata: Any) -> bool:
    return any(key.lower() == AUTHORIZATION for key, _ in metadata or ())


def with_token(metadata: Any, token: StoredToken) -> list[tuple[str, str | bytes]]:
    return [*(metadata or ()), (AUTHORIZATION, f"Bearer {token.value}")]


# --- grpc.aio ---------------------------------------------------------------------------


class _AioBase:
    def __init__(self, chooser: TokenChooser, refresh: AsyncRefreshCall) -> None:
        self.chooser = chooser
        self.refresh = refresh

    async def _prepare(
        self, details: grpc.aio.ClientCallDetails
    ) -> tuple[grpc.aio.ClientCallDetails, str, StoredToken | None]:
        method = method_name(details)
        if has_authorization(details.metadata):
            return details, PUBLIC, None
        level = self.chooser.level(method)
        token = await self.chooser.token_async(method, level, self.refresh)
        return _aio_details(details, token), level, token


def _aio_details(
    details: grpc.aio.ClientCallDetails, token: StoredToken | None
) -> grpc.aio.ClientCallDetails:
    if token is None:
        return details
    metadata = grpc.aio.Metadata(*with_token(details.metadata, token))
    return details._replace(metadata=metadata)  # type: ignore[attr-defined]


class AioUnaryUnary(_AioBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[override]
        details, level, token = await self._prepare(client_call_details)
        call = await continuation(details, request)
        if level != ACCESS or token is None:
            return call
        try:
            await call
        except grpc.aio.AioRpcError as error:
            if is_token_expired(error):
                fresh = await self.chooser.refresher.refresh_async(token, self.refresh)
                return await continuation(_aio_details(client_call_details, fresh), request)
        return call


class AioUnaryStream(_AioBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[override]
        details, _, _ = await self._prepare(client_call_details)
        return await continuation(details, request)


class AioStreamUnary(_AioBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[override]
        details, _, _ = await self._prepare(client_call_details)
        return await continuation(details, request_iterator)


class AioStreamStream(_AioBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[override]
        details, _, _ = await self._prepare(client_call_details)
        return await continuation(details, request_iterator)


def aio_interceptors(
    chooser: TokenChooser, refresh: AsyncRefreshCall
) -> Sequence[grpc.aio.ClientInterceptor]:
    """The interceptors for `grpc.aio.insecure_channel(..., interceptors=...)`."""
    return [
        kind(chooser, refresh)
        for kind in (AioUnaryUnary, AioUnaryStream, AioStreamUnary, AioStreamStream)
    ]


# --- sync channels ----------------------------------------------------------------------


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _SyncDetails(_Details, grpc.ClientCallDetails):
    pass


class SyncInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """For `grpc.intercept_channel(channel, SyncInterceptor(...))`; thread-safe."""

    def __init__(self, chooser: TokenChooser, refresh: SyncRefreshCall) -> None:
        self.chooser = chooser
        self.refresh = refresh

    def _prepare(self, details: grpc.ClientCallDetails) -> tuple[Any, str, StoredToken | None]:
        method = method_name(details)
        if has_authorization(details.metadata):
            return details, PUBLIC, None
        level = self.chooser.level(method)
        token = self.chooser.token(method, level, self.refresh)
        return _sync_details(details, token), level, token

    def intercept_unary_unary(self, continuation, client_call_details, request):
        details, level, token = self._prepare(client_call_details)
        outcome = continuation(details, request)
        if level == ACCESS and token is not None and is_token_expired(outcome.exception()):
            fresh = self.chooser.refresher.refresh(token, self.refresh)
            outcome = continuation(_sync_details(client_call_details, fresh), request)
        return outcome

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._prepare(client_call_details)[0], request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._prepare(client_call_details)[0], request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._prepare(client_call_details)[0], request_iterator)


def _sync_details(details: grpc.ClientCallDetails, token: StoredToken | None) -> Any:
    if token is None:
        return details
    return _SyncDetails(
        details.method,
        details.timeout,
        with_token(details.metadata, token),
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )
