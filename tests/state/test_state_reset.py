"""Redis coming back empty (`proxy/state/redis_store.py`: the epoch key): a FLUSHALL with the
connections kept, and a real `redis-server` restarted without persistence on the same
port. The replicas notice, write back what they hold, and never drop a revocation from
their own view; a replica started after the wipe learns the records from them.

Every RedisState here has a generous timeout: these tests are about what is kept, not
about how fast (the bounded waits are far above the heartbeat and reconnect delays).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import aiohttp
import pytest
import redis.asyncio as redis

from authproxy.keys.issuer import TokenIssuer
from authproxy.state.redis_store import RedisState
from tests.support.echo_backend import EchoBackend
from tests.support.keys import Keys
from tests.support.redis_modes import raw_client
from tests.support.redis_server import RedisServer, running_state
from tests.support.running_proxy import REVOKED, running_node
from tests.support.waits import eventually, poll

TIMEOUT = 5.0  # per Redis operation: generous, a busy machine must not fail these tests
WITHIN = 10.0  # bound for a replica to notice the wipe and write back
JTI = "revoked-before-the-wipe"
USED = "used-before-the-wipe"


def watch(state: RedisState) -> list[bool]:
    """Whether the view still revoked JTI and alice's older tokens, at every change of it."""
    seen: list[bool] = []

    def changed() -> None:
        seen.append(
            state.revoked(JTI, "x", None) and state.revoked("other", "alice", time.time() - 60)
        )

    state.view.listeners.append(changed)
    return seen


async def revoke_and_use(state: RedisState, exp: float) -> None:
    await state.revoke_token(JTI, exp)
    await state.revoke_subject("alice", time.time())
    assert await state.first_use(USED, exp)


async def written_back(raw: redis.Redis) -> bool:
    keys = ("authproxy:revoked:jti:" + JTI, "authproxy:revoked:sub:alice", "authproxy:used:" + USED)

    async def all_there() -> bool:
        return await raw.exists(*keys) == len(keys)

    return await eventually_async(all_there, WITHIN)


def knows_everything(state: RedisState) -> bool:
    return state.revoked(JTI, "x", None) and state.revoked("other", "alice", time.time() - 60)


@pytest.mark.parametrize("wipe", ["flushall", "restart"])
async def test_revocations_and_uses_survive_redis_coming_back_empty(
    redis_server: RedisServer,
    wipe: str,
    caplog: pytest.LogCaptureFixture,
):
    url = redis_server.url
    exp = math.floor(time.time()) + 300
    caplog.set_level(logging.WARNING, "authproxy.state")
    async with (
        running_state(url, timeout=TIMEOUT) as a,
        running_state(url, timeout=TIMEOUT) as b,
        raw_client(url) as raw,
    ):
        await revoke_and_use(a, exp)
        assert await eventually(lambda: knows_everything(b), within=WITHIN)
        views = {"a": watch(a), "b": watch(b)}

        if wipe == "flushall":
            await raw.flushall()
        else:
            redis_server.restart()  # SIGKILL, then an empty server on the same port
        assert await written_back(raw), "no replica wrote the records back into Redis"

        # Neither replica dropped them from its view at any moment (merged, not replaced).
        assert await eventually(lambda: a.resets_total == 1 and b.resets_total == 1, WITHIN)
        assert all(views["a"]) and all(views["b"]), views
        assert knows_everything(a) and knows_everything(b)
        assert "the shared state was reset" in caplog.text
        # Redis holds them again, with their expiries; the use is still spent.
        assert await raw.ttl("authproxy:revoked:jti:" + JTI) > 0
        assert await raw.ttl("authproxy:used:" + USED) > 0
        assert not await b.first_use(USED, exp)
        # A replica started now loads them from Redis.
        async with running_state(url, timeout=TIMEOUT) as c:
            assert knows_everything(c)
            assert await c.used(USED)
            assert c.resets_total == 0  # a new replica has no earlier epoch: nothing to reset


async def test_a_replica_started_after_the_wipe_learns_from_the_others(
    redis_url: str,
):
    """c starts on the emptied Redis before a noticed (a's heartbeat is 30 s apart): c
    loads nothing; once a reconnects it writes back and publishes, and c learns."""
    exp = math.floor(time.time()) + 300
    async with (
        running_state(redis_url, timeout=TIMEOUT, staleness=120.0) as a,
        raw_client(redis_url) as raw,
    ):
        await revoke_and_use(a, exp)
        await raw.flushall()
        async with running_state(redis_url, timeout=TIMEOUT) as c:
            # The wipe really lost them (a has not noticed yet: its next heartbeat is far).
            assert not c.revoked(JTI, "x", None)
            assert not await c.used(USED)
            # a notices on its next load: cut the subscriptions (c's too; it reloads).
            await raw.client_kill_filter(_type="pubsub")
            assert await eventually(lambda: knows_everything(c), within=WITHIN)
            assert await c.used(USED)
            assert a.resets_total == 1


async def test_a_proxy_keeps_refusing_after_a_flush_and_reports_the_reset(
    tmp_path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    redis_url: str,
):
    """Through a real proxy: the revoked token stays refused, Redis gets the record back,
    and `/metrics` shows `authproxy_state_resets_total 1.0`."""
    access = issuer.mint("access", "alice", ttl=300)
    fields = {"redis": redis_url, "state_timeout": TIMEOUT}
    async with (
        running_node(tmp_path, keys, backend, "a", **fields) as node,
        raw_client(redis_url) as raw,
    ):
        await node.proxy.state.revoke_token(access.claims["jti"], access.claims["exp"])
        assert await node.call("/test.Access/Echo", access.token) == REVOKED
        await raw.flushall()
        key = f"authproxy:revoked:jti:{access.claims['jti']}"
        assert await eventually_async(lambda: raw.exists(key), WITHIN)
        assert await node.call("/test.Access/Echo", access.token) == REVOKED
        assert node.proxy.admin is not None
        url = f"http://127.0.0.1:{node.proxy.admin.port}/metrics"

        async def scrape() -> str:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                return await response.text()

        text, _ = await poll(scrape, lambda t: "authproxy_state_resets_total 1.0" in t, WITHIN)
        assert "authproxy_state_resets_total 1.0" in text


async def eventually_async(probe, within: float) -> bool:
    deadline = time.monotonic() + within
    while not await probe():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_revocations_a_failover_lost_are_written_back_on_the_next_load(redis_url: str):
    """Redis keeps its epoch but lacks revocations (what a failover to a replica that had
    not received them leaves): a replica that holds them writes them back when it reloads,
    so a replica started afterwards enforces them too; none is a reset."""
    exp = math.floor(time.time()) + 300
    async with (
        running_state(redis_url, timeout=TIMEOUT, staleness=120.0) as a,
        raw_client(redis_url) as raw,
    ):
        await revoke_and_use(a, exp)
        lost = [k async for k in raw.scan_iter(match="authproxy:revoked:*")]
        assert lost and await raw.delete(*lost) == len(lost)  # the epoch key stays
        await raw.client_kill_filter(_type="pubsub")  # a reloads

        async def back() -> bool:
            return await raw.exists(*lost) == len(lost)

        assert await eventually_async(back, WITHIN)
        async with running_state(redis_url, timeout=TIMEOUT) as c:
            assert knows_everything(c)
        assert a.resets_total == 0
