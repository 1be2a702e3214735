"""The state stores' contract (`proxy/state/store.py`), one suite run against both backends:
`MemoryState` (with an injected clock) and `RedisState` on a real `redis-server`.

Revocation by jti and by subject, expiry, `revocations()` and single use run on both.
Redis-only (the memory store has no namespaces, keys or second instance): atomic single
use across two RedisState instances, bounded storage (every key expires), propagation to
another instance, namespace isolation, fail-closed and recovery, and a bounded close.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from authproxy.state.redis_store import EPOCH_TTL, RedisState
from authproxy.state.store import (
    EXPIRY_GRACE,
    MemoryState,
    Revocation,
    StateStore,
    StateUnavailable,
)
from tests.support.redis_modes import MODES, raw_client, url_for
from tests.support.redis_server import PATIENT, RedisServer, finish_closing, running_state, stale
from tests.support.waits import eventually

SUBJECT_TTL = 3600.0


class FakeClock:
    """Wall-clock seconds that move only when told (starts at the real time)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """A way to make started stores of one kind, and to let time pass for them."""

    kind: str
    make: Callable[..., Awaitable[StateStore]]
    clock: Callable[[], float]
    wait_until: Callable[[float], Awaitable[None]]
    url: str | None = None
    stores: list[StateStore] = field(default_factory=list)


@pytest.fixture(params=["memory", *MODES])
async def state_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Makes started stores of one kind; all of them are closed at teardown."""
    made: list[StateStore] = []
    if request.param == "memory":
        clock = FakeClock()

        async def make(namespace: str = "authproxy", subject_ttl: float = SUBJECT_TTL):
            store = MemoryState(subject_ttl=subject_ttl, clock=clock)
            await store.start()
            made.append(store)
            return store

        async def wait_until(moment: float) -> None:
            clock.now = max(clock.now, moment)

        result = Backend("memory", make, clock, wait_until, stores=made)
    else:
        url = url_for(request, request.param)

        async def make(namespace: str = "authproxy", subject_ttl: float = SUBJECT_TTL):
            store = RedisState(url, namespace=namespace, subject_ttl=subject_ttl, **PATIENT)
            made.append(store)
            await store.start()
            store.check_fresh()  # started means loaded: the view is current
            return store

        async def wait_until(moment: float) -> None:
            while time.time() < moment:
                await asyncio.sleep(max(0.01, moment - time.time()))

        result = Backend("redis", make, time.time, wait_until, url=url, stores=made)
    try:
        yield result
    finally:
        for store in made:
            await finish_closing(store.close(), store, f"{request.param} store")


@pytest.fixture
async def store(state_backend: Backend) -> StateStore:
    return await state_backend.make()


# --- revocation by token ----------------------------------------------------------------


async def test_a_revoked_jti_is_revoked_and_no_other(state_backend: Backend, store: StateStore):
    exp = math.floor(state_backend.clock()) + 300
    await store.revoke_token("jti-1", exp)
    assert store.revoked("jti-1", "alice", state_backend.clock() - 10)
    assert store.revoked("jti-1", "someone-else", None)  # the jti alone decides
    assert not store.revoked("jti-2", "alice", state_backend.clock() - 10)
    assert not store.revoked(None, "alice", state_backend.clock() - 10)


async def test_a_revocation_outlives_its_exp_by_the_longest_leeway(
    state_backend: Backend, store: StateStore
):
    """A token is accepted until exp + the policy's leeway, so its revocation is kept
    EXPIRY_GRACE (the longest leeway a policy may set) past its exp."""
    exp = math.floor(state_backend.clock()) + 2
    await store.revoke_token("jti-1", exp)
    await state_backend.wait_until(exp + 0.5)
    assert store.revoked("jti-1", "alice", None)  # expired, but within any leeway
    assert [r.jti for r in await store.revocations()] == ["jti-1"]
    if state_backend.kind == "memory":  # the real clock cannot wait minutes
        await state_backend.wait_until(exp + EXPIRY_GRACE + 0.5)
        assert not store.revoked("jti-1", "alice", None)


async def test_expired_revocations_are_not_reported(state_backend: Backend, store: StateStore):
    """A revocation ends EXPIRY_GRACE after its exp: `revoked` and `revocations()` (the
    admin API's list of *active* revocations) both forget it; the token is refused as
    expired by every policy from then on.

    One end is whole seconds (like a token's exp), one fractional (the admin API takes any
    number): its Redis key can only expire on a whole second, after the end itself."""
    if state_backend.clock() % 1 > 0.6:  # start early in a second (deterministic timing)
        await state_backend.wait_until(math.ceil(state_backend.clock()))
    base = math.floor(state_backend.clock())  # now is within [base, base + 0.6]
    whole, fractional = base + 1 - EXPIRY_GRACE, base + 1.3 - EXPIRY_GRACE
    await store.revoke_token("whole-second", whole)
    await store.revoke_token("fractional", fractional)
    await store.revoke_token("long-lived", base + 300)
    assert store.revoked("whole-second", "alice", None)
    assert store.revoked("fractional", "alice", None)
    assert {r.jti for r in await store.revocations()} == {
        "whole-second",
        "fractional",
        "long-lived",
    }

    await state_backend.wait_until(base + 1.45)  # both records have ended
    assert not store.revoked("whole-second", "alice", None)
    assert not store.revoked("fractional", "alice", None)
    assert store.revoked("long-lived", "alice", None)
    listed = {r.jti: r.expires for r in await store.revocations()}
    now = state_backend.clock()
    assert set(listed) == {"long-lived"}, f"at {now:.2f}, expired revocations listed: {listed}"


# --- revocation by subject --------------------------------------------------------------


async def test_subject_revocation_covers_tokens_issued_before_the_cutoff(
    state_backend: Backend, store: StateStore
):
    before = math.floor(state_backend.clock()) + 0.5
    await store.revoke_subject("alice", before)
    assert store.revoked("any-jti", "alice", before - 0.5)  # older: revoked
    assert store.revoked(None, "alice", before - 100)
    assert not store.revoked("any-jti", "alice", before)  # issued at the cutoff: not revoked
    assert not store.revoked("any-jti", "alice", before + 1)  # newer: not revoked
    assert store.revoked("any-jti", "alice", None)  # no iat: cannot prove it is newer
    assert not store.revoked("any-jti", "bob", before - 100)  # another subject


@pytest.mark.parametrize("order", ["later-first", "earlier-first"])
async def test_two_subject_revocations_keep_the_later_cutoff(
    state_backend: Backend, store: StateStore, order: str
):
    early = math.floor(state_backend.clock()) - 100.0
    late = early + 50.0
    cutoffs = [late, early] if order == "later-first" else [early, late]
    for cutoff in cutoffs:
        await store.revoke_subject("alice", cutoff)
    assert store.revoked("j", "alice", early + 10)  # between the two cutoffs: still revoked
    assert not store.revoked("j", "alice", late)
    listed = [r for r in await store.revocations() if r.sub == "alice"]
    assert len(listed) == 1
    assert listed[0].before == late
    if state_backend.kind == "redis":
        # A proxy loading the view from Redis sees the same cut-off.
        other = await state_backend.make()
        assert other.revoked("j", "alice", early + 10)
        assert not other.revoked("j", "alice", late)


async def test_revocations_lists_the_active_ones_as_json(state_backend: Backend, store: StateStore):
    assert await store.revocations() == []
    exp = math.floor(state_backend.clock()) + 300
    before = math.floor(state_backend.clock()) - 5
    await store.revoke_token("jti-1", exp)
    await store.revoke_subject("alice", before)
    listed = await store.revocations()
    assert all(isinstance(r, Revocation) for r in listed)
    shapes = sorted((r.as_json() for r in listed), key=lambda j: sorted(j))
    assert shapes == sorted(
        [
            {"jti": "jti-1", "exp": exp},
            {"sub": "alice", "before": before, "expires": before + SUBJECT_TTL},
        ],
        key=lambda j: sorted(j),
    )


# --- single use -------------------------------------------------------------------------


async def test_first_use_is_true_once(state_backend: Backend, store: StateStore):
    exp = math.floor(state_backend.clock()) + 300
    assert await store.first_use("refresh-1", exp) is True
    assert await store.first_use("refresh-1", exp) is False
    assert await store.first_use("refresh-1", exp) is False
    assert await store.first_use("refresh-2", exp) is True


async def test_a_used_token_stays_used_past_its_exp_within_the_leeway(
    state_backend: Backend, store: StateStore
):
    """A single-use token is accepted until exp + leeway: its use is remembered as long."""
    exp = math.floor(state_backend.clock()) + 1
    assert await store.first_use("refresh-1", exp) is True
    await state_backend.wait_until(exp + 1)
    assert await store.first_use("refresh-1", exp) is False


async def test_exactly_one_of_100_concurrent_first_uses_wins(
    state_backend: Backend, store: StateStore
):
    exp = math.floor(state_backend.clock()) + 300
    results = await asyncio.gather(
        *(store.first_use("raced", exp) for _ in range(100)), return_exceptions=True
    )
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    assert errors == [], f"{len(errors)} of 100 first_use calls raised: {errors[:3]}"
    assert results.count(True) == 1
    assert results.count(False) == 99


async def test_exactly_one_first_use_wins_across_two_redis_states(redis_url: str):
    """Two proxies (two RedisState instances) sharing one Redis race on one jti."""
    async with running_state(redis_url, **PATIENT) as a, running_state(redis_url, **PATIENT) as b:
        exp = math.floor(time.time()) + 300
        for round_ in range(3):
            jti = f"shared-{round_}"
            calls = [(a if i % 2 else b).first_use(jti, exp) for i in range(100)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            errors = [repr(r) for r in results if isinstance(r, BaseException)]
            assert errors == [], f"round {round_}: {errors[:3]}"
            assert results.count(True) == 1, f"round {round_}: {results.count(True)} winners"


# --- Redis specifics: bounded storage, propagation, namespaces, outages ---------------------


async def test_every_redis_record_expires(redis_url: str):
    now = time.time()
    exp = math.floor(now) + 120
    subject_ttl = 600.0
    async with raw_client(redis_url) as raw:
        async with running_state(redis_url, namespace="ttl", subject_ttl=subject_ttl) as state:
            await state.revoke_token("jti-1", exp)
            await state.revoke_subject("alice", now)
            assert await state.first_use("refresh-1", exp)
        keys = sorted([k async for k in raw.scan_iter(match="ttl:*")])
        assert keys == [
            "ttl:epoch{ttl:revocations}",
            "ttl:revoked:jti:jti-1",
            "ttl:revoked:sub:alice",
            "ttl:used:refresh-1",
        ]
        ttls = {k: await raw.ttl(k) for k in keys}
        assert all(t > 0 for t in ttls.values()), f"a record without expiry: {ttls}"
        assert ttls["ttl:epoch{ttl:revocations}"] <= EPOCH_TTL
        assert ttls["ttl:revoked:jti:jti-1"] <= 121 + EXPIRY_GRACE
        assert ttls["ttl:used:refresh-1"] <= 121 + EXPIRY_GRACE
        assert subject_ttl - 5 <= ttls["ttl:revoked:sub:alice"] <= subject_ttl + 1
        # Nothing else in the server is left without an expiry either.
        persistent = [k async for k in raw.scan_iter(match="*") if await raw.ttl(k) < 0]
        assert persistent == []


async def test_a_revocation_reaches_another_redis_state(redis_url: str):
    async with running_state(redis_url) as a, running_state(redis_url) as b:
        exp = math.floor(time.time()) + 300
        await a.revoke_token("jti-1", exp)
        await a.revoke_subject("alice", time.time())
        assert await eventually(lambda: b.revoked("jti-1", "x", None), within=1.0)
        assert await eventually(lambda: b.revoked("other", "alice", time.time() - 60), within=1.0)
        # A proxy started afterwards loads them from Redis.
        async with running_state(redis_url) as c:
            assert c.revoked("jti-1", "x", None)
            assert c.revoked("other", "alice", time.time() - 60)
            assert not c.revoked("other", "bob", time.time() - 60)


async def test_namespaces_do_not_see_each_other(redis_url: str):
    async with (
        running_state(redis_url, namespace="tenant-a") as a1,
        running_state(redis_url, namespace="tenant-a") as a2,
        running_state(redis_url, namespace="tenant-b") as b,
    ):
        exp = math.floor(time.time()) + 300
        await a1.revoke_token("jti-1", exp)
        await a1.revoke_subject("alice", time.time())
        # The same namespace sees them (so b's silence below is not just propagation delay).
        assert await eventually(lambda: a2.revoked("jti-1", "x", None), within=1.0)
        assert await eventually(lambda: a2.revoked("j", "alice", time.time() - 60), within=1.0)
        await asyncio.sleep(0.05)
        assert not b.revoked("jti-1", "x", None)
        assert not b.revoked("j", "alice", time.time() - 60)
        assert await b.revocations() == []
        assert len(await a2.revocations()) == 2
        # A fresh tenant-b proxy does not load tenant-a's records either.
        async with running_state(redis_url, namespace="tenant-b") as b2:
            assert not b2.revoked("jti-1", "x", None)
            assert not b2.revoked("j", "alice", time.time() - 60)
        # Single-use records are per namespace too.
        assert await a1.first_use("refresh-1", exp)
        assert not await a2.first_use("refresh-1", exp)
        assert await b.first_use("refresh-1", exp)


async def test_redis_state_fails_closed_without_redis_and_recovers(
    redis_server: RedisServer,
):
    """`check_fresh` raises once no pong came for `staleness`; operations raise
    StateUnavailable; after a restart on the same port the view is current again."""

    async with running_state(redis_server.url, staleness=0.4, timeout=0.2) as state:
        assert not stale(state)
        failures = state.failures_total
        redis_server.kill()
        assert await eventually(lambda: stale(state), within=1.5)
        with pytest.raises(StateUnavailable):
            await state.revoke_token("jti-1", time.time() + 60)
        with pytest.raises(StateUnavailable):
            await state.first_use("jti-1", time.time() + 60)
        with pytest.raises(StateUnavailable):
            await state.revocations()
        assert state.failures_total > failures

        redis_server.restart()
        assert await eventually(lambda: not stale(state), within=5.0)
        assert await state.first_use("jti-1", time.time() + 60)


async def test_a_healthy_redis_state_stays_current_for_many_staleness_periods(
    redis_url: str,
):
    """The heartbeat keeps the view trusted while Redis is up: idle, and with the event
    loop busy serving (16 tasks burning CPU in 0.5 ms slices). Staleness 2 s (heartbeats
    every 0.5 s): three periods per phase prove the renewal, and the 1.5 s slack keeps a
    busy machine's scheduling delays out of it (at 0.4 s they failed it)."""

    async def burn() -> None:
        while True:
            start = time.perf_counter()
            while time.perf_counter() - start < 0.0005:
                pass
            await asyncio.sleep(0)

    staleness = 2.0
    async with running_state(redis_url, staleness=staleness, timeout=staleness) as state:
        for phase in ("idle", "busy"):
            burners = [asyncio.create_task(burn()) for _ in range(16 if phase == "busy" else 0)]
            try:
                deadline = time.monotonic() + 3 * staleness
                while time.monotonic() < deadline:
                    state.check_fresh()  # raises StateUnavailable if the view went stale
                    await asyncio.sleep(0.02)
            finally:
                for task in burners:
                    task.cancel()
                await asyncio.gather(*burners, return_exceptions=True)


async def test_close_returns_right_after_start(redis_url: str):
    """Stopping a proxy must not hang: `RedisState.close()` right after `start()` (the
    follower is then sending its first ping) returns within 1 s, every time."""
    hung = []
    for attempt in range(3):
        state = RedisState(redis_url)
        await state.start()
        if not await finish_closing(state.close(), state, f"close #{attempt}"):
            hung.append(attempt)
    assert hung == [], (
        f"RedisState.close() hung (> 1 s, follower never finished) on attempts {hung} of 3"
    )
