"""Sessions: a channel whose calls carry the right token, plus the login flow of the
example backend's auth API, `api.v1.AuthService` (Login → Verify2FA → RefreshToken →
Logout).

`AuthSession` is for sync channels (thread-safe); `AsyncAuthSession` for grpc.aio (one
event loop). Both take the method levels from the policy the proxy enforces, so the
client attaches exactly the token the proxy will ask for.

Their channels get `reconnect_options()` (retry UNAVAILABLE, reconnect within seconds
after a proxy restart) unless the caller's `options` set a service config of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import empty_pb2

from authproxy.decide.bearer import AUTHORIZATION

from . import auth_api_pb2 as api_pb2
from .channels import SERVICE_CONFIG, reconnect_options
from .errors import NoTokenError
from .interceptors import SyncInterceptor, TokenChooser, aio_interceptors
from .levels import Level, MethodLevels
from .refresh import DEFAULT_SKEW, Refresher
from .tokens import TokenStore

#: Seconds the session's own auth calls (login, refresh, ...) may take.
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class AuthMethods:
    """The auth calls the session makes (the example backend's `api.v1.AuthService`
    messages)."""

    login: str = "/api.v1.AuthService/Login"
    verify_2fa: str = "/api.v1.AuthService/Verify2FA"
    resend_code: str = "/api.v1.AuthService/ResendCode"
    refresh: str = "/api.v1.AuthService/RefreshToken"
    logout: str = "/api.v1.AuthService/Logout"


@dataclass(frozen=True)
class LoginResult:
    """What `login()` and `verify_2fa()` return."""

    #: True: the session holds a 2FA token; call `verify_2fa(code)` next.
    requires_2fa: bool
    #: Seconds the 2FA token (requires_2fa) or the access token is valid, per the server.
    expires_in: int


def _rpc(channel: Any, method: str, response: type) -> Any:
    return channel.unary_unary(
        method,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )


def _channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """`options`, plus those of `reconnect_options()` that `options` does not set; none
    of them when `options` has a service config of its own (it decides about retries)."""
    names = {name for name, _ in options}
    if SERVICE_CONFIG in names:
        return list(options)
    return [*(o for o in reconnect_options() if o[0] not in names), *options]


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return ((AUTHORIZATION, f"Bearer {token}"),)


class _Session:
    """What both sessions share: the store, the refresher, and what a login answer means."""

    def __init__(
        self,
        target: str,
        levels: MethodLevels,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        skew: float = DEFAULT_SKEW,
        methods: AuthMethods = AuthMethods(),
        store: TokenStore | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        wait_for_ready: bool | None = None,
    ) -> None:
        """`credentials`: TLS (None: plaintext h2c, as to a sidecar on loopback);
        `options`: the channel's (with `reconnect_options()` added unless they hold a
        `grpc.service_config`); `skew`: refresh when the access token has less than this
        many seconds left (at most a quarter of its lifetime); `store`: to share or
        restore tokens; `timeout`: of the session's own auth calls; `wait_for_ready`: the
        default of every call on `channel` that sets none (True: calls made while the
        proxy is unreachable wait for it, until their deadline)."""
        self.levels = levels
        self.methods = methods
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.store = store or TokenStore()
        self.refresher = Refresher(self.store, skew)
        self.chooser = TokenChooser(levels, self.store, self.refresher)
        self._open(target, credentials, _channel_options(options))

    def _open(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        raise NotImplementedError

    def _logged_in(self, answer: Any) -> LoginResult:
        if answer.requires_2fa:
            self.store.clear()
            self.store.set(Level.TWO_FA, answer.temp_token)
        else:
            self.store.set_pair(answer.access_token, answer.refresh_token)
        return LoginResult(answer.requires_2fa, answer.expires_in)

    def _verified(self, answer: Any) -> LoginResult:
        self.store.set_pair(answer.access_token, answer.refresh_token)
        return LoginResult(False, answer.expires_in)

    def _must_be_logged_in(self) -> None:
        if not self.logged_in:
            raise NoTokenError(self.methods.refresh, Level.REFRESH, "log in first")

    @property
    def logged_in(self) -> bool:
        """The session holds an access or a refresh token."""
        return self.store.logged_in


class AuthSession(_Session):
    """A sync session: `session.channel` is a `grpc.Channel` for your stubs."""

    def _open(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        if credentials is None:
            self._raw = grpc.insecure_channel(target, options=options)
        else:
            self._raw = grpc.secure_channel(target, credentials, options=options)
        interceptor = SyncInterceptor(self.chooser, self._refresh_call, self.wait_for_ready)
        self.channel = grpc.intercept_channel(self._raw, interceptor)

    def _refresh_call(self, refresh_token: str) -> tuple[str, str]:
        call = _rpc(self.channel, self.methods.refresh, api_pb2.TokenResponse)
        answer = call(
            api_pb2.RefreshTokenRequest(), metadata=_bearer(refresh_token), timeout=self.timeout
        )
        return answer.access_token, answer.refresh_token

    def login(self, email: str, password: str) -> LoginResult:
        """Log in with a password; keep the 2FA token (`requires_2fa`) or the pair."""
        call = _rpc(self.channel, self.methods.login, api_pb2.LoginResponse)
        request = api_pb2.LoginRequest(email=email, password=password)
        return self._logged_in(call(request, timeout=self.timeout))

    def verify_2fa(self, code: str) -> LoginResult:
        """Send the code with the 2FA token; keep the access and refresh tokens. The
        result says `requires_2fa=False` and the access token's `expires_in`."""
        call = _rpc(self.channel, self.methods.verify_2fa, api_pb2.TokenResponse)
        return self._verified(call(api_pb2.Verify2FARequest(code=code), timeout=self.timeout))

    def resend_code(self) -> str:
        """Ask for a new 2FA code (ResendCode, with the 2FA token); the server's message."""
        call = _rpc(self.channel, self.methods.resend_code, api_pb2.ResendCodeResponse)
        return call(api_pb2.ResendCodeRequest(), timeout=self.timeout).message

    def refresh(self) -> None:
        """Refresh now, whatever the access token's expiry. `NoTokenError` before login
        (as for a call), `LoginRequiredError` when refused, `RefreshError` when failed."""
        self._must_be_logged_in()
        self.refresher.refresh(self.store.get(Level.ACCESS), self._refresh_call)

    def logout(self, all_devices: bool = False) -> None:
        """Log out at the server, and forget every token (also when the call fails)."""
        call = _rpc(self.channel, self.methods.logout, empty_pb2.Empty)
        try:
            call(api_pb2.LogoutRequest(all_devices=all_devices), timeout=self.timeout)
        finally:
            self.store.clear()

    def close(self) -> None:
        """Close the channel."""
        self._raw.close()

    def __enter__(self) -> AuthSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAuthSession(_Session):
    """A grpc.aio session: `session.channel` is a `grpc.aio.Channel` for your stubs."""

    def _open(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        interceptors = aio_interceptors(self.chooser, self._refresh_call, self.wait_for_ready)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(
                target, options=options, interceptors=interceptors
            )
        else:
            self.channel = grpc.aio.secure_channel(
                target, credentials, options=options, interceptors=interceptors
            )

    async def _refresh_call(self, refresh_token: str) -> tuple[str, str]:
        call = _rpc(self.channel, self.methods.refresh, api_pb2.TokenResponse)
        answer = await call(
            api_pb2.RefreshTokenRequest(), metadata=_bearer(refresh_token), timeout=self.timeout
        )
        return answer.access_token, answer.refresh_token

    async def login(self, email: str, password: str) -> LoginResult:
        """Log in with a password; keep the 2FA token (`requires_2fa`) or the pair."""
        call = _rpc(self.channel, self.methods.login, api_pb2.LoginResponse)
        request = api_pb2.LoginRequest(email=email, password=password)
        return self._logged_in(await call(request, timeout=self.timeout))

    async def verify_2fa(self, code: str) -> LoginResult:
        """Send the code with the 2FA token; keep the access and refresh tokens. The
        result says `requires_2fa=False` and the access token's `expires_in`."""
        call = _rpc(self.channel, self.methods.verify_2fa, api_pb2.TokenResponse)
        answer = await call(api_pb2.Verify2FARequest(code=code), timeout=self.timeout)
        return self._verified(answer)

    async def resend_code(self) -> str:
        """Ask for a new 2FA code (ResendCode, with the 2FA token); the server's message."""
        call = _rpc(self.channel, self.methods.resend_code, api_pb2.ResendCodeResponse)
        return (await call(api_pb2.ResendCodeRequest(), timeout=self.timeout)).message

    async def refresh(self) -> None:
        """Refresh now, whatever the access token's expiry. `NoTokenError` before login
        (as for a call), `LoginRequiredError` when refused, `RefreshError` when failed."""
        self._must_be_logged_in()
        await self.refresher.refresh_async(self.store.get(Level.ACCESS), self._refresh_call)

    async def logout(self, all_devices: bool = False) -> None:
        """Log out at the server, and forget every token (also when the call fails)."""
        call = _rpc(self.channel, self.methods.logout, empty_pb2.Empty)
        try:
            await call(api_pb2.LogoutRequest(all_devices=all_devices), timeout=self.timeout)
        finally:
            self.store.clear()

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> AsyncAuthSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
