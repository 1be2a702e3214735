"""The client library's API: `verify_2fa` answers like `login`, one error family for
"log in first" whether a call or `refresh()` finds no token, the level names exported and
taken by the store, and every public name exported, typed and documented."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil

import pyotp
import pytest

import authproxy.client as client
from authproxy.client import (
    AsyncAuthSession,
    AuthSession,
    Level,
    LoginRequiredError,
    LoginResult,
    MethodLevels,
    NoTokenError,
    TokenStore,
)
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from tests.support.client import (
    GET_PROFILE,
    REFRESH,
    Recorder,
    forwarding_policy,
    sent_token,
    signed_up,
    target,
)
from tests.support.example_backend import PASSWORD, POLICY, running_behind_proxy

LEVELS = MethodLevels.from_file(POLICY)


def _sync_2fa(address: str, email: str, secret: str) -> tuple[LoginResult, LoginResult]:
    with AuthSession(address, LEVELS) as session:
        login = session.login(email, PASSWORD)
        verified = session.verify_2fa(pyotp.TOTP(secret).now())
        assert session.store.get(Level.ACCESS) is not None
        return login, verified


async def test_verify_2fa_answers_like_login(tmp_path):
    async with running_behind_proxy(tmp_path, access_ttl=30) as proxied:
        created = await signed_up(proxied, "answer@example.com", enable_2fa=True)
        totp = pyotp.parse_uri(created.otpauth_uri)
        async with AsyncAuthSession(target(proxied), LEVELS) as session:
            login = await session.login("answer@example.com", PASSWORD)
            assert login.requires_2fa and login.expires_in == 600  # the 2FA token's
            verified = await session.verify_2fa(totp.now())
            assert verified == LoginResult(requires_2fa=False, expires_in=30)  # the access token's
            assert session.logged_in

        created = await signed_up(proxied, "sync-answer@example.com", enable_2fa=True)
        secret = pyotp.parse_uri(created.otpauth_uri).secret
        login, verified = await asyncio.to_thread(
            _sync_2fa, target(proxied), "sync-answer@example.com", secret
        )
        assert login.requires_2fa
        assert verified == LoginResult(requires_2fa=False, expires_in=30)


def _sync_before_login(address: str) -> list[type[BaseException]]:
    raised = []
    with AuthSession(address, LEVELS) as session:
        users = api_pb2_grpc.UserServiceStub(session.channel)
        for attempt in (session.refresh, lambda: users.GetProfile(api_pb2.GetProfileRequest())):
            with pytest.raises(LoginRequiredError) as error:
                attempt()
            raised.append(type(error.value))
    return raised


async def test_refresh_and_calls_before_login_raise_the_same_error(tmp_path):
    recorder = Recorder()
    async with running_behind_proxy(tmp_path, interceptors=[recorder]) as proxied:
        await signed_up(proxied, "family@example.com")
        async with AsyncAuthSession(target(proxied), LEVELS) as session:
            users = api_pb2_grpc.UserServiceStub(session.channel)
            attempts = (session.refresh, lambda: users.GetProfile(api_pb2.GetProfileRequest()))
            for _ in ("before login", "after logout"):
                for attempt in attempts:
                    with pytest.raises(NoTokenError) as missing:
                        await attempt()
                    assert isinstance(missing.value, LoginRequiredError)  # either except
                    assert "log in first" in str(missing.value)
                await session.login("family@example.com", PASSWORD)
                await session.logout()
            assert session.refresher.calls == 0
        assert recorder.count(REFRESH) == recorder.count(GET_PROFILE) == 0  # nothing sent
        raised = await asyncio.to_thread(_sync_before_login, target(proxied))
        assert raised == [NoTokenError, NoTokenError]


async def test_levels_are_exported_and_the_store_takes_them(tmp_path):
    assert [str(level) for level in Level] == ["public", "2fa", "refresh", "access", "deny"]
    assert Level.TWO_FA == "2fa" and client.TOKEN_KINDS == ("2fa", "access", "refresh")
    recorder = Recorder()
    policy = forwarding_policy(tmp_path)
    async with running_behind_proxy(tmp_path, policy=policy, interceptors=[recorder]) as proxied:
        await signed_up(proxied, "levels-api@example.com")
        levels = MethodLevels.from_file(policy)
        assert levels.level(GET_PROFILE) is Level.ACCESS
        assert levels.level("/api.v1.AuthService/Verify2FA") is Level.TWO_FA
        async with AsyncAuthSession(target(proxied), levels) as session:
            await session.login("levels-api@example.com", PASSWORD)
            access = session.store.get(Level.ACCESS)
            assert access is not None and session.store.get("access") is access
            assert set(session.store.snapshot()) == {Level.ACCESS, Level.REFRESH}
            await api_pb2_grpc.UserServiceStub(session.channel).GetProfile(
                api_pb2.GetProfileRequest()
            )
            session.store.clear(Level.ACCESS)
            assert session.store.get(Level.ACCESS) is None
        (metadata,) = [md for method, md in recorder.calls if method == GET_PROFILE]
        assert sent_token(metadata) == access.value
    store = TokenStore()
    store.set(Level.TWO_FA, "pending")
    assert store.get("2fa").value == "pending"  # type: ignore[union-attr]
    assert store.get("id") is None
    with pytest.raises(ValueError, match="unknown token kind 'public'"):
        store.set(Level.PUBLIC, "x")


def _client_modules() -> list[object]:
    return [
        importlib.import_module(f"authproxy.client.{info.name}")
        for info in pkgutil.iter_modules(client.__path__)
        if info.name != "auth_api_pb2"  # generated
    ]


def _documented_and_typed(name: str, function: object) -> list[str]:
    problems = []
    if not inspect.getdoc(function):
        problems.append(f"{name}: no docstring")
    signature = inspect.signature(function)  # type: ignore[arg-type]
    for parameter in list(signature.parameters.values()):
        if (
            parameter.name not in ("self", "cls")
            and parameter.annotation is inspect.Parameter.empty
        ):
            problems.append(f"{name}({parameter.name}): no type")
    if signature.return_annotation is inspect.Signature.empty:
        problems.append(f"{name}: no return type")
    return problems


def test_every_public_name_is_exported_typed_and_documented():
    exported = set(client.__all__)
    assert len(exported) == len(client.__all__)
    problems = [name for name in client.__all__ if not hasattr(client, name)]
    for module in _client_modules():
        for name, value in vars(module).items():
            defined_here = getattr(value, "__module__", None) == module.__name__  # type: ignore[attr-defined]
            if name.startswith("_") or not defined_here:
                continue
            if not (inspect.isclass(value) or inspect.isfunction(value)):
                continue
            if name not in exported:
                problems.append(f"{module.__name__}.{name} is not in authproxy.client.__all__")
    for name in client.__all__:
        value = getattr(client, name)
        if inspect.isfunction(value):
            problems += _documented_and_typed(name, value)
        elif inspect.isclass(value):
            if not inspect.getdoc(value):
                problems.append(f"{name}: no docstring")
            for attribute, member in vars(value).items():
                if attribute.startswith("_") and attribute != "__init__":
                    continue
                member = getattr(member, "__func__", member)  # classmethods
                if inspect.isfunction(member) and member.__qualname__.startswith(name):
                    problems += _documented_and_typed(f"{name}.{attribute}", member)
    assert problems == []
