"""Shared state on a Sentinel-managed Redis (`redis+sentinel://...`): a real primary,
replica and three sentinels (`tests/support/redis_sentinel.py`).

First the topology itself (it starts, the sentinels name the primary, the replica copies
it, a killed primary is replaced). Then `RedisState` through the sentinel URL: two states
agree (revocations, single use, rate limits); across a failover the view fails closed
while the primary is gone, never answers "not revoked" for a revoked token, and recovers
by itself with what was recorded before; a whole proxy does the same; a wrong password,
silent sentinels or an unknown service name fail closed without hanging.

Timings (failover, STATE_UNAVAILABLE window) are printed (`pytest -s`) and asserted only
against generous bounds. Every test that kills a primary has its own topology.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path

import pytest
import redis
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter

from authproxy.keys.issuer import TokenIssuer
from authproxy.state.store import StateUnavailable
from tests.support import redis_sentinel
from tests.support.echo_backend import EchoBackend
from tests.support.failover import (
    Watch,
    assert_kept,
    calls_through_failover,
    revoke_and_spend,
)
from tests.support.keys import Keys
from tests.support.policies import SINGLE_USE_POLICY
from tests.support.redis_sentinel import SentinelTopology
from tests.support.redis_server import (
    PATIENT,
    assert_fails_closed,
    free_port,
    mute_port,
    running_state,
)
from tests.support.running_proxy import running_node
from tests.support.waits import eventually

# The topology fixtures (tests/conftest.py registers only the single-server ones).
sentinel_topology = redis_sentinel.sentinel_topology
protected_sentinel_topology = redis_sentinel.protected_sentinel_topology

ACCESS = "/test.Access/Echo"
REFRESH = "/test.Refresh/Echo"

#: A generous bound on a failover (the sentinels call the primary down after 1 s).
FAILOVER_BOUND = 30.0


# --- the topology ---------------------------------------------------------------------------


async def test_the_sentinels_name_the_primary_and_the_replica_copies_it(
    sentinel_topology: SentinelTopology,
):
    topology = sentinel_topology
    primary, replica = topology.servers
    assert topology.primary_port() == primary.port == topology.initial_primary_port
    assert {topology.named_primary(port) for port in topology.sentinel_ports} == {primary.port}
    assert topology.role(primary.port) == "master"
    assert topology.role(replica.port) == "slave"
    assert topology.url == (
        "redis+sentinel://"
        + ",".join(f"127.0.0.1:{port}" for port in topology.sentinel_ports)
        + "/mymaster"
    )

    with topology.client(primary.port) as writer, topology.client(replica.port) as reader:
        writer.set("probe", "written on the primary", ex=60)
        assert await eventually(lambda: reader.get("probe") is not None, within=5.0)
        assert reader.get("probe") == "written on the primary"
        with pytest.raises(redis.ReadOnlyError):
            reader.set("probe", "written on the replica")

    # With the primary alive, waiting for a failover gives up after its bound.
    start = time.monotonic()
    with pytest.raises(AssertionError, match="no failover"):
        await topology.wait_failover(primary.port, within=0.5)
    assert time.monotonic() - start < 5.0


async def test_a_killed_primary_is_replaced_by_the_replica(sentinel_topology: SentinelTopology):
    topology = sentinel_topology
    primary, replica = topology.servers
    with topology.client(primary.port) as writer:
        writer.set("before", "1", ex=60)
        writer.execute_command("WAIT", 1, 5000)  # the replica has it
    old = topology.kill_primary()
    assert old == primary.port and not primary.running
    new, took = await topology.wait_failover(old, within=FAILOVER_BOUND)
    print(f"\nsentinel failover: port {old} -> {new} in {took:.2f} s after SIGKILL")
    assert new == replica.port
    assert topology.primary_port() == replica.port
    with topology.client(new) as c:
        assert c.get("before") == "1"
        c.set("after", "1", ex=60)  # the new primary takes writes


# --- RedisState through the sentinels -------------------------------------------------------


async def test_two_states_on_the_sentinel_url_agree(
    protected_sentinel_topology: SentinelTopology,
):
    """Revocations, single use and rate limits are shared through the primary the
    sentinels name (with the ACL user and a password that needs URL-encoding)."""
    url = protected_sentinel_topology.url
    assert "%2F" in url and "%40" in url  # the password is URL-encoded
    async with running_state(url, **PATIENT) as a, running_state(url, **PATIENT) as b:
        for state in (a, b):
            state.check_fresh()  # started means loaded
        now = time.time()
        exp = math.floor(now) + 300
        await a.revoke_token("jti-1", exp)
        await a.revoke_subject("alice", now)
        assert await eventually(lambda: b.revoked("jti-1", "x", None), within=2.0)
        assert await eventually(lambda: b.revoked("other", "alice", now - 60), within=2.0)
        assert not b.revoked("other", "bob", now - 60)
        await b.revoke_token("jti-2", exp)
        assert await eventually(lambda: a.revoked("jti-2", "x", None), within=2.0)

        # Single use: one winner across both, also when they race.
        assert await a.first_use("refresh-1", exp) is True
        assert await b.first_use("refresh-1", exp) is False
        assert await a.first_use("refresh-1", exp) is False
        results = await asyncio.gather(
            *((a if i % 2 else b).first_use("raced", exp) for i in range(40)),
            return_exceptions=True,
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert results.count(True) == 1

        # Rate limits: one moving window counted by both.
        limit = parse("5/minute")
        limiters = [MovingWindowRateLimiter(s.rate_limit_storage()) for s in (a, b)]
        hits = [await limiters[i % 2].hit(limit, "rule", "client-1") for i in range(8)]
        assert hits == [True] * 5 + [False] * 3
        assert await limiters[0].hit(limit, "rule", "client-2")  # another key: its own window
        stats = await limiters[1].get_window_stats(limit, "rule", "client-1")
        assert stats.remaining == 0

        # A state started afterwards loads the revocations from the primary.
        async with running_state(url, **PATIENT) as c:
            assert c.revoked("jti-1", "x", None)
            assert c.revoked("jti-2", "x", None)
            assert c.revoked("other", "alice", now - 60)
            assert {r.jti for r in await c.revocations() if r.jti} == {"jti-1", "jti-2"}

    # The records are on the primary and on the replica (where a failover would go).
    replica = protected_sentinel_topology.servers[1]
    with protected_sentinel_topology.client(replica.port) as c:
        assert await eventually(lambda: c.exists("authproxy:used:raced") == 1, within=5.0)
        assert c.exists("authproxy:revoked:jti:jti-1", "authproxy:revoked:sub:alice") == 2


async def test_a_burst_waits_for_pooled_connections_on_the_sentinel_url(
    sentinel_topology: SentinelTopology,
):
    """100 concurrent operations on one state (more than its 64 pooled connections):
    like on one server (`test_exactly_one_of_100_concurrent_first_uses_wins`), callers
    wait for a connection instead of failing, and exactly one first use wins."""
    async with running_state(sentinel_topology.url, **PATIENT) as state:
        exp = math.floor(time.time()) + 300
        results = await asyncio.gather(
            *(state.first_use("raced", exp) for _ in range(100)), return_exceptions=True
        )
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        assert errors == [], f"{len(errors)} of 100 first_use calls raised: {errors[:3]}"
        assert results.count(True) == 1
        assert state.failures_total == 0


async def test_states_fail_closed_during_a_failover_and_recover_with_their_records(
    sentinel_topology: SentinelTopology,
):
    """Production timings (staleness 1 s, timeout 1 s). Records made before the primary
    dies and replicated survive the failover, and so does a revocation the replica never
    got (the states write it back); checks fail closed while no primary answers, never
    let a revoked token through, and come back by themselves."""
    topology = sentinel_topology
    replica = topology.servers[1]
    url = topology.url
    async with running_state(url) as a, running_state(url) as b:
        now = time.time()
        exp = math.floor(now) + 300
        await a.revoke_token("tok-before", exp)
        await a.revoke_subject("sub-before", now)
        assert await a.first_use("use-before", exp)
        assert await eventually(lambda: b.revoked("tok-before", "x", None), within=2.0)
        with topology.client(replica.port) as r:
            keys = ["authproxy:revoked:jti:tok-before", "authproxy:revoked:sub:sub-before",
                    "authproxy:used:use-before"]  # fmt: skip
            assert await eventually(lambda: r.exists(*keys) == 3, within=5.0)
        # Records the replica never gets: its link to the primary is cut and cannot come
        # back (it now presents a password the primary refuses), then they are written
        # and the primary dies. Replication is asynchronous: what it had not sent is gone.
        lost = ["authproxy:revoked:jti:tok-lost", "authproxy:used:use-lost"]
        with topology.client(replica.port) as r:
            r.config_set("masterauth", "not-the-password")
        with topology.client(old_port := topology.primary_port()) as p:
            p.client_kill_filter(_type="replica")
        assert await eventually(
            lambda: topology.replication(replica.port).get("master_link_status") == "down",
            within=5.0,
        )
        await a.revoke_token("tok-lost", exp)
        assert await a.first_use("use-lost", exp)
        assert await eventually(lambda: b.revoked("tok-lost", "x", None), within=2.0)
        failures = (a.failures_total, b.failures_total)

        watch = Watch({"a": a, "b": b}, "tok-before", "sub-before", now - 60)
        killed_at = time.monotonic()
        old = topology.kill_primary()
        assert old == old_port
        with topology.client(replica.port) as r:  # what the replica holds at the crash
            lost_on_replica = {k: r.exists(k) == 0 for k in lost}
        watching = asyncio.create_task(watch.run(until=killed_at + 2 * FAILOVER_BOUND))
        try:
            # No primary answers: operations fail closed, they do not hang.
            started = time.monotonic()
            with pytest.raises(StateUnavailable):
                await a.first_use("during", exp)
            with pytest.raises(StateUnavailable):
                await b.revoke_token("during", exp)
            assert time.monotonic() - started < 10.0

            new, failover = await topology.wait_failover(old, within=FAILOVER_BOUND)
            assert new == replica.port
            await asyncio.wait_for(watching, timeout=FAILOVER_BOUND + 5)
        finally:
            watching.cancel()
        recovered_rounded = {n: round(t - killed_at, 2) for n, t in watch.fresh_again.items()}
        windows = {n: round(w, 2) for n, w in watch.windows().items()}
        print(
            f"\nfailover {old} -> {new}: sentinels agree {failover:.2f} s after SIGKILL;"
            f" STATE_UNAVAILABLE windows (first failed check -> first passing check):"
            f" {windows} s; current again"
            f" {recovered_rounded} s after SIGKILL;"
            f" {watch.samples} samples; missing from the replica at the crash:"
            f" {lost_on_replica}"
        )
        assert watch.violations == [], watch.violations[:5]
        assert set(watch.first_stale) == {"a", "b"}, "a state never failed closed"
        assert set(watch.fresh_again) == {"a", "b"}, (
            f"not current again within {2 * FAILOVER_BOUND:.0f}s of the crash:"
            f" stale since {watch.first_stale}, fresh again {watch.fresh_again}"
        )
        assert all(w < FAILOVER_BOUND for w in watch.windows().values())
        assert a.failures_total > failures[0] and b.failures_total > failures[1]

        # What was recorded before is still enforced, on both.
        for state in (a, b):
            state.check_fresh()
            assert state.revoked("tok-before", "x", None)
            assert state.revoked("other", "sub-before", now - 60)
            assert not state.revoked("other", "bob", now - 60)
            assert await state.first_use("use-before", exp) is False
        # A revocation made after the failover reaches the other state.
        await b.revoke_token("tok-after", exp)
        assert await eventually(lambda: a.revoked("tok-after", "x", None), within=2.0)
        assert await a.first_use("use-after", exp) is True
        assert await b.first_use("use-after", exp) is False
        with topology.client(new) as c:
            assert c.exists("authproxy:revoked:jti:tok-after") == 1

        # The records the replica never got. The revocation is still enforced by both
        # states (their views keep it) and written back to the new primary, so a state
        # started later learns it too.
        assert lost_on_replica == dict.fromkeys(lost, True), (
            f"the replica resynchronised in the instant before the crash: {lost_on_replica}"
        )
        assert a.revoked("tok-lost", "x", None) and b.revoked("tok-lost", "x", None)
        with topology.client(new) as c:
            assert await eventually(lambda: c.exists(lost[0]) == 1, within=5.0)
        async with running_state(url) as c:
            assert c.revoked("tok-lost", "x", None)
        # The single-use record too: the state that recorded it writes its latest uses
        # back (SET NX) when it reconnects, so the jti stays spent.
        with topology.client(new) as c:
            assert await eventually(lambda: c.exists(lost[1]) == 1, within=5.0)
        assert await b.first_use("use-lost", exp) is False


# --- wait_replicas: a use on a replica before the call goes on ------------------------------


async def test_wait_replicas_puts_each_use_on_a_replica_before_it_counts(
    sentinel_topology: SentinelTopology, caplog: pytest.LogCaptureFixture
):
    """With `wait_replicas=1` a recorded use is on the replica when `first_use` returns
    (nothing for a failover to lose); with the replica cut off it still counts (it stands
    on the primary) but is counted and logged as unreplicated, after at most half the
    operation timeout. Prints what the wait costs per use."""
    topology = sentinel_topology
    replica = topology.servers[1]
    exp = time.time() + 300
    waited = topology.url_with(query="wait_replicas=1")
    # Patient: on a busy machine a replica may take longer than the default WAIT (0.5 s).
    async with (
        running_state(topology.url, **PATIENT) as plain,
        running_state(waited, **PATIENT) as durable,
        running_state(waited) as hasty,  # the default timeout: WAIT for at most 0.5 s
    ):
        with topology.client(replica.port) as r:
            costs: dict[str, list[float]] = {"without": [], "with": []}
            for i in range(50):
                for name, state in (("without", plain), ("with", durable)):
                    started = time.perf_counter()
                    assert await state.first_use(f"{name}-{i}", exp)
                    costs[name].append(time.perf_counter() - started)
                assert r.exists(f"authproxy:used:with-{i}") == 1  # already, no waiting
            medians = {n: sorted(c)[len(c) // 2] * 1e6 for n, c in costs.items()}
            lags = []  # without the wait: from first_use's return to the replica having it
            for i in range(20):
                assert await plain.first_use(f"lag-{i}", exp)
                returned = time.perf_counter()
                assert await eventually(lambda i=i: r.exists(f"authproxy:used:lag-{i}"), 5.0)
                lags.append((time.perf_counter() - returned) * 1e6)
            print(
                f"\nfirst_use median µs: {medians}; without the wait the replica had the use"
                f" {sorted(lags)[len(lags) // 2]:.0f} µs (median, max {max(lags):.0f}) after it"
                " returned"
            )
            assert durable.unreplicated_total == 0

            caplog.set_level(logging.WARNING, logger="authproxy.state")
            r.config_set("masterauth", "not-the-password")  # its link cannot come back
            with topology.client(topology.primary_port()) as p:
                p.client_kill_filter(_type="replica")
            assert await eventually(
                lambda: topology.replication(replica.port).get("master_link_status") == "down",
                within=5.0,
            )
            started = time.monotonic()
            assert await hasty.first_use("cut-off", exp)
            assert time.monotonic() - started < hasty.timeout
            assert not await hasty.first_use("cut-off", exp)  # spent all the same
            assert hasty.unreplicated_total == 1
            assert "reached 0 of 1 replicas" in caplog.text
            assert r.exists("authproxy:used:cut-off") == 0


# --- misconfiguration and silent sentinels: fail closed, never hang -------------------------


async def test_wrong_credentials_or_an_unknown_service_fail_closed_without_hanging(
    protected_sentinel_topology: SentinelTopology, caplog: pytest.LogCaptureFixture
):
    topology = protected_sentinel_topology
    caplog.set_level(logging.WARNING, logger="authproxy.state")
    await assert_fails_closed(topology.url_with(password="wrong-password"))
    await assert_fails_closed(topology.url_with(username="nobody", password="x"))
    bare = topology.url.replace(f"{topology.username}:", "").split("@")[-1]
    await assert_fails_closed("redis+sentinel://" + bare)  # no credentials: default user is off
    caplog.clear()
    await assert_fails_closed(topology.url_with(service="no-such-service"))
    assert "no-such-service" in caplog.text, caplog.text[-2000:]
    # The right URL works on the same topology (so the failures above are the URL's).
    async with running_state(topology.url, **PATIENT) as state:
        state.check_fresh()
        assert await state.first_use("jti-ok", time.time() + 60)


async def test_sentinels_that_do_not_answer_fail_closed_without_hanging():
    """Nothing listening on the sentinel ports; then a sentinel that accepts connections
    and never replies (a hung host): start() and every operation return in bounded time."""
    closed = [free_port() for _ in range(3)]
    await assert_fails_closed(
        "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in closed) + "/mymaster"
    )
    with mute_port() as port:
        await assert_fails_closed(f"redis+sentinel://127.0.0.1:{port}/mymaster", bound=15.0)


# --- a whole proxy --------------------------------------------------------------------------


async def test_proxies_on_sentinel_fail_closed_during_a_failover_and_recover(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    sentinel_topology: SentinelTopology,
):
    """Two proxies (`redis=` the sentinel URL): a revocation through one's admin API is
    enforced by the other; while the primary is gone calls fail closed
    (STATE_UNAVAILABLE), the revoked token is never let through; after the failover
    calls pass again by themselves, with the revocation and the single use kept."""
    topology = sentinel_topology
    url = topology.url
    async with (
        running_node(tmp_path, keys, backend, "a", SINGLE_USE_POLICY, redis=url) as a,
        running_node(tmp_path, keys, backend, "b", SINGLE_USE_POLICY, redis=url) as b,
    ):
        recorded = await revoke_and_spend(a, b, issuer)
        with topology.client(topology.servers[1].port) as r:
            assert await eventually(lambda: r.dbsize() >= 3, within=5.0)  # + the epoch

        old = topology.kill_primary()
        killed_at = time.monotonic()
        failing_over = topology.wait_failover(old, within=FAILOVER_BOUND)
        calls = await calls_through_failover(
            b, recorded.good, recorded.revoked, killed_at, failing_over, FAILOVER_BOUND
        )
        new = topology.primary_port()
        print(f"\nproxies on sentinel, failover {old} -> {new}: {calls.describe()}")
        await assert_kept(a, b, issuer, recorded)
