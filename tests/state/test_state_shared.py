"""Shared state through real proxies: revocation and single use with two `AuthProxy`
instances sharing one real `redis-server`, fail-closed behaviour when Redis dies and
recovery when it comes back, the admin revocation API, and the Envoy ext_authz path.

Only two timing assertions, both on documented functional bounds: a revocation made
through one proxy is enforced by the other within `state_staleness` (1 s), and the
proxy works again within 5 s of Redis coming back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from pathlib import Path

import aiohttp
import grpc
import jwt
import pytest

from authproxy.keys.issuer import TokenIssuer
from authproxy.runtime.serve import AuthProxy, ConfigError
from authproxy.state.store import EXPIRY_GRACE
from tests.support.admin import ADMIN_ENV, ADMIN_SECRET, admin, admin_proxy, revocations_url
from tests.support.echo_backend import EchoBackend
from tests.support.ext_authz import check_path, metadata, outcome
from tests.support.keys import REFRESH_SECRET, Keys
from tests.support.policies import REFRESH_LINE, SINGLE_USE_POLICY, TEST_POLICY, descriptor_set
from tests.support.redis_modes import MODES, url_for
from tests.support.redis_server import PATIENT_CONFIG, RedisServer
from tests.support.running_proxy import (
    OK,
    REUSED,
    REVOKED,
    STATE_DOWN,
    RunningProxy,
    config_for,
    running_node,
)
from tests.support.waits import poll

ACCESS = "/test.Access/Echo"
PUBLIC = "/test.Public/Echo"
REFRESH = "/test.Refresh/Echo"

#: The documented bounds the tests measure.
PROPAGATION_BOUND = 1.0  # state_staleness: a revocation reaches every replica within it
FAIL_CLOSED_BOUND = 1.5  # staleness (1 s) plus a ping interval: calls then fail closed
RECOVERY_BOUND = 5.0  # the proxy reconnects by itself (backoff <= 1 s)

NO_REVOKE_POLICY = TEST_POLICY.replace(
    REFRESH_LINE,
    "  /test.Refresh/*: {level: refresh, single_use: true, revoke_on_reuse: false}\n",
)


async def wait_for_next_second(moment: float) -> None:
    """Sleep until the clock's whole seconds reach `moment`: a token minted then has
    `iat` (whole seconds) >= moment."""
    while time.time() < math.ceil(moment):
        await asyncio.sleep(math.ceil(moment) - time.time() + 0.01)


# --- revocation across two proxies ----------------------------------------------------------


async def test_a_revoked_token_stays_refused_after_its_exp_within_the_leeway(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    redis_url: str,
):
    """TEST_POLICY has `leeway: 5s`: an expired token is accepted for 5 more seconds, and
    a revocation must hold for that long too (also when posted after the exp)."""
    async with running_node(tmp_path, keys, backend, "a", redis=redis_url) as node:
        token = issuer.mint("access", "alice", ttl=1)
        late = issuer.mint("access", "alice", ttl=1)
        assert await node.call(ACCESS, token.token) == OK
        status, _, _ = await admin(revocations_url(node), body={"jti": token.jti, "exp": token.exp})
        assert status == 201
        while time.time() < token.exp + 1:
            await asyncio.sleep(0.1)
        assert await node.call(ACCESS, late.token) == OK  # expired, within the leeway
        assert await node.call(ACCESS, token.token) == REVOKED
        # A token that expired a moment ago can still be revoked (it is still accepted).
        status, _, _ = await admin(revocations_url(node), body={"jti": late.jti, "exp": late.exp})
        assert status == 201
        assert await node.call(ACCESS, late.token) == REVOKED


async def test_a_revocation_through_one_proxy_is_enforced_by_the_other_within_1s(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    redis_url: str,
):
    async with (
        running_node(tmp_path, keys, backend, "a", redis=redis_url) as a,
        running_node(tmp_path, keys, backend, "b", redis=redis_url) as b,
    ):
        token = issuer.mint("access", "alice", ttl=300)
        other = issuer.mint("access", "alice", ttl=300)  # same subject, another jti
        for node in (a, b):
            assert await node.call(ACCESS, token.token) == OK
            assert await node.call(ACCESS, token.token) == OK  # now from the verified cache
            assert node.proxy.authorizer.verifier.cache_hits >= 1

        start = time.monotonic()
        status, _, body = await admin(revocations_url(a), body={"jti": token.jti, "exp": token.exp})
        posted = time.monotonic() - start
        assert status == 201, body
        assert body == {"revoked": {"jti": token.jti, "exp": token.exp}}

        result, _ = await poll(lambda: b.call(ACCESS, token.token), lambda r: r != OK, within=3.0)
        elapsed = time.monotonic() - start
        print(
            f"\nrevocation propagation A -> B: denied by B {elapsed * 1000:.1f} ms after the"
            f" admin POST was sent (the POST itself took {posted * 1000:.1f} ms)"
        )
        assert result == REVOKED
        assert elapsed <= PROPAGATION_BOUND, f"B still accepted the token after {elapsed:.3f}s"

        # The token is still in both verified-token caches: neither serves it.
        hits = a.proxy.authorizer.verifier.cache_hits
        assert await a.call(ACCESS, token.token) == REVOKED
        assert a.proxy.authorizer.verifier.cache_hits == hits + 1  # served from the cache...
        assert await b.call(ACCESS, token.token) == REVOKED  # ...and refused all the same
        # Only that jti is revoked.
        assert await a.call(ACCESS, other.token) == OK
        assert await b.call(ACCESS, other.token) == OK


async def test_a_subject_revocation_covers_older_tokens_only(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    redis_url: str,
):
    async with (
        running_node(tmp_path, keys, backend, "a", redis=redis_url) as a,
        running_node(tmp_path, keys, backend, "b", redis=redis_url) as b,
    ):
        old = issuer.mint("access", "carol", ttl=300)
        bystander = issuer.mint("access", "dave", ttl=300)
        assert await b.call(ACCESS, old.token) == OK

        before = time.time()
        status, _, body = await admin(revocations_url(a), body={"sub": "carol", "before": before})
        assert status == 201, body
        result, elapsed = await poll(lambda: b.call(ACCESS, old.token), lambda r: r != OK, 3.0)
        assert result == REVOKED
        assert elapsed <= PROPAGATION_BOUND
        assert await a.call(ACCESS, old.token) == REVOKED

        await wait_for_next_second(before)
        new = issuer.mint("access", "carol", ttl=300)
        assert new.claims["iat"] >= before
        for node in (a, b):
            assert await node.call(ACCESS, new.token) == OK  # issued after the cut-off
            assert await node.call(ACCESS, old.token) == REVOKED
            assert await node.call(ACCESS, bystander.token) == OK  # another subject


# --- Redis outage: fail closed, recover by itself -------------------------------------------


async def test_redis_outage_fails_closed_and_recovers_without_restarting_the_proxy(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    redis_server: RedisServer,
):
    async with running_node(tmp_path, keys, backend, "a", redis=redis_server.url) as node:
        access = issuer.mint("access", "erin", ttl=300).token
        refresh = issuer.mint("refresh", "erin", ttl=300).token
        assert await node.call(ACCESS, access) == OK
        assert await node.call(REFRESH, refresh) == OK
        failures = node.proxy.state.failures_total

        redis_server.kill()
        result, down_after = await poll(
            lambda: node.call(ACCESS, access), lambda r: r != OK, within=FAIL_CLOSED_BOUND
        )
        print(f"\nRedis killed: token levels fail closed after {down_after * 1000:.0f} ms")
        assert result == STATE_DOWN
        assert await node.call(REFRESH, refresh) == STATE_DOWN
        assert await node.call(PUBLIC) == OK  # public methods keep working
        assert await node.call(ACCESS) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")

        redis_server.restart()
        result, up_after = await poll(
            lambda: node.call(ACCESS, access), lambda r: r == OK, within=RECOVERY_BOUND, every=0.05
        )
        print(f"Redis restarted: calls succeed again after {up_after * 1000:.0f} ms")
        assert result == OK
        assert await node.call(REFRESH, refresh) == OK
        assert node.proxy.state.failures_total > failures


# --- single use -----------------------------------------------------------------------------


@pytest.fixture(params=["memory", *MODES])
def state_url(request: pytest.FixtureRequest) -> str | None:
    """None (in-memory state) or the URL of a real Redis in one of its modes."""
    return url_for(request, request.param) if request.param != "memory" else None


async def test_reusing_a_single_use_token_revokes_its_subject(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend, state_url: str | None
):
    async with running_node(tmp_path, keys, backend, "a", SINGLE_USE_POLICY, redis=state_url) as n:
        access = issuer.mint("access", "frank", ttl=300)
        refresh = issuer.mint("refresh", "frank", ttl=300)
        bystander = issuer.mint("access", "grace", ttl=300)
        assert await n.call(ACCESS, access.token) == OK
        assert await n.call(REFRESH, refresh.token) == OK
        assert await n.call(REFRESH, refresh.token) == REUSED
        # revoke_on_reuse (default true): every older token of the subject is revoked.
        assert await n.call(ACCESS, access.token) == REVOKED
        assert await n.call(ACCESS, bystander.token) == OK
        revocations = [r.as_json() for r in await n.proxy.state.revocations()]
        assert [r["sub"] for r in revocations] == ["frank"]


async def test_reuse_without_revoke_on_reuse_leaves_the_subject_alone(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend, state_url: str | None
):
    async with running_node(tmp_path, keys, backend, "a", NO_REVOKE_POLICY, redis=state_url) as n:
        access = issuer.mint("access", "frank", ttl=300)
        refresh = issuer.mint("refresh", "frank", ttl=300)
        assert await n.call(REFRESH, refresh.token) == OK
        assert await n.call(REFRESH, refresh.token) == REUSED
        assert await n.call(REFRESH, refresh.token) == REUSED
        assert await n.call(ACCESS, access.token) == OK
        assert await n.proxy.state.revocations() == []
        # Another refresh token of the same subject is still good, once.
        second = issuer.mint("refresh", "frank", ttl=300)
        assert await n.call(REFRESH, second.token) == OK


@pytest.mark.parametrize("setup", ["memory", *MODES, "single-two-proxies", "cluster-two-proxies"])
async def test_exactly_one_of_100_concurrent_presentations_succeeds(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    setup: str,
    request: pytest.FixtureRequest,
):
    """The winner is a unary call the proxy knows is unary (descriptor set): the subject
    revocation its concurrent reuses trigger does not cut it short, as it would cut a
    stream (or a call of unknown kind; see test_stream_guard.py)."""
    url = url_for(request, setup.partition("-")[0]) if setup != "memory" else None
    count = 2 if setup.endswith("-two-proxies") else 1
    kinds = [str(descriptor_set(tmp_path / "echo.protoset"))]
    node = {"redis": url, "descriptor_sets": kinds, **PATIENT_CONFIG}  # counts, not timing
    async with (
        running_node(tmp_path, keys, backend, "a", SINGLE_USE_POLICY, **node) as a,
        running_node(tmp_path, keys, backend, "b", SINGLE_USE_POLICY, **node) as b,
    ):
        nodes = [a, b][:count]
        refresh = issuer.mint("refresh", "henry", ttl=300).token
        results = await asyncio.gather(
            *(nodes[i % count].call(REFRESH, refresh) for i in range(100))
        )
        tally = Counter(results)
        assert tally[OK] == 1, tally
        # The others are refused as reused (or, once a reuse revoked the subject, as
        # revoked): never let through, never "state unavailable" with Redis up.
        assert set(tally) - {OK} <= {REUSED, REVOKED}, tally
        assert tally[REUSED] >= 1, tally


# --- the admin API --------------------------------------------------------------------------


async def test_admin_api_refuses_bad_requests(
    tmp_path: Path,
    keys: Keys,
    redis_url: str,
):
    future = math.floor(time.time()) + 600
    bad_json = [b"{", b"", b"not json", b'{"jti": "a", "jti": "b", "exp": 1}', b'{"exp": NaN}']
    bad_shapes = {
        "missing exp": {"jti": "x"},
        "missing before": {"sub": "x"},
        "exp past any leeway": {"jti": "x", "exp": time.time() - EXPIRY_GRACE - 10},
        "both jti and sub": {"jti": "x", "exp": future, "sub": "y"},
        "jti with before": {"jti": "x", "before": future},
        "extra key": {"jti": "x", "exp": future, "note": "hi"},
        "non-string jti": {"jti": 5, "exp": future},
        "null jti": {"jti": None, "exp": future},
        "empty jti": {"jti": "", "exp": future},
        "huge jti": {"jti": "j" * 513, "exp": future},
        "huge sub": {"sub": "s" * 10_000, "before": future},
        "string exp": {"jti": "x", "exp": str(future)},
        "boolean exp": {"jti": "x", "exp": True},
        "not an object": ["jti", "x"],
        "a string": "jti",
        "empty object": {},
    }
    async with admin_proxy(tmp_path, keys, redis=redis_url) as running:
        url = revocations_url(running)
        for data in bad_json:
            status, headers, body = await admin(url, data=data)
            assert (status, body["reason"]) == (400, "BAD_JSON"), (data, body)
            assert body["error"] == "invalid_argument"
            assert headers["Content-Type"].startswith("application/json")
        for label, shape in bad_shapes.items():
            status, _, body = await admin(url, body=shape)
            assert (status, body["reason"]) == (400, "BAD_REVOCATION"), (label, body)
            assert set(body) == {"error", "reason", "message"}
        status, _, body = await admin(url, "GET")
        assert (status, body) == (200, {"revocations": []}), "a refused request revoked something"
        # The limits themselves are accepted.
        status, _, body = await admin(url, body={"jti": "j" * 512, "exp": future})
        assert status == 201, body


async def test_admin_api_lists_the_active_revocations(
    tmp_path: Path,
    keys: Keys,
    redis_url: str,
):
    exp = math.floor(time.time()) + 600
    before = math.floor(time.time()) - 60
    async with admin_proxy(tmp_path, keys, redis=redis_url, subject_revocation_ttl=3600.0) as r:
        url = revocations_url(r)
        status, _, body = await admin(url, body={"jti": "jti-1", "exp": exp})
        assert (status, body) == (201, {"revoked": {"jti": "jti-1", "exp": exp}})
        status, _, body = await admin(url, body={"sub": "ivan", "before": before})
        assert (status, body) == (201, {"revoked": {"sub": "ivan", "before": before}})
        status, _, body = await admin(url, "GET")
        assert status == 200
        listed = sorted(body["revocations"], key=lambda j: sorted(j))
        assert listed == sorted(
            [
                {"jti": "jti-1", "exp": exp},
                {"sub": "ivan", "before": before, "expires": before + 3600.0},
            ],
            key=lambda j: sorted(j),
        )


async def test_admin_api_with_a_bearer_token(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(ADMIN_ENV, ADMIN_SECRET)
    future = math.floor(time.time()) + 600
    revocation = {"jti": "jti-1", "exp": future}
    async with admin_proxy(tmp_path, keys, admin_token_env=ADMIN_ENV) as running:
        url = revocations_url(running)
        for authorization in (
            None,
            "Bearer wrong-secret-0123456789",
            f"Bearer {ADMIN_SECRET}x",
            f"Bearer {ADMIN_SECRET[:-1]}",
            f"Basic {ADMIN_SECRET}",
            ADMIN_SECRET,
        ):
            for method, body in (("POST", revocation), ("GET", None)):
                status, headers, answer = await admin(
                    url, method, body, authorization=authorization
                )
                assert (status, answer["reason"]) == (401, "UNAUTHENTICATED"), authorization
                assert headers["WWW-Authenticate"] == "Bearer"
        assert await running.proxy.state.revocations() == []  # nothing got through
        status, _, answer = await admin(
            url, body=revocation, authorization=f"Bearer {ADMIN_SECRET}"
        )
        assert status == 201, answer
        status, _, answer = await admin(url, "GET", authorization=f"bearer {ADMIN_SECRET}")
        assert (status, answer) == (200, {"revocations": [revocation]})


async def test_admin_token_must_be_long_enough(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(ADMIN_ENV, "short-secret")
    cfg = config_for(
        tmp_path, keys, TEST_POLICY, ext_authz_grpc="127.0.0.1:0", admin="127.0.0.1:0",
        admin_token_env=ADMIN_ENV,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="at least 16 characters"):
        AuthProxy(cfg)


async def test_admin_api_answers_503_while_redis_is_down(
    tmp_path: Path,
    keys: Keys,
    redis_server: RedisServer,
):
    future = math.floor(time.time()) + 600
    async with admin_proxy(tmp_path, keys, redis=redis_server.url) as running:
        url = revocations_url(running)
        assert (await admin(url, body={"jti": "before-outage", "exp": future}))[0] == 201
        redis_server.kill()
        for method, body in (
            ("POST", {"jti": "jti-1", "exp": future}),
            ("POST", {"sub": "judy", "before": time.time()}),
            ("GET", None),
        ):
            status, _, answer = await admin(url, method, body)
            assert (status, answer["reason"]) == (503, "STATE_UNAVAILABLE"), (method, body)
            assert answer["error"] == "unavailable"


# --- the Envoy ext_authz path ---------------------------------------------------------------


async def http_check(running: RunningProxy, path: str, token: str | None) -> tuple[int, str | None]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(running.http_url + path, headers=headers) as answer,
    ):
        if answer.status == 200:
            return 200, None
        return answer.status, (await answer.json(content_type=None))["reason"]


async def test_ext_authz_refuses_revoked_tokens_and_fails_closed_without_redis(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    redis_server: RedisServer,
):
    async with admin_proxy(tmp_path, keys, redis=redis_server.url) as running:
        revoked = issuer.mint("access", "kim", ttl=300)
        good = issuer.mint("access", "kim", ttl=300)
        response = await check_path(running, ACCESS, token=revoked.token)
        assert outcome(response) == "ALLOW"
        assert await http_check(running, ACCESS, revoked.token) == (200, None)

        url = revocations_url(running)
        status, _, _ = await admin(url, body={"jti": revoked.jti, "exp": revoked.exp})
        assert status == 201
        response = await check_path(running, ACCESS, token=revoked.token)
        assert response.denied_response.status.code == 401
        assert metadata(response)["reason"] == "TOKEN_REVOKED"
        assert response.status.message.startswith("TOKEN_REVOKED: ")
        assert await http_check(running, ACCESS, revoked.token) == (401, "TOKEN_REVOKED")
        assert outcome(await check_path(running, ACCESS, token=good.token)) == "ALLOW"

        redis_server.kill()

        async def grpc_check():
            return await check_path(running, ACCESS, token=good.token)

        response, _ = await poll(
            grpc_check, lambda r: outcome(r) != "ALLOW", within=FAIL_CLOSED_BOUND
        )
        assert response.denied_response.status.code == 503
        assert metadata(response)["reason"] == "STATE_UNAVAILABLE"
        assert response.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert await http_check(running, ACCESS, good.token) == (503, "STATE_UNAVAILABLE")
        assert outcome(await check_path(running, PUBLIC)) == "ALLOW"
        assert await http_check(running, PUBLIC, None) == (200, None)


async def test_a_single_use_rule_refuses_a_token_without_jti(
    tmp_path: Path, keys: Keys, backend: EchoBackend
):
    """Without a jti there is nothing to record as used: refused, never let through."""
    now = int(time.time())
    claims = {"sub": "erin", "type": "refresh", "aud": "token-refresh", "iss": "test-issuer"}
    token = jwt.encode(
        {**claims, "iat": now, "exp": now + 300},
        REFRESH_SECRET,
        algorithm="HS256",
        headers={"kid": "refresh-hmac"},
    )
    async with running_node(tmp_path, keys, backend, "a", SINGLE_USE_POLICY) as node:
        assert await node.call(REFRESH, token) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "MISSING_CLAIM",
        )
