"""Logouts reach the proxy: the example backend with `proxy_admin` revokes tokens at the
real proxy's admin API, and the very next call with a revoked token through the proxy is
refused with UNAUTHENTICATED / TOKEN_REVOKED. Also: what the backend answers when the
admin API cannot confirm, and how a login right after a revocation stays valid although
`iat` has whole seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web

from examples.backend.api.v1 import api_pb2
from examples.backend.auth_service import INVALID_LOGIN, PASSWORD_UNCHANGED
from examples.backend.passwords import Passwords
from examples.backend.sessions import LOGGED_OUT, SESSION_ENDED
from tests.support.example_backend import (
    PASSWORD,
    UNAUTH,
    Example,
    Proxied,
    bearer,
    cheap_hasher,
    decoded,
    free_port,
    reason_of,
    rpc_error,
    running_behind_proxy,
    running_example,
)

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
NEW_PASSWORD = "a brand new password"


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[Proxied]:
    async with running_behind_proxy(tmp_path) as running:
        yield running


async def assert_revoked(call: Any) -> None:
    error = await rpc_error(call)
    assert error.code() == UNAUTH, error
    assert reason_of(error) == "TOKEN_REVOKED", error


async def refresh_through(p: Proxied, refresh_token: str) -> Any:
    return await p.auth.RefreshToken(api_pb2.RefreshTokenRequest(), metadata=bearer(refresh_token))


async def start_of_a_second() -> None:
    """Sleep until just after a whole second, so the next steps share one second."""
    await asyncio.sleep(1.02 - time.time() % 1)


# --- logout ----------------------------------------------------------------------------


async def test_logout_revokes_the_access_token_at_the_proxy_and_nothing_else(proxied):
    user_id, laptop = await proxied.account("alice@example.com")
    phone = await proxied.login("alice@example.com")
    assert (await proxied.profile(laptop.access_token)).user_id == user_id

    await proxied.logout(laptop.access_token)

    await assert_revoked(proxied.profile(laptop.access_token))
    # The ledger ended the session: its refresh token is refused by the backend.
    error = await rpc_error(refresh_through(proxied, laptop.refresh_token))
    assert error.code() == UNAUTH and error.details() == SESSION_ENDED
    # The other device and a fresh login keep working.
    assert (await proxied.profile(phone.access_token)).user_id == user_id
    again = await proxied.login("alice@example.com")
    assert (await proxied.profile(again.access_token)).user_id == user_id

    # Revoked by jti, with the token's own exp (the proxy adds the leeway grace itself).
    claims = decoded(laptop.access_token)
    assert {"jti": claims["jti"], "exp": claims["exp"]} in await proxied.revocations()


async def test_a_logged_out_access_token_cannot_log_out_again(proxied):
    _, login = await proxied.account("bob@example.com")
    await proxied.logout(login.access_token)
    await assert_revoked(proxied.logout(login.access_token))


# --- logout on all devices -------------------------------------------------------------


async def test_logout_on_all_devices_revokes_every_token_of_the_user_only(proxied):
    carol, laptop = await proxied.account("carol@example.com")
    phone = await proxied.login("carol@example.com")
    dave, other = await proxied.account("dave@example.com")

    await proxied.logout(laptop.access_token, all_devices=True)

    for device in (laptop, phone):
        await assert_revoked(proxied.profile(device.access_token))
        await assert_revoked(refresh_through(proxied, device.refresh_token))
    assert (await proxied.profile(other.access_token)).user_id == dave

    # Logging in again right away (likely within the revocation's second) works.
    again = await proxied.login("carol@example.com")
    assert (await proxied.profile(again.access_token)).user_id == carol
    rotated = await refresh_through(proxied, again.refresh_token)
    assert (await proxied.profile(rotated.access_token)).user_id == carol

    [revocation] = [r for r in await proxied.revocations() if r.get("sub") == carol]
    assert decoded(laptop.access_token)["iat"] < revocation["before"]
    assert decoded(again.access_token)["iat"] >= revocation["before"]


# --- change password -------------------------------------------------------------------


async def test_change_password_revokes_old_tokens_and_a_login_right_after_works(proxied):
    user_id, laptop = await proxied.account("erin@example.com")
    phone = await proxied.login("erin@example.com")
    await start_of_a_second()
    changed_at = time.time()
    request = api_pb2.ChangePasswordRequest(old_password=PASSWORD, new_password=NEW_PASSWORD)
    await proxied.auth.ChangePassword(request, metadata=bearer(laptop.access_token))
    login_at = time.time()
    login = await proxied.login("erin@example.com", NEW_PASSWORD)
    logged_in_at = time.time()

    for device in (laptop, phone):
        await assert_revoked(proxied.profile(device.access_token))
    assert (await proxied.profile(login.access_token)).user_id == user_id
    assert (await refresh_through(proxied, login.refresh_token)).access_token
    assert (await rpc_error(proxied.login("erin@example.com"))).code() == UNAUTH

    # The revocation covers the whole second of the change; the login, asked for within
    # that second, waited for the next one, so its tokens are not covered.
    [revocation] = [r for r in await proxied.revocations() if r.get("sub") == user_id]
    before = revocation["before"]
    assert before == int(changed_at) + 1
    assert login_at < before <= logged_in_at
    assert decoded(laptop.access_token)["iat"] < before
    assert decoded(login.access_token)["iat"] == before


# --- the admin API's bearer secret -----------------------------------------------------


async def test_the_admin_secret_is_sent_when_configured(proxied):
    # `proxied` requires the secret at the admin API; the backend sends it.
    _, login = await proxied.account("frank@example.com")
    await proxied.logout(login.access_token)
    await assert_revoked(proxied.profile(login.access_token))


@pytest.mark.parametrize("sent", [None, "not-the-admin-secret-0123456789"])
async def test_without_the_admin_secret_logout_fails_and_the_token_still_works(
    tmp_path: Path, sent: str | None
):
    async with running_behind_proxy(tmp_path, backend_admin_token=sent) as p:
        user_id, login = await p.account("grace@example.com")
        for all_devices in (False, True):
            error = await rpc_error(p.logout(login.access_token, all_devices))
            assert error.code() == UNAVAILABLE
            assert "not logged out" in error.details()
        assert (await p.profile(login.access_token)).user_id == user_id
        assert (await refresh_through(p, login.refresh_token)).access_token
        assert await p.revocations() == []


async def test_an_admin_api_without_a_secret_gets_no_authorization_header(tmp_path: Path):
    async with running_behind_proxy(tmp_path, admin_token=None, backend_admin_token=None) as p:
        _, login = await p.account("heidi@example.com")
        await p.logout(login.access_token, all_devices=True)
        await assert_revoked(p.profile(login.access_token))


# --- when the admin API cannot confirm ---------------------------------------------------


async def test_logout_answers_unavailable_when_the_proxy_admin_api_is_unreachable(
    tmp_path: Path,
):
    closed = f"http://127.0.0.1:{free_port()}"
    async with running_example(tmp_path, proxy_admin=closed) as example:
        await unconfirmed_logouts_change_nothing(example)


async def test_logout_answers_unavailable_when_the_proxy_admin_api_does_not_answer(
    tmp_path: Path,
):
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        async with running_example(
            tmp_path, proxy_admin=f"http://127.0.0.1:{port}", proxy_admin_timeout=0.3
        ) as example:
            started = time.monotonic()
            await unconfirmed_logouts_change_nothing(example)
            assert time.monotonic() - started < 5
    finally:
        silent.close()


async def unconfirmed_logouts_change_nothing(example: Example) -> None:
    """Logout, Logout on all devices and ChangePassword fail with UNAVAILABLE, and the
    session, the refresh tokens and the password are as they were."""
    _, login = await example.account("ivan@example.com")
    md = example.md(login.access_token)
    for all_devices in (False, True):
        request = api_pb2.LogoutRequest(all_devices=all_devices)
        error = await rpc_error(example.auth.Logout(request, metadata=md))
        assert error.code() == UNAVAILABLE
        assert error.details().startswith("not logged out: the proxy could not be told")
    change = api_pb2.ChangePasswordRequest(old_password=PASSWORD, new_password=NEW_PASSWORD)
    error = await rpc_error(example.auth.ChangePassword(change, metadata=md))
    assert error.code() == UNAVAILABLE
    assert error.details() == PASSWORD_UNCHANGED

    assert (await example.refresh(login.refresh_token)).access_token
    started = time.monotonic()
    assert (await example.login("ivan@example.com")).access_token
    assert time.monotonic() - started < 0.5, "a failed revocation holds back no login"
    assert (await rpc_error(example.login("ivan@example.com", NEW_PASSWORD))).code() == UNAUTH


# --- exchanges under way while a revocation is posted ------------------------------------


@contextlib.asynccontextmanager
async def slow_admin_api(delay: float) -> AsyncIterator[tuple[str, list[dict]]]:
    """A stand-in admin API on loopback that confirms every revocation after `delay`."""
    received: list[dict] = []

    async def revoke(request: web.Request) -> web.Response:
        received.append(await request.json())
        await asyncio.sleep(delay)
        return web.json_response({"revoked": received[-1]}, status=201)

    app = web.Application()
    app.router.add_post("/v1/revocations", revoke)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", received
    finally:
        await runner.cleanup()


async def test_exchanges_under_way_during_a_logout_everywhere_mint_nothing_that_outlives_it(
    tmp_path: Path,
):
    """A refresh the proxy let through just before it learnt of the revocation must not
    mint a pair that the revocation does not cover; a password login may."""
    async with (
        slow_admin_api(0.4) as (url, received),
        running_example(tmp_path, proxy_admin=url) as example,
    ):
        _, login = await example.account("judy@example.com")
        md = example.md(login.access_token)
        refresh_md = example.md(login.refresh_token, "refresh")
        logout = asyncio.ensure_future(
            example.auth.Logout(api_pb2.LogoutRequest(all_devices=True), metadata=md)
        )
        await asyncio.sleep(0.1)  # the revocation is being posted
        assert len(received) == 1 and not logout.done()
        refresh = example.auth.RefreshToken(api_pb2.RefreshTokenRequest(), metadata=refresh_md)
        error, again = await asyncio.gather(rpc_error(refresh), example.login("judy@example.com"))
        await logout

        assert error.code() == UNAUTH and error.details() == LOGGED_OUT
        assert decoded(again.access_token)["iat"] >= received[0]["before"]
        assert (await example.refresh(again.refresh_token)).access_token


class SlowPasswords(Passwords):
    """Checking a password takes `delay` seconds: calls overlap where the test wants."""

    def __init__(self, delay: float) -> None:
        super().__init__(cheap_hasher())
        self.delay = delay

    async def verify(self, password_hash: str, password: str) -> bool:
        await asyncio.sleep(self.delay)
        return await super().verify(password_hash, password)


async def test_a_login_with_the_old_password_that_overlaps_a_password_change_is_refused(
    tmp_path: Path,
):
    """The login checked the old password before the change and mints after it: its
    tokens would outlive the change, so it is refused; a login with the new one works."""
    async with (
        slow_admin_api(0.3) as (url, _),
        running_example(tmp_path, SlowPasswords(0.3), proxy_admin=url) as example,
    ):
        _, login = await example.account("ken@example.com")
        md = example.md(login.access_token)
        change = api_pb2.ChangePasswordRequest(old_password=PASSWORD, new_password=NEW_PASSWORD)
        changing = asyncio.ensure_future(example.auth.ChangePassword(change, metadata=md))
        await asyncio.sleep(0.1)  # the change is checking the old password
        old = await rpc_error(example.login("ken@example.com"))
        await changing
        assert old.code() == UNAUTH and old.details() == INVALID_LOGIN
        assert (await example.login("ken@example.com", NEW_PASSWORD)).access_token
