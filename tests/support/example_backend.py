"""The example backend for the tests: a real backend on loopback, called directly.

Each call carries the identity headers the proxy would set: `Example.md` verifies the token
with the product's verifier and builds the headers with the product's identity code, so
the tests also prove that every token the backend mints is one the proxy accepts.

`running_behind_proxy` adds the real proxy (sidecar and admin API, in this process) in
front of the backend, with the backend's `proxy_admin` pointing at the proxy's admin API:
the logout tests call through the proxy with bearer tokens.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from argon2 import PasswordHasher

from authproxy.decide.identity import identity_of
from authproxy.decide.request_fields import missing_types
from authproxy.keys.issuer import hmac_signing_key
from authproxy.keys.keygen import keygen
from authproxy.keys.keyset import KeySet, hmac_key, load_jwks_file
from authproxy.keys.verify import TokenVerifier, VerifiedToken
from authproxy.policy.loader import load_policy
from authproxy.policy.model import Policy
from authproxy.runtime.serve import AuthProxy, ConfigError, ServeConfig
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from examples.backend.passwords import Passwords
from examples.backend.server import Backend, BackendConfig, start_backend
from tests.support.running_proxy import RunningProxy, error_info, start_proxy
from tests.support.tokens import bearer
from tests.support.waits import poll

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "policy.yaml"
ADMIN_EMAIL = "admin@example.com"
PASSWORD = "correct horse battery"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
#: The proxy's admin API bearer secret in `running_behind_proxy`.
ADMIN_SECRET = "example-harness-admin-secret-0123456789"
REFRESH_ENV = "EXAMPLE_HARNESS_REFRESH_SECRET"
ADMIN_ENV = "EXAMPLE_HARNESS_ADMIN_TOKEN"


@dataclass
class Example:
    backend: Backend
    channel: grpc.aio.Channel
    auth: api_pb2_grpc.AuthServiceStub
    users: api_pb2_grpc.UserServiceStub
    data: api_pb2_grpc.DataServiceStub
    policy: Policy
    verifier: TokenVerifier

    def verify(self, token: str, level: str) -> VerifiedToken:
        return self.verifier.verify(token, self.policy.tokens[level], self.policy)

    def md(self, token: str, level: str = "access") -> tuple[tuple[str, str], ...]:
        """The identity headers the proxy sets for a verified `token` at `level`."""
        spec = self.policy.tokens[level]
        return identity_of(self.verify(token, level), spec, self.policy).headers

    async def signup(self, email: str, enable_2fa: bool = False, username: str = "") -> Any:
        request = api_pb2.SignUpRequest(
            email=email, password=PASSWORD, username=username, enable_2fa=enable_2fa
        )
        return await self.auth.SignUp(request)

    async def login(self, email: str, password: str = PASSWORD) -> Any:
        return await self.auth.Login(api_pb2.LoginRequest(email=email, password=password))

    async def account(self, email: str, username: str = "") -> tuple[str, Any]:
        """A new account without 2FA, logged in: (user id, LoginResponse)."""
        created = await self.signup(email, username=username)
        return created.user_id, await self.login(email)

    async def refresh(self, refresh_token: str) -> Any:
        md = self.md(refresh_token, "refresh")
        return await self.auth.RefreshToken(api_pb2.RefreshTokenRequest(), metadata=md)


@asynccontextmanager
async def running_example(
    tmp_path: Path, passwords: Passwords | None = None, **config: Any
) -> AsyncIterator[Example]:
    """The backend (admin: ADMIN_EMAIL) with keys in `tmp_path`, and a channel to it.

    `passwords`: instead of cheap Argon2 hashing; `config`: more BackendConfig fields
    (`proxy_admin`, `proxy_admin_token`, ...)."""
    secret = secrets.token_urlsafe(32).encode()
    async with _example(tmp_path, secret, config, passwords) as running:
        yield running


def cheap_hasher() -> PasswordHasher:
    """Cheap Argon2 parameters keep the tests fast; the CLI uses argon2-cffi's defaults."""
    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@asynccontextmanager
async def _example(
    tmp_path: Path,
    secret: bytes,
    fields: dict[str, Any],
    passwords: Passwords | None = None,
    policy_path: Path = POLICY,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> AsyncIterator[Example]:
    policy = load_policy(policy_path)
    signing_key = keygen("ES256", tmp_path / "signing.pem", tmp_path / "jwks.json")
    config = BackendConfig(
        policy=policy,
        signing_key=signing_key,
        refresh_key=hmac_signing_key(secret, "refresh-hmac"),
        admin_emails=frozenset({ADMIN_EMAIL}),
        **fields,
    )
    passwords = passwords or Passwords(cheap_hasher())
    backend = await start_backend(
        config, "127.0.0.1:0", passwords=passwords, interceptors=interceptors
    )
    keyset = KeySet(
        [
            *load_jwks_file(str(tmp_path / "jwks.json")),
            hmac_key(secret, "refresh-hmac", "env"),
        ]
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{backend.port}")
    try:
        yield Example(
            backend,
            channel,
            api_pb2_grpc.AuthServiceStub(channel),
            api_pb2_grpc.UserServiceStub(channel),
            api_pb2_grpc.DataServiceStub(channel),
            policy,
            TokenVerifier(keyset),
        )
    finally:
        await channel.close()
        await backend.stop(None)


@dataclass
class Proxied:
    """The example backend behind the real proxy; stubs call the PROXY (bearer tokens)."""

    example: Example  # the backend, called directly (with identity headers)
    running: RunningProxy
    auth: api_pb2_grpc.AuthServiceStub
    users: api_pb2_grpc.UserServiceStub
    data: api_pb2_grpc.DataServiceStub

    @property
    def proxy(self) -> AuthProxy:
        return self.running.proxy

    @property
    def channel(self) -> grpc.aio.Channel:
        assert self.running.channel is not None
        return self.running.channel

    @property
    def admin_url(self) -> str:
        return self.running.admin_base

    async def login(self, email: str, password: str = PASSWORD) -> Any:
        return await self.auth.Login(api_pb2.LoginRequest(email=email, password=password))

    async def account(self, email: str) -> tuple[str, Any]:
        """A new account without 2FA, logged in through the proxy: (user id, LoginResponse)."""
        created = await self.auth.SignUp(api_pb2.SignUpRequest(email=email, password=PASSWORD))
        return created.user_id, await self.login(email)

    async def profile(self, access_token: str) -> Any:
        """GetProfile through the proxy with `access_token`."""
        return await self.users.GetProfile(
            api_pb2.GetProfileRequest(), metadata=bearer(access_token)
        )

    async def logout(self, access_token: str, all_devices: bool = False) -> Any:
        request = api_pb2.LogoutRequest(all_devices=all_devices)
        return await self.auth.Logout(request, metadata=bearer(access_token))

    async def revocations(self) -> list[dict[str, Any]]:
        """The proxy's active revocations (GET /v1/revocations)."""
        headers = {"authorization": f"Bearer {ADMIN_SECRET}"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.admin_url}/v1/revocations", headers=headers) as response,
        ):
            assert response.status == 200, await response.text()
            return (await response.json())["revocations"]


@asynccontextmanager
async def running_behind_proxy(
    tmp_path: Path,
    admin_token: str | None = ADMIN_SECRET,
    backend_admin_token: str | None = ADMIN_SECRET,
    policy: Path = POLICY,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    **config: Any,
) -> AsyncIterator[Proxied]:
    """The backend and, in front of it, the proxy with its admin API on loopback.

    `admin_token`: the secret the admin API requires (None: none); `backend_admin_token`:
    the one the backend sends. The backend must know the admin API's address before the
    proxy (which needs the backend's) starts, so the admin port is picked free first.
    `policy`: the file both use (default policy.yaml); `interceptors`: the backend's
    server interceptors (tests record what reaches it).
    """
    secret = secrets.token_urlsafe(32)
    for attempt in range(5):
        admin_port = free_port()
        fields = {
            "proxy_admin": f"http://127.0.0.1:{admin_port}",
            "proxy_admin_token": backend_admin_token,
            **config,
        }
        async with _example(
            tmp_path, secret.encode(), fields, policy_path=policy, interceptors=interceptors
        ) as example:
            cfg = ServeConfig(
                policy=str(policy),
                listen="127.0.0.1:0",
                upstream=f"127.0.0.1:{example.backend.port}",
                admin=f"127.0.0.1:{admin_port}",
                admin_token_env=ADMIN_ENV if admin_token else None,
                jwks=[str(tmp_path / "jwks.json")],
                hmac_secret_envs=[f"refresh-hmac={REFRESH_ENV}"],
                shutdown_grace=0.5,
            )
            env = {REFRESH_ENV: secret, ADMIN_ENV: admin_token}
            try:
                running = await start_proxy(cfg, env=env)
            except ConfigError:  # the admin port was taken meanwhile: pick another
                if attempt == 4:
                    raise
                continue
            channel = running.channel
            await _types_learned(running)
            try:
                yield Proxied(
                    example,
                    running,
                    api_pb2_grpc.AuthServiceStub(channel),
                    api_pb2_grpc.UserServiceStub(channel),
                    api_pb2_grpc.DataServiceStub(channel),
                )
            finally:
                await running.stop()
            return


async def _types_learned(running: RunningProxy) -> None:
    """Wait (bounded) until the backend's reflection named the request types the policy's
    `request:` rules read: until then their calls are refused FIELDS_UNAVAILABLE."""
    proxy = running.proxy
    policy, types = proxy.authorizer.policy, proxy.catalog.types

    async def missing() -> list[str]:
        return missing_types(policy, types)

    left, _ = await poll(missing, lambda m: not m, 10)
    assert not left, f"the backend's reflection never named the request types of {left}"


def reason_of(error: grpc.aio.AioRpcError) -> str | None:
    """The proxy's `ErrorInfo.reason` in the error's status details; None if there is none."""
    info = error_info(error)
    return info.reason if info is not None else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def decoded(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
