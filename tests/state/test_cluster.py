"""Shared state on a Redis Cluster (`redis+cluster://...`) through failures: three
primaries with a replica each (`bench/redis_cluster.py`, node timeout 2 s), a primary
killed with SIGKILL.

The everyday behaviour (revocations, single use, rate limits, two states agreeing) is the
shared-state suite, which runs against a cluster too (`tests/support/redis_modes.py`).
Here: across the failover of the shard that holds the revocation feed, checks fail closed
while it has no primary, never answer "not revoked" for a revoked token, and recover by
themselves with everything recorded before; a whole proxy does the same; a wrong password
or nodes that do not answer fail closed without hanging.

Timings are printed (`pytest -s`) and asserted only against generous bounds. Every test
that kills a node has its own cluster.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter

from authproxy.keys.issuer import TokenIssuer
from authproxy.state.store import StateUnavailable
from bench.redis_cluster import RedisCluster
from tests.support.echo_backend import EchoBackend
from tests.support.failover import (
    Watch,
    assert_kept,
    calls_through_failover,
    revoke_and_spend,
)
from tests.support.keys import Keys
from tests.support.policies import SINGLE_USE_POLICY
from tests.support.redis_server import (
    PATIENT,
    assert_fails_closed,
    free_port,
    mute_port,
    redis_server_binary,
    running_state,
)
from tests.support.running_proxy import running_node
from tests.support.waits import eventually

ACCESS = "/test.Access/Echo"
REFRESH = "/test.Refresh/Echo"
CHANNEL = "authproxy:revocations"
#: A generous bound on a failover (a node is failed after the 2 s node timeout).
FAILOVER_BOUND = 30.0
PASSWORD = "cluster-s3cret"


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """Three primaries with one replica each, stopped at teardown."""
    redis_server_binary()  # a clear failure, never a skip, when Redis is not installed
    started = RedisCluster(tmp_path_factory.mktemp("cluster"), replicas=1)
    started.start()
    try:
        yield started
    finally:
        started.stop()


def on_shard(cluster: RedisCluster, port: int, prefix: str) -> str:
    """A name whose `authproxy:used:` key is served by the primary on `port`."""
    for i in range(1000):
        if cluster.serving(f"authproxy:used:{prefix}-{i}") == port:
            return f"{prefix}-{i}"
    raise AssertionError(f"no key of 1000 lands on {port}")


def reseeded(cluster: RedisCluster) -> str:
    """The cluster's URL with its seed nodes in reverse order: another proxy's view."""
    seeds = ",".join(f"127.0.0.1:{p}" for p in reversed(cluster.ports))
    return f"redis+cluster://{seeds}"


async def test_states_fail_closed_during_a_cluster_failover_and_recover_with_their_records(
    cluster: RedisCluster,
):
    """Production timings (staleness 1 s, timeout 1 s). Two states seeded from different
    nodes (a with `wait_replicas=1`); the primary of the feed's shard dies (the channel and the epoch key share its
    slot): both fail closed until its replica is promoted, never let a revoked token
    through, and come back by themselves with the records, the spent token and the
    rate-limit count made before."""
    durable = cluster.url + "?wait_replicas=1"  # a's uses are on a replica when recorded
    async with running_state(durable) as a, running_state(reseeded(cluster)) as b:
        now = time.time()
        exp = math.floor(now) + 300
        old = cluster.serving(CHANNEL)
        used = on_shard(cluster, old, "use-before")  # a record on the shard that dies
        await a.revoke_token("tok-before", exp)
        await a.revoke_subject("sub-before", now)
        assert await a.first_use(used, exp)
        limiter = MovingWindowRateLimiter(a.rate_limit_storage())
        five = parse("5/minute")
        assert [await limiter.hit(five, "caller") for _ in range(5)] == [True] * 5
        assert await eventually(lambda: b.revoked("tok-before", "x", None), within=2.0)
        assert await eventually(cluster.replicated, within=5.0)

        watch = Watch({"a": a, "b": b}, "tok-before", "sub-before", now - 60)
        cluster.kill(old)
        killed_at = time.monotonic()
        watching = asyncio.create_task(watch.run(until=killed_at + 2 * FAILOVER_BOUND))
        try:
            # The shard has no primary: its operations fail closed, they do not hang.
            started = time.monotonic()
            with pytest.raises(StateUnavailable):
                await a.first_use(on_shard(cluster, old, "during"), exp)
            assert time.monotonic() - started < 10.0
            new, failover = await asyncio.to_thread(
                cluster.wait_serving, CHANNEL, old, FAILOVER_BOUND
            )
            await asyncio.wait_for(watching, timeout=FAILOVER_BOUND + 5)
        finally:
            watching.cancel()
        windows = {n: round(w, 2) for n, w in watch.windows().items()}
        again = {n: round(t - killed_at, 2) for n, t in watch.fresh_again.items()}
        print(
            f"\ncluster failover {old} -> {new}: every node ok {failover:.2f} s after SIGKILL;"
            f" STATE_UNAVAILABLE windows {windows} s; current again {again} s after SIGKILL;"
            f" {watch.samples} samples"
        )
        assert watch.violations == [], watch.violations[:5]
        assert set(watch.first_stale) == {"a", "b"}, "a state never failed closed"
        assert set(watch.fresh_again) == {"a", "b"}, (watch.first_stale, watch.fresh_again)
        assert all(w < FAILOVER_BOUND for w in watch.windows().values())

        for state in (a, b):
            state.check_fresh()
            assert state.revoked("tok-before", "x", None)
            assert state.revoked("other", "sub-before", now - 60)
            assert not state.revoked("other", "bob", now - 60)
            assert await state.first_use(used, exp) is False
        assert await limiter.hit(five, "caller") is False  # the count survived
        # A revocation after the failover reaches the other state; single use works.
        await b.revoke_token("tok-after", exp)
        assert await eventually(lambda: a.revoked("tok-after", "x", None), within=2.0)
        after = on_shard(cluster, new, "use-after")
        assert await a.first_use(after, exp) is True
        assert await b.first_use(after, exp) is False
        async with running_state(cluster.url) as c:  # a state started now loads it all
            assert c.revoked("tok-before", "x", None) and c.revoked("tok-after", "x", None)


async def test_proxies_on_a_cluster_fail_closed_during_a_failover_and_recover(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    cluster: RedisCluster,
):
    """Two proxies seeded from different nodes: a revocation through one's admin API is
    enforced by the other; while the feed's shard has no primary, calls fail closed
    (STATE_UNAVAILABLE) and the revoked token never passes; after the failover calls pass
    again by themselves, with the revocation and the single use kept."""
    async with (
        running_node(tmp_path, keys, backend, "a", SINGLE_USE_POLICY, redis=cluster.url) as a,
        running_node(tmp_path, keys, backend, "b", SINGLE_USE_POLICY, redis=reseeded(cluster)) as b,
    ):
        recorded = await revoke_and_spend(a, b, issuer)
        assert await eventually(cluster.replicated, within=5.0)

        old = cluster.serving(CHANNEL)
        cluster.kill(old)
        killed_at = time.monotonic()
        failing_over = asyncio.to_thread(cluster.wait_serving, CHANNEL, old, FAILOVER_BOUND)
        calls = await calls_through_failover(
            b, recorded.good, recorded.revoked, killed_at, failing_over, FAILOVER_BOUND
        )
        print(f"\nproxies on a cluster, failover of {old}: {calls.describe()}")
        await assert_kept(a, b, issuer, recorded)


# --- misconfiguration and silent nodes: fail closed, never hang -----------------------------


async def test_a_wrong_password_fails_closed_and_the_right_one_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    redis_server_binary()
    protected = RedisCluster(tmp_path / "protected", password=PASSWORD)
    protected.start()
    try:
        caplog.set_level(logging.WARNING, logger="authproxy.state")
        await assert_fails_closed(protected.url.replace(PASSWORD, "wrong-password"))
        await assert_fails_closed(protected.url.replace(f":{PASSWORD}@", ""))
        assert "cannot record a token use" in caplog.text
        async with running_state(protected.url, **PATIENT) as state:
            state.check_fresh()
            assert await state.first_use("jti-ok", time.time() + 60)
    finally:
        protected.stop()


async def test_seed_nodes_that_do_not_answer_fail_closed_without_hanging():
    """Nothing listening on the seed ports; then a seed that accepts connections and never
    replies (a hung host): start() and every operation return in bounded time."""
    closed = [free_port() for _ in range(3)]
    await assert_fails_closed("redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in closed))
    with mute_port() as port:
        await assert_fails_closed(f"redis+cluster://127.0.0.1:{port}", bound=15.0)
