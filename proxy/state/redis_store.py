"""Shared state in Redis: one server, a Sentinel-managed primary or a Redis Cluster
(`--redis`: `state/redis_target.py`; the connections for each: `state/redis_link.py`).

Records (all under the `namespace` prefix, all with an expiry):

    {ns}:revoked:jti:<jti>  = "<exp>"                 expires at exp + EXPIRY_GRACE
    {ns}:revoked:sub:<sub>  = "<before> <expires>"    expires at before + subject_ttl
    {ns}:used:<jti>         = "1"                     expires at exp + EXPIRY_GRACE (SET NX)
    {ns}:ratelimit:...      the `limits` library's moving windows, expiring with them
    {ns}:epoch{{ns}:revocations}                       a random id: expires after
                                                      EPOCH_TTL, renewed by every heartbeat

Each record is one key, and the one script (a subject revocation) touches one key, so
every command is cluster-safe: keys spread over the slots and no command spans two. The
epoch key's hash tag puts it in the revocation channel's slot: in a cluster, the view
depends on that one shard.

Revocations are also published on `{ns}:revocations` (sharded pub/sub in a cluster).
Each proxy keeps a local view: it subscribes, then loads every record (so nothing
published meanwhile is missed), then applies what is published. Every `staleness / 4` it publishes a heartbeat on the same
channel; receiving messages proves the whole path (Redis up, subscription delivering).
When nothing arrived for `staleness` seconds the view is treated as stale and revocation
checks fail closed (`StateUnavailable`) until the feed is back and the view reloaded;
after twice that the subscription is taken for dead (a failover or a slot move can end
it without an error) and made again.

Redis may come back empty (a restart without persistence, a failover to an empty replica,
a flush). The first replica writes the epoch key (SET NX); each replica remembers the epoch
it saw and reads it again on every load and heartbeat. Missing or different means Redis
lost its records: the replica then writes back (and publishes) every unexpired revocation
in its view and the single-use records it made itself (the last `USED_MEMORY`), and
merges what Redis holds into its view instead of replacing it. So the cluster forgets no
revocation while one replica that saw it keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import secrets
import time
from collections.abc import Callable

from limits.aio.storage import RedisStorage
from redis.exceptions import ConnectionError as RedisConnectionError

from authproxy.state.redis_link import FAILURES, RedisLink, Subscription
from authproxy.state.redis_target import parse_redis_url
from authproxy.state.store import (
    DEFAULT_SUBJECT_TTL,
    EXPIRY_GRACE,
    Revocation,
    RevocationView,
    StateUnavailable,
    lacking,
)

log = logging.getLogger("authproxy.state")

#: Measured on throttled pods (README, Freshness): no spurious staleness at 100m-250m, even
#: with the event loop saturated; 2 s only helped far past overload at 100m.
DEFAULT_STALENESS = 1.0
#: Per operation, and per wait for a pooled connection: at 0.5 s a burst of 100 calls on a
#: CPU-saturated 250m pod failed 36 % of its operations (README, Freshness).
DEFAULT_TIMEOUT = 1.0
MAX_CONNECTIONS = 64
HEARTBEAT = "heartbeat"
#: Lifetime of the epoch key; every heartbeat renews it (so it lasts while any replica runs).
EPOCH_TTL = 24 * 3600
#: How many of its own single-use records a replica remembers, to write back after a reset.
USED_MEMORY = 100_000
#: Records written back per round trip after a reset.
RESEED_BATCH = 500
#: A replica's latest first uses written back (SET NX) on every reconnection: a failover
#: loses at most what the old primary had not replicated, its last moments of writes.
RECENT_USES = 1000

# Keep the later cut-off when two subject revocations race.
_REVOKE_SUBJECT = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local before = tonumber(string.match(cur, '^(%S+)'))
  if before and before >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'EXAT', ARGV[3])
return 1
"""


class RedisState:
    def __init__(
        self,
        url: str,
        namespace: str = "authproxy",
        subject_ttl: float = DEFAULT_SUBJECT_TTL,
        staleness: float = DEFAULT_STALENESS,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        #: One server, a Sentinel-managed primary or a cluster (RedisUrlError otherwise).
        self.target = parse_redis_url(url)
        self.ns = namespace
        self.subject_ttl = subject_ttl
        self.staleness = staleness
        self.clock = clock
        self.timeout = timeout
        self.link = RedisLink(self.target, timeout, MAX_CONNECTIONS)
        self.client = self.link.client
        self.view = RevocationView(clock)
        self.channel = f"{namespace}:revocations"
        self.failures_total = 0
        #: Times Redis was found emptied (the epoch key missing or changed).
        self.resets_total = 0
        #: Uses and revocations fewer replicas than `wait_replicas` acknowledged in time.
        self.unreplicated_total = 0
        self.epoch_key = f"{namespace}:epoch{{{self.channel}}}"  # the channel's slot
        self.epoch: str | None = None  # the epoch this replica last saw (None: not yet)
        self._reset_seen: str | None = None  # the new epoch of the reset last counted
        self._used: dict[str, float] = {}  # jti -> until: first uses recorded here
        self._fresh_until = 0.0  # time.monotonic() until which the view is trusted
        self._follower: asyncio.Task[None] | None = None
        self._closing = False
        self._revoke_subject = self.client.register_script(_REVOKE_SUBJECT)

    def rate_limit_storage(self) -> RedisStorage:
        """The `limits` library's Redis storage, keys under `{namespace}:ratelimit`."""
        return self.link.rate_limit_storage(f"{self.ns}:ratelimit")

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start following revocations; returns once the view is loaded (or after a
        bounded wait: until then, checks fail closed and the follower keeps trying)."""
        loaded = asyncio.Event()
        self._follower = asyncio.create_task(self._follow(loaded))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5 * self.staleness):
                await loaded.wait()

    async def close(self) -> None:
        self._closing = True
        follower = self._follower
        # Cancel until it is done: on Python 3.11 a cancel that lands while redis-py's
        # wait_for is finishing a send can be swallowed.
        while follower is not None and not follower.done():
            follower.cancel()
            await asyncio.wait({follower}, timeout=0.1)
        await self.link.close()

    # --- revocation -----------------------------------------------------------------------

    async def revoke_token(self, jti: str, exp: float) -> None:
        revocation = Revocation(jti=jti, expires=exp)
        async with self._guard("revoke a token"):
            _, replicas = await self.link.set_replicated(
                self._jti_key(jti), repr(exp), exat=math.ceil(revocation.until)
            )
            self._check_replicated(replicas, "revocation of a token")
            await self.link.publish(self.channel, json.dumps(revocation.as_json()))
        self.view.add(revocation)

    async def revoke_subject(self, sub: str, before: float) -> None:
        expires = before + self.subject_ttl
        revocation = Revocation(sub=sub, before=before, expires=expires)
        async with self._guard("revoke a subject"):
            await self._revoke_subject(
                keys=[self._sub_key(sub)], args=[repr(before), repr(expires), math.ceil(expires)]
            )
            await self.link.publish(self.channel, json.dumps(revocation.as_json()))
        self.view.add(revocation)

    async def revocations(self) -> list[Revocation]:
        async with self._guard("list revocations"):
            return await self._load()

    def check_fresh(self) -> None:
        if time.monotonic() > self._fresh_until:
            raise StateUnavailable("revocation state is not current (Redis unreachable?)")

    def revoked(self, jti: str | None, sub: str, iat: float | None) -> bool:
        return self.view.revoked(jti, sub, iat)

    # --- single use -----------------------------------------------------------------------

    async def used(self, jti: str) -> bool:
        async with self._guard("read a token use"):
            return bool(await self.client.exists(f"{self.ns}:used:{jti}"))

    async def first_use(self, jti: str, exp: float) -> bool:
        until = exp + EXPIRY_GRACE
        async with self._guard("record a token use"):
            first, replicas = await self.link.set_replicated(
                f"{self.ns}:used:{jti}", "1", nx=True, exat=math.ceil(until)
            )
            if first:
                self._check_replicated(replicas, "token use")
        if first:
            self._remember_use(jti, until)
        return bool(first)

    def _check_replicated(self, replicas: int | None, what: str) -> None:
        """Count and log a record fewer replicas than `wait_replicas` acknowledged: it
        stands on the primary, and a failover now could lose it."""
        wanted = self.target.wait_replicas
        if replicas is not None and replicas < wanted:
            self.unreplicated_total += 1
            log.warning(
                "redis: a %s reached %d of %d replicas in time (wait_replicas); it stands"
                " on the primary, but a failover now could lose it",
                what,
                replicas,
                wanted,
            )

    def _recent_uses(self) -> list[tuple[str, float]]:
        """The last `RECENT_USES` unexpired first uses recorded here: those a failover may
        have lost before they replicated."""
        now = self.clock()
        latest = itertools.islice(reversed(self._used.items()), RECENT_USES)
        return [(jti, until) for jti, until in latest if until > now]

    def _remember_use(self, jti: str, until: float) -> None:
        """Keep this replica's recent first uses (bounded) to write back after a reset."""
        used = self._used
        used[jti] = until
        if len(used) > USED_MEMORY:  # amortised: drop the expired, then the oldest
            now = self.clock()
            kept = [(j, u) for j, u in used.items() if u > now]
            self._used = dict(kept[-(USED_MEMORY * 3 // 4) :])

    # --- internals ------------------------------------------------------------------------

    def _jti_key(self, jti: str) -> str:
        return f"{self.ns}:revoked:jti:{jti}"

    def _sub_key(self, sub: str) -> str:
        return f"{self.ns}:revoked:sub:{sub}"

    @contextlib.asynccontextmanager
    async def _guard(self, what: str):
        try:
            async with self.link.turn():
                yield
        except FAILURES as e:
            self.failures_total += 1
            log.warning("redis: cannot %s: %s", what, e)
            raise StateUnavailable(f"cannot {what}: state backend unavailable") from None

    async def _load(self) -> list[Revocation]:
        """Every active record (Redis drops a key only at the whole second after it ends)."""
        out: list[Revocation] = []
        prefix = f"{self.ns}:revoked:"
        keys = [k async for k in self.client.scan_iter(match=prefix + "*", count=1000)]
        values = await self.link.mget(keys) if keys else []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue
            kind, _, name = key[len(prefix) :].partition(":")
            try:
                if kind == "jti":
                    out.append(Revocation(jti=name, expires=float(value)))
                elif kind == "sub":
                    before, expires = (float(v) for v in value.split())
                    out.append(Revocation(sub=name, before=before, expires=expires))
            except ValueError:
                log.warning("redis: ignoring malformed revocation record %s", key)
        now = self.clock()
        return [r for r in out if r.until > now]

    async def _sync(self) -> None:
        """Load Redis's revocations into the view, which keeps what it holds (nothing is
        ever un-revoked). When Redis was emptied since this replica last looked (the epoch
        key is missing or another), first write back what this replica holds. Revocations
        the view holds and Redis lacks although its epoch is the same — a failover to a
        replica that had not received them (replication is asynchronous) — are written
        back too, so proxies that start later learn them."""
        mine = secrets.token_hex(8)
        # SET NX GET: the epoch in place, or None when there was none and `mine` is set.
        epoch = await self.client.set(self.epoch_key, mine, nx=True, get=True, ex=EPOCH_TTL)
        epoch = epoch or mine
        reset = self.epoch is not None and epoch != self.epoch
        if reset:
            await self._reseed(epoch)
        records = await self._load()
        missing = lacking(self.view.active(), records)
        self.view.merge(records)
        if missing and not reset:
            log.warning(
                "redis: %d revocations this replica holds were missing from Redis (a failover"
                " before they replicated?); writing them back",
                len(missing),
            )
        if not reset:  # its latest uses too (SET NX: a no-op where Redis has them)
            await self._write_back(missing, self._recent_uses())
        self.epoch = epoch  # only now: a reseed cut short is tried again on the next load

    async def _reseed(self, epoch: str) -> None:
        """Write back (and publish) the unexpired revocations of the view and the
        single-use records this replica made: Redis lost them."""
        now = self.clock()
        revocations = self.view.active()
        uses = [(jti, until) for jti, until in self._used.items() if until > now]
        if self._reset_seen != epoch:  # once per reset, not per retry
            self._reset_seen = epoch
            self.resets_total += 1
            log.warning(
                "redis: the shared state was reset (key %s missing or changed: a restart"
                " without persistence, a failover to an empty replica or a flush?); writing"
                " back %d revocations and %d single-use records this replica holds",
                self.epoch_key,
                len(revocations),
                len(uses),
            )
        await self._write_back(revocations, uses)

    async def _write_back(
        self, revocations: list[Revocation], uses: list[tuple[str, float]]
    ) -> None:
        """Write (and publish) `revocations` and single-use records, in batches. Subject
        records go one by one through their script (which keeps the later cut-off); they
        are few, one per "log out everywhere"."""
        for r in revocations:
            if r.sub is not None:
                args = [repr(r.before), repr(r.expires), math.ceil(r.expires)]
                await self._revoke_subject(keys=[self._sub_key(r.sub)], args=args)
        for start in range(0, max(len(revocations), len(uses)), RESEED_BATCH):
            async with self.client.pipeline(transaction=False) as pipe:
                for r in revocations[start : start + RESEED_BATCH]:
                    if r.jti is not None:
                        pipe.set(self._jti_key(r.jti), repr(r.expires), exat=math.ceil(r.until))
                    self.link.queue_publish(pipe, self.channel, json.dumps(r.as_json()))
                for jti, until in uses[start : start + RESEED_BATCH]:
                    pipe.set(f"{self.ns}:used:{jti}", "1", nx=True, exat=math.ceil(until))
                await pipe.execute()

    async def _follow(self, loaded: asyncio.Event) -> None:
        """Subscribe, load, apply published revocations, ping; reconnect on any failure."""
        delay = 0.1
        while not self._closing:
            try:
                async with self.link.subscription(self.channel) as subscription:
                    await self._sync()
                    self._fresh_until = time.monotonic() + self.staleness
                    loaded.set()
                    if delay > 0.1:
                        log.info("redis: revocation view reloaded; state is current again")
                    delay = 0.1
                    await self._listen(subscription)
            except asyncio.CancelledError:
                raise
            except FAILURES as e:
                self.failures_total += 1
                # Warn once per outage; retries are counted, and logged at debug level.
                (log.warning if delay == 0.1 else log.debug)(
                    "redis: revocation feed lost (%s); checks fail closed after %.1fs; retrying",
                    e,
                    self.staleness,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _listen(self, subscription: Subscription) -> None:
        interval = self.staleness / 4
        next_beat = time.monotonic()
        while not self._closing:
            now = time.monotonic()
            if now >= next_beat:
                # One round trip, also in a cluster: the epoch key is in the channel's slot.
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.getex(self.epoch_key, ex=EPOCH_TTL)
                    self.link.queue_publish(pipe, self.channel, HEARTBEAT)
                    epoch, _ = await pipe.execute()
                if epoch != self.epoch:  # Redis lost its records (or the epoch key)
                    await self._sync()
                next_beat = now + interval
            data = await subscription.message(timeout=interval)
            if data is None:
                if time.monotonic() > self._fresh_until + self.staleness:
                    raise RedisConnectionError("no message, not even a heartbeat, came back")
                continue
            self._fresh_until = time.monotonic() + self.staleness
            if data != HEARTBEAT:
                self._apply(data)

    def _apply(self, data: str) -> None:
        try:
            self.view.add(Revocation.from_json(json.loads(data)))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("redis: ignoring malformed revocation message %r", data[:200])
