"""Shared state in Redis (`--redis redis://...`, `rediss://` for TLS; password in the URL).

Records (all under the `namespace` prefix, all with an expiry):

    {ns}:revoked:jti:<jti>  = "<exp>"                 expires at exp + EXPIRY_GRACE
    {ns}:revoked:sub:<sub>  = "<before> <expires>"    expires at before + subject_ttl
    {ns}:used:<jti>         = "1"                     expires at exp + EXPIRY_GRACE (SET NX)
    {ns}:ratelimit:...      the `limits` library's moving windows, expiring with them

Revocations are also published on `{ns}:revocations`. Each proxy keeps a local view:
it subscribes, then loads every record (so nothing published meanwhile is missed), then
applies what is published. Every `staleness / 4` it publishes a heartbeat on the same
channel; receiving messages proves the whole path (Redis up, subscription delivering).
When nothing arrived for `staleness` seconds the view is treated as stale and revocation
checks fail closed (`StateUnavailable`) until the feed is back and the view reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable

import redis.asyncio as redis
from limits.aio.storage import RedisStorage
from redis.exceptions import RedisError

from .state import DEFAULT_SUBJECT_TTL, EXPIRY_GRACE, Revocation, RevocationView, StateUnavailable

log = logging.getLogger("authproxy.state")

DEFAULT_STALENESS = 1.0
DEFAULT_TIMEOUT = 0.5
MAX_CONNECTIONS = 64
HEARTBEAT = "heartbeat"

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
        self.ns = namespace
        self.subject_ttl = subject_ttl
        self.staleness = staleness
        self.clock = clock
        self.timeout = timeout
        self.client = redis.Redis(connection_pool=self._pool(decode_responses=True))
        self.view = RevocationView(clock)
        self.channel = f"{namespace}:revocations"
        self.failures_total = 0
        self._fresh_until = 0.0  # time.monotonic() until which the view is trusted
        self._follower: asyncio.Task[None] | None = None
        self._closing = False
        self._revoke_subject = self.client.register_script(_REVOKE_SUBJECT)
        self._limits: RedisStorage | None = None
        self._limits_pool: redis.BlockingConnectionPool | None = None

    def _pool(self, decode_responses: bool) -> redis.BlockingConnectionPool:
        # A blocking pool: under a burst, callers wait (up to `timeout`) for a connection
        # instead of failing with "too many connections".
        return redis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=MAX_CONNECTIONS,
            timeout=self.timeout,
            decode_responses=decode_responses,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry_on_timeout=False,
        )

    def rate_limit_storage(self) -> RedisStorage:
        """The `limits` library's Redis storage (its own pool: it reads raw replies), keys
        under `{namespace}:ratelimit`."""
        if self._limits is None:
            self._limits_pool = self._pool(decode_responses=False)
            self._limits = RedisStorage(
                "async+" + self.url,
                implementation="redispy",
                key_prefix=f"{self.ns}:ratelimit",
                wrap_exceptions=True,
                connection_pool=self._limits_pool,
            )
        return self._limits

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start following revocations; returns once the view is loaded (or after a
        bounded wait: until then, checks fail closed and the follower keeps trying)."""
        loaded = asyncio.Event()
        self._follower = asyncio.create_task(self._follow(loaded))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(loaded.wait(), 5 * self.staleness)

    async def close(self) -> None:
        self._closing = True
        follower = self._follower
        # Cancel until it is done: on Python 3.11 a cancel that lands while redis-py's
        # wait_for is finishing a send can be swallowed.
        while follower is not None and not follower.done():
            follower.cancel()
            await asyncio.wait({follower}, timeout=0.1)
        await self.client.aclose()
        await self.client.connection_pool.disconnect()
        if self._limits_pool is not None:
            await self._limits_pool.disconnect()

    # --- revocation -----------------------------------------------------------------------

    async def revoke_token(self, jti: str, exp: float) -> None:
        revocation = Revocation(jti=jti, expires=exp)
        async with self._guard("revoke a token"):
            await self.client.set(self._jti_key(jti), repr(exp), exat=math.ceil(revocation.until))
            await self.client.publish(self.channel, json.dumps(revocation.as_json()))
        self.view.add(revocation)

    async def revoke_subject(self, sub: str, before: float) -> None:
        expires = before + self.subject_ttl
        revocation = Revocation(sub=sub, before=before, expires=expires)
        async with self._guard("revoke a subject"):
            await self._revoke_subject(
                keys=[self._sub_key(sub)], args=[repr(before), repr(expires), math.ceil(expires)]
            )
            await self.client.publish(self.channel, json.dumps(revocation.as_json()))
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
        async with self._guard("record a token use"):
            return bool(
                await self.client.set(
                    f"{self.ns}:used:{jti}", "1", nx=True, exat=math.ceil(exp + EXPIRY_GRACE)
                )
            )

    # --- internals ------------------------------------------------------------------------

    def _jti_key(self, jti: str) -> str:
        return f"{self.ns}:revoked:jti:{jti}"

    def _sub_key(self, sub: str) -> str:
        return f"{self.ns}:revoked:sub:{sub}"

    @contextlib.asynccontextmanager
    async def _guard(self, what: str):
        try:
            yield
        except (RedisError, OSError, TimeoutError) as e:
            self.failures_total += 1
            log.warning("redis: cannot %s: %s", what, e)
            raise StateUnavailable(f"cannot {what}: state backend unavailable") from None

    async def _load(self) -> list[Revocation]:
        """Every active record (Redis drops a key only at the whole second after it ends)."""
        out: list[Revocation] = []
        prefix = f"{self.ns}:revoked:"
        keys = [k async for k in self.client.scan_iter(match=prefix + "*", count=1000)]
        values = await self.client.mget(keys) if keys else []
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

    async def _follow(self, loaded: asyncio.Event) -> None:
        """Subscribe, load, apply published revocations, ping; reconnect on any failure."""
        delay = 0.1
        while not self._closing:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self.view.replace(await self._load())
                self._fresh_until = time.monotonic() + self.staleness
                loaded.set()
                if delay > 0.1:
                    log.info("redis: revocation view reloaded; state is current again")
                delay = 0.1
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as e:
                self.failures_total += 1
                # Warn once per outage; retries are counted, and logged at debug level.
                (log.warning if delay == 0.1 else log.debug)(
                    "redis: revocation feed lost (%s); checks fail closed after %.1fs; retrying",
                    e,
                    self.staleness,
                )
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _listen(self, pubsub: redis.client.PubSub) -> None:
        interval = self.staleness / 4
        next_beat = time.monotonic()
        while not self._closing:
            now = time.monotonic()
            if now >= next_beat:
                await self.client.publish(self.channel, HEARTBEAT)
                next_beat = now + interval
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=interval)
            if message is None or message["type"] != "message":
                continue
            self._fresh_until = time.monotonic() + self.staleness
            if message["data"] != HEARTBEAT:
                self._apply(message["data"])

    def _apply(self, data: str) -> None:
        try:
            record = json.loads(data)
            if "jti" in record:
                self.view.add(Revocation(jti=str(record["jti"]), expires=float(record["exp"])))
            else:
                self.view.add(
                    Revocation(
                        sub=str(record["sub"]),
                        before=float(record["before"]),
                        expires=float(record["expires"]),
                    )
                )
        except (ValueError, KeyError, TypeError):
            log.warning("redis: ignoring malformed revocation message %r", data[:200])
