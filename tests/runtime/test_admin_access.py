"""Who may call each admin route: every route has an access class, and a route without
one (or a path no route serves) is private.

The tests enumerate the routes of the real admin app, so a route added later without an
access class is caught here: with `--admin-token-env`, every route but `/healthz`,
`/readyz`, `/metrics` and the published public keys answers 401 without the secret (and
`/metrics` too with `--admin-metrics-auth`), over a real listener.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from authproxy.client import MethodLevels
from authproxy.runtime.admin import Access, AdminServer
from authproxy.runtime.serve import AuthProxy, ConfigError
from authproxy.state.store import MemoryState
from tests.support.admin import ADMIN_ENV, ADMIN_SECRET, admin_proxy
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import config_for

#: Probes, Prometheus, and public keys (fetched by other proxies' `--jwks URL`, no secret).
OPEN_WITH_A_TOKEN = {"/healthz", "/readyz", "/metrics", "/.well-known/jwks.json", "/public-key"}


def routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves (HEAD included)."""
    return sorted(
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    )


async def status_of(base: str, method: str, path: str, authorization: str | None) -> int:
    headers = {"authorization": authorization} if authorization else {}
    body = {"jti": "j-1", "exp": math.floor(time.time()) + 600} if method == "POST" else None
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base + path, json=body, headers=headers) as response,
    ):
        return response.status


def base_url(proxy: AuthProxy) -> str:
    assert proxy.admin is not None
    return f"http://127.0.0.1:{proxy.admin.port}"


@pytest.mark.parametrize("metrics_auth", [False, True], ids=["metrics-open", "metrics-auth"])
async def test_with_a_token_every_route_but_the_probes_needs_it(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch, metrics_auth: bool
):
    monkeypatch.setenv(ADMIN_ENV, ADMIN_SECRET)
    open_paths = OPEN_WITH_A_TOKEN - ({"/metrics"} if metrics_auth else set())
    async with admin_proxy(
        tmp_path, keys, admin_token_env=ADMIN_ENV, admin_metrics_auth=metrics_auth
    ) as running:
        assert running.proxy.admin is not None
        served = routes(running.proxy.admin.app)
        assert {path for _, path in served} >= OPEN_WITH_A_TOKEN | {"/policy", "/v1/revocations"}
        base = base_url(running.proxy)
        for method, path in served:
            without = await status_of(base, method, path, None)
            wrong = await status_of(base, method, path, "Bearer not-the-admin-secret-000")
            granted = await status_of(base, method, path, f"Bearer {ADMIN_SECRET}")
            if path in open_paths:
                assert without != 401 and wrong != 401, (method, path)
            else:
                assert (without, wrong) == (401, 401), (method, path)
            assert granted not in (401, 403), (method, path, granted)
        # A path no route serves is private too: no hint about what exists.
        assert await status_of(base, "GET", "/v2/anything", None) == 401
        assert await status_of(base, "GET", "/v2/anything", f"Bearer {ADMIN_SECRET}") == 404


async def test_a_route_registered_without_an_access_class_is_private(
    monkeypatch: pytest.MonkeyPatch,
):
    """A route someone adds straight to the app (not through `_route`) needs the token."""

    async def added_later(request: web.Request) -> web.Response:
        return web.json_response({"secret": "internal"})

    server = AdminServer(MemoryState(), "127.0.0.1:0", token=ADMIN_SECRET)
    server.app.router.add_get("/debug/added-later", added_later)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert await status_of(base, "GET", "/debug/added-later", None) == 401
        assert await status_of(base, "GET", "/debug/added-later", f"Bearer {ADMIN_SECRET}") == 200
        assert await status_of(base, "GET", "/healthz", None) == 200
    finally:
        await server.stop()


async def test_every_route_of_the_app_has_an_access_class():
    server = AdminServer(MemoryState(), "127.0.0.1:0")
    for route in server.app.router.routes():
        assert route.resource in server.access, route
    assert {server.access[r.resource] for r in server.app.router.routes()} == set(Access)


async def test_without_a_token_reads_are_open_and_revocations_only_on_loopback(
    tmp_path: Path, keys: Keys
):
    async with admin_proxy(tmp_path, keys) as running:
        base = base_url(running.proxy)
        for path in ("/healthz", "/metrics", "/policy", "/.well-known/jwks.json"):
            assert await status_of(base, "GET", path, None) == 200, path
        assert await status_of(base, "POST", "/v1/revocations", None) == 201
    wide = AdminServer(MemoryState(), "0.0.0.0:0")  # a listener opened for probes
    await wide.start()
    try:
        base = f"http://127.0.0.1:{wide.port}"
        assert await status_of(base, "GET", "/healthz", None) == 200
        for method in ("POST", "GET"):
            assert await status_of(base, method, "/v1/revocations", None) == 403, method
    finally:
        await wide.stop()


async def test_metrics_auth_without_a_token_is_a_configuration_error(tmp_path: Path, keys: Keys):
    cfg = config_for(
        tmp_path, keys, TEST_POLICY, ext_authz_grpc="127.0.0.1:0", admin="127.0.0.1:0",
        admin_metrics_auth=True,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="--admin-metrics-auth needs --admin-token-env"):
        AuthProxy(cfg)


async def test_the_client_library_reads_the_policy_with_the_admin_token(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(ADMIN_ENV, ADMIN_SECRET)
    async with admin_proxy(tmp_path, keys, admin_token_env=ADMIN_ENV) as running:
        base = base_url(running.proxy)
        with pytest.raises(Exception, match="401"):
            await MethodLevels.from_admin_async(base)
        levels = await MethodLevels.from_admin_async(base, admin_token=ADMIN_SECRET)
        assert levels.level("/test.Admin/Echo") == "access"
        assert levels.level("/test.Public/Echo") == "public"
