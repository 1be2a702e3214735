"""What the client library's tests share: server interceptors that record what reaches
the example backend or make some of its methods fail for a while, policies that forward
tokens to it or limit RefreshToken, token minting, and a proxy restarted on its port."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import grpc

from authproxy.keys.issuer import TokenIssuer
from examples.backend.api.v1 import api_pb2
from tests.support.example_backend import (
    ADMIN_ENV,
    ADMIN_SECRET,
    PASSWORD,
    POLICY,
    REFRESH_ENV,
    Proxied,
    decoded,
)
from tests.support.running_proxy import RunningProxy, start_proxy

REFRESH = "/api.v1.AuthService/RefreshToken"
GET_PROFILE = "/api.v1.UserService/GetProfile"


class Recorder(grpc.aio.ServerInterceptor):
    """Every call that reaches the backend: (method, its metadata)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[tuple[str, str | bytes], ...]]] = []

    async def intercept_service(self, continuation, handler_call_details):
        details = handler_call_details
        self.calls.append((details.method, tuple(details.invocation_metadata or ())))
        return await continuation(details)

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.calls if m == method)


class Outage(grpc.aio.ServerInterceptor):
    """Makes `method` fail at the backend with UNAVAILABLE while `down` is true (a part of
    the backend restarting); `failures` counts the calls it failed."""

    def __init__(self, method: str, down: bool = True, failures_left: int | None = None) -> None:
        self.method = method
        self.down = down
        #: None: every call while down; a number: that many calls, then up again.
        self.failures_left = failures_left
        self.failures = 0

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method != self.method or not self.down:
            return await continuation(handler_call_details)
        self.failures += 1
        if self.failures_left is not None:
            self.failures_left -= 1
            self.down = self.failures_left > 0
        return grpc.unary_unary_rpc_method_handler(_unavailable)


async def _unavailable(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, "the service is restarting")


def forwarding_policy(tmp_path: Path, leeway: str = "30s", refresh_limit: str = "") -> Path:
    """policy.yaml with `forward_token: true` (the backend sees each call's authorization
    header, so a test can check which token reached which method) and `leeway`;
    `refresh_limit`: RefreshToken's rate limit per session instead of 10/hour."""
    text = POLICY.read_text()
    assert "\nleeway: 30s" in text
    text = text.replace("\nleeway: 30s", f"\nleeway: {leeway}\nforward_token: true", 1)
    if refresh_limit:
        assert "rate_limit: {limit: 10/hour, key: sid}" in text
        text = text.replace("{limit: 10/hour,", f"{{limit: {refresh_limit},", 1)
    path = tmp_path / "policy" / "forwarding.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


class ManualClock:
    """A client clock that stands still until a test moves it (`advance`): a `TokenStore`
    on it sees time pass only when the test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def sent_token(metadata: tuple[tuple[str, Any], ...]) -> str | None:
    values = [v for k, v in metadata if k == "authorization"]
    assert len(values) <= 1, values
    return values[0].removeprefix("Bearer ") if values else None


def short_access(
    proxied: Proxied, access_token: str, ttl: float, lifetime: float | None = None
) -> str:
    """An access token like `access_token` (same subject, roles, session) that expires in
    `ttl` seconds (negative: already expired), minted with the backend's own key.

    `lifetime`: its `exp - iat` (default: `access_token`'s), so the token is one near the
    end of a life as long as the backend gives, issued `lifetime - ttl` seconds ago."""
    claims = decoded(access_token)
    lifetime = claims["exp"] - claims["iat"] if lifetime is None else lifetime
    backend = proxied.example.backend.auth.tokens.issuer
    issued = time.time() + ttl - lifetime
    issuer = TokenIssuer(backend.policy, backend.keys, clock=lambda: issued)
    return issuer.mint(
        "access",
        claims["sub"],
        ttl=lifetime,
        roles=claims.get("roles", []),
        permissions=claims.get("permissions", []),
        scopes=claims.get("scope"),
        extra={"sid": claims["sid"]},
    ).token


def target(proxied: Proxied) -> str:
    assert proxied.proxy.sidecar is not None
    return f"127.0.0.1:{proxied.proxy.sidecar.port}"


async def signed_up(proxied: Proxied, email: str, enable_2fa: bool = False) -> Any:
    request = api_pb2.SignUpRequest(email=email, password=PASSWORD, enable_2fa=enable_2fa)
    return await proxied.auth.SignUp(request)


async def restarted(proxied: Proxied, port: int) -> RunningProxy:
    """The proxy of `proxied`, stopped before, started again with the same configuration
    and secrets, listening on `port` (its old one). The caller stops it."""
    assert proxied.running.stopped
    cfg = dataclasses.replace(proxied.proxy.cfg, listen=f"127.0.0.1:{port}")
    refresh_key = proxied.example.backend.auth.tokens.issuer.keys["refresh"].key
    env = {REFRESH_ENV: refresh_key.decode(), ADMIN_ENV: ADMIN_SECRET}
    return await start_proxy(cfg, env=env)


def profiles_from_threads(channel: grpc.Channel, calls: int) -> set[str]:
    """`calls` GetProfile calls at once from as many threads on `channel`: the user ids
    they answered."""
    from concurrent.futures import ThreadPoolExecutor

    from examples.backend.api.v1 import api_pb2_grpc

    users = api_pb2_grpc.UserServiceStub(channel)
    with ThreadPoolExecutor(max_workers=calls) as pool:
        futures = [pool.submit(users.GetProfile, api_pb2.GetProfileRequest()) for _ in range(calls)]
        return {f.result().user_id for f in futures}
