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

`wait_for_ready`: when not None, the default for calls that do not set it themselves
(True: a call made while the channel is reconnecting waits for it, until its deadline,
instead of failing at once with UNAVAILABLE).

`aio_interceptors(...)` gives the four grpc.aio interceptors (grpc.aio needs one object
per call kind); `SyncInterceptor` serves all four kinds on `grpc.intercept_channel`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import grpc

from authproxy.decide.bearer import AUTHORIZATION

from .errors import NoTokenError, is_token_expired
from .levels import Level, MethodLevels
from .refresh import AsyncRefreshCall, Refresher, SyncRefreshCall
from .tokens import StoredToken, TokenStore

_HINTS = {
    Level.TWO_FA: "log in first: login() keeps the 2FA token when the account has 2FA",
    Level.REFRESH: "log in first",
    Level.ACCESS: "log in first",
}


class TokenChooser:
    """Which token a method gets: the policy's level, then the store (and the refresher)."""

    def __init__(self, levels: MethodLevels, store: TokenStore, refresher: Refresher) -> None:
        """`refresher` must refresh `store`'s access token."""
        self.levels = levels
        self.store = store
        self.refresher = refresher

    def level(self, method: str) -> Level:
        """The method's level in the policy."""
        return self.levels.level(method)

    def held(self, method: str, level: Level | str) -> StoredToken | None:
        """The token for a level, without refreshing; None when the level needs none, or
        when it is an access token that must be refreshed first. `NoTokenError` when the
        session holds nothing to send."""
        if level in (Level.PUBLIC, Level.DENY):
            return None
        if level == Level.ACCESS:
            token = self.refresher.fresh()
            if token is None and not self.store.logged_in:
                raise NoTokenError(method, level, _HINTS[Level.ACCESS])
            return token
        token = self.store.get(level)
        if token is None:
            raise NoTokenError(method, level, _HINTS[Level(level)])
        return token

    def token(
        self, method: str, level: Level | str, refresh: SyncRefreshCall
    ) -> StoredToken | None:
        """The token a call of `method` at `level` carries (None: none), refreshing the
        access token first when it is due (blocking; see `Refresher.access`)."""
        token = self.held(method, level)
        if token is None and level == Level.ACCESS:
            token = self.refresher.access(refresh)
        return token

    async def token_async(
        self, method: str, level: Level | str, refresh: AsyncRefreshCall
    ) -> StoredToken | None:
        """`token` for coroutines."""
        token = self.held(method, level)
        if token is None and level == Level.ACCESS:
            token = await self.refresher.access_async(refresh)
        return token


def _method_name(details: grpc.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


def _has_authorization(metadata: Any) -> bool:
    return any(key.lower() == AUTHORIZATION for key, _ in metadata or ())


def _with_token(metadata: Any, token: StoredToken) -> list[tuple[str, str | bytes]]:
    return [*(metadata or ()), (AUTHORIZATION, f"Bearer {token.value}")]


# --- grpc.aio ---------------------------------------------------------------------------


class _AioBase:
    def __init__(
        self, chooser: TokenChooser, refresh: AsyncRefreshCall, wait_for_ready: bool | None
    ) -> None:
        self.chooser = chooser
        self.refresh = refresh
        self.wait_for_ready = wait_for_ready

    def _ready(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        if self.wait_for_ready is None or details.wait_for_ready is not None:
            return details
        return details._replace(wait_for_ready=self.wait_for_ready)  # type: ignore[attr-defined]

    async def _prepare(
        self, details: grpc.aio.ClientCallDetails
    ) -> tuple[grpc.aio.ClientCallDetails, str, StoredToken | None]:
        method = _method_name(details)
        if _has_authorization(details.metadata):
            return details, Level.PUBLIC, None
        level = self.chooser.level(method)
        token = await self.chooser.token_async(method, level, self.refresh)
        return _aio_details(details, token), level, token


def _aio_details(
    details: grpc.aio.ClientCallDetails, token: StoredToken | None
) -> grpc.aio.ClientCallDetails:
    if token is None:
        return details
    metadata = grpc.aio.Metadata(*_with_token(details.metadata, token))
    return details._replace(metadata=metadata)  # type: ignore[attr-defined]


class _AioUnaryUnary(_AioBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[override]
        client_call_details = self._ready(client_call_details)
        details, level, token = await self._prepare(client_call_details)
        call = await continuation(details, request)
        if level != Level.ACCESS or token is None:
            return call
        try:
            await call
        except grpc.aio.AioRpcError as error:
            if is_token_expired(error):
                fresh = await self.chooser.refresher.refresh_async(token, self.refresh)
                return await continuation(_aio_details(client_call_details, fresh), request)
        return call


class _AioUnaryStream(_AioBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[override]
        details, _, _ = await self._prepare(self._ready(client_call_details))
        return await continuation(details, request)


class _AioStreamUnary(_AioBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[override]
        details, _, _ = await self._prepare(self._ready(client_call_details))
        return await continuation(details, request_iterator)


class _AioStreamStream(_AioBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[override]
        details, _, _ = await self._prepare(self._ready(client_call_details))
        return await continuation(details, request_iterator)


def aio_interceptors(
    chooser: TokenChooser, refresh: AsyncRefreshCall, wait_for_ready: bool | None = None
) -> Sequence[grpc.aio.ClientInterceptor]:
    """The interceptors for `grpc.aio.insecure_channel(..., interceptors=...)`; `refresh`
    calls the refresh method; `wait_for_ready`: the default for calls that set none."""
    return [
        kind(chooser, refresh, wait_for_ready)
        for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
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

    def __init__(
        self,
        chooser: TokenChooser,
        refresh: SyncRefreshCall,
        wait_for_ready: bool | None = None,
    ) -> None:
        """`refresh` calls the refresh method; `wait_for_ready`: the default for calls
        that set none."""
        self.chooser = chooser
        self.refresh = refresh
        self.wait_for_ready = wait_for_ready

    def _prepare(self, details: grpc.ClientCallDetails) -> tuple[Any, str, StoredToken | None]:
        method = _method_name(details)
        if _has_authorization(details.metadata):
            return _sync_details(details, None, self.wait_for_ready), Level.PUBLIC, None
        level = self.chooser.level(method)
        token = self.chooser.token(method, level, self.refresh)
        return _sync_details(details, token, self.wait_for_ready), level, token

    def intercept_unary_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Attach the token; refresh and send once more on TOKEN_EXPIRED."""
        details, level, token = self._prepare(client_call_details)
        outcome = continuation(details, request)
        if level == Level.ACCESS and token is not None and is_token_expired(outcome.exception()):
            fresh = self.chooser.refresher.refresh(token, self.refresh)
            again = _sync_details(client_call_details, fresh, self.wait_for_ready)
            outcome = continuation(again, request)
        return outcome

    def intercept_unary_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Attach the token."""
        return continuation(self._prepare(client_call_details)[0], request)

    def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        """Attach the token."""
        return continuation(self._prepare(client_call_details)[0], request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        """Attach the token."""
        return continuation(self._prepare(client_call_details)[0], request_iterator)


def _sync_details(
    details: grpc.ClientCallDetails, token: StoredToken | None, wait_for_ready: bool | None
) -> Any:
    ready = getattr(details, "wait_for_ready", None)
    if token is None and (wait_for_ready is None or ready is not None):
        return details
    return _SyncDetails(
        details.method,
        details.timeout,
        details.metadata if token is None else _with_token(details.metadata, token),
        details.credentials,
        wait_for_ready if ready is None else ready,
        getattr(details, "compression", None),
    )
