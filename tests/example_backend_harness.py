"""Harness for the example backend's tests: a real backend on loopback, called directly.

Each call carries the identity headers the proxy would set: `Example.md` verifies the token
with the product's verifier and builds the headers with the product's identity code, so
the tests also prove that every token the backend mints is one the proxy accepts.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from argon2 import PasswordHasher

from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from examples.backend.passwords import Passwords
from examples.backend.server import Backend, BackendConfig, start_backend
from proxy.identity import identity_of
from proxy.issuer import hmac_signing_key
from proxy.keygen import keygen
from proxy.keys import KeySet, hmac_key, load_jwks_file
from proxy.policy import Policy
from proxy.policy_file import load_policy
from proxy.verify import TokenVerifier, VerifiedToken

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "policy.yaml"
ADMIN_EMAIL = "admin@example.com"
PASSWORD = "correct horse battery"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


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
async def running_example(tmp_path: Path) -> AsyncIterator[Example]:
    """The backend (admin: ADMIN_EMAIL) with keys in `tmp_path`, and a channel to it."""
    policy = load_policy(POLICY)
    signing_key = keygen("ES256", tmp_path / "signing.pem", tmp_path / "jwks.json")
    secret = secrets.token_bytes(32)
    config = BackendConfig(
        policy=policy,
        signing_key=signing_key,
        refresh_key=hmac_signing_key(secret, "refresh-hmac"),
        admin_emails=frozenset({ADMIN_EMAIL}),
    )
    # Cheap Argon2 parameters keep the tests fast; the CLI uses argon2-cffi's defaults.
    cheap = Passwords(PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    backend = await start_backend(config, "127.0.0.1:0", passwords=cheap)
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


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def decoded(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
