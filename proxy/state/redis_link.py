"""The proxy's connections to its Redis, whatever the deployment (`state/redis_target.py`):
one server, a Sentinel-managed primary, or a Redis Cluster. `RedisState` talks to Redis
only through a `RedisLink`; what differs between the modes is here:

- the data client: a pooled `Redis` (one server; Sentinel: each new connection asks the
  sentinels for the primary, so connections made after a failover reach the new one), or
  a `RedisCluster` that routes each key to the node serving its slot and follows slot
  moves and promoted replicas;
- multi-key reads: MGET, or per-slot MGETs in a cluster (no cross-slot command);
- the revocation feed: PUBLISH/SUBSCRIBE on connections that are never retried (a
  subscription that redis-py silently re-made would hide the messages published while it
  was down: the feed must fail, so that the view is reloaded), or in a cluster sharded
  pub/sub (SPUBLISH/SSUBSCRIBE: the channel lives on the shard of its slot; classic
  pub/sub would copy every message, heartbeats included, to every node of the cluster);
- the `limits` library's storage (its cluster storage builds its own cluster client).

Every mode uses the same timeouts, the same bounded pool, and the same retry: a command
that fails on a broken connection is sent again `retries` times after a short jittered
backoff (never on a timeout, where the first try may have been applied).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as redis
from limits.aio.storage import RedisClusterStorage, RedisStorage
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from authproxy.state.redis_target import RedisTarget

#: A cluster client opens up to this many connections per node beyond the commands let
#: through at once (`turn`): subscriptions, topology queries.
CLUSTER_SPARE_CONNECTIONS = 8
#: The `limits` library's cluster client cannot be made to wait for a connection: it may
#: open this many per node before a burst fails (a rate-limit check then fails closed).
LIMITS_CLUSTER_CONNECTIONS = 256
#: Backoff between retries of one command: 10 ms doubling, capped at 100 ms, jittered.
RETRY_BASE = 0.01
RETRY_CAP = 0.1

Client = redis.Redis | RedisCluster
#: What a Redis operation raises when Redis cannot answer (a cluster client also raises
#: RedisClusterException, which is not a RedisError, when no node is reachable).
FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


class RedisLink:
    """The connections of one `RedisState` (data, feed, rate limits) for one target."""

    def __init__(self, target: RedisTarget, timeout: float, max_connections: int) -> None:
        self.target = target
        self.timeout = timeout
        self.max_connections = max_connections
        self.client: Client = self._client(decode_responses=True)
        #: A cluster client fails a command when a node's connections are all busy,
        #: where a pool would wait: commands wait for a turn instead (`turn`).
        self._turns = asyncio.Semaphore(max_connections) if target.cluster else None
        #: Subscriptions' client: the cluster's own (it never retries a subscription), or
        #: a pool of connections without retries.
        self._feed: Client = self.client
        if not target.cluster:
            self._feed = redis.Redis(connection_pool=self._pool(True, retries=0))
        self._limits: RedisStorage | None = None
        self._limits_pool: redis.ConnectionPool | None = None

    # --- commands whose form differs between modes -------------------------------------

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait (up to `timeout`, then TimeoutError) until a command may be sent: at
        most `max_connections` at once, as the one-server and Sentinel pools allow."""
        if self._turns is None:
            yield
            return
        async with asyncio.timeout(self.timeout):
            await self._turns.acquire()
        try:
            yield
        finally:
            self._turns.release()

    async def mget(self, keys: list[str]) -> list[str | None]:
        if isinstance(self.client, RedisCluster):
            return await self.client.mget_nonatomic(keys)
        return await self.client.mget(keys)

    async def set_replicated(self, key: str, value: str, **options: Any) -> tuple[Any, int | None]:
        """SET `key` (redis-py's `set` options) and, with `wait_replicas`, WAIT on the same
        connection for that many replicas to have it (at most half the operation timeout):
        the SET's reply and how many replicas acknowledged (None without WAIT)."""
        wanted = self.target.wait_replicas
        if not wanted:
            return await self.client.set(key, value, **options), None
        wait = ("WAIT", wanted, max(1, int(self.timeout * 500)))
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(key, value, **options)
            if isinstance(self.client, RedisCluster):  # to the node the SET goes to
                pipe.execute_command(*wait, target_nodes=self.client.get_node_from_key(key))
            else:
                pipe.execute_command(*wait)
            reply, replicas = await pipe.execute()
        return reply, int(replicas)

    async def publish(self, channel: str, data: str) -> None:
        if isinstance(self.client, RedisCluster):
            await self.client.spublish(channel, data)
        else:
            await self.client.publish(channel, data)

    def queue_publish(self, pipe: Any, channel: str, data: str) -> None:
        """Add a publish of `data` to a pipeline of this link's client."""
        (pipe.spublish if isinstance(self.client, RedisCluster) else pipe.publish)(channel, data)

    def subscription(self, channel: str) -> Subscription:
        return Subscription(self._feed, channel)

    # --- rate limits and lifecycle ------------------------------------------------------

    def rate_limit_storage(self, key_prefix: str) -> RedisStorage:
        """The `limits` library's storage (its own connections: it reads raw replies),
        with keys under `key_prefix`."""
        if self._limits is not None:
            return self._limits
        if self.target.cluster:
            seeds = ",".join(f"{host}:{port}" for host, port in self.target.nodes)
            options = _cluster_options(self.target, self.timeout, LIMITS_CLUSTER_CONNECTIONS)
            self._limits = RedisClusterStorage(
                f"async+redis+cluster://{seeds}",
                implementation="redispy",
                key_prefix=key_prefix,
                wrap_exceptions=True,
                **options,
            )
        else:  # the URL only names the client library; the pool says where to connect
            self._limits_pool = self._pool(decode_responses=False)
            self._limits = RedisStorage(
                "async+redis://localhost:6379",
                implementation="redispy",
                key_prefix=key_prefix,
                wrap_exceptions=True,
                connection_pool=self._limits_pool,
            )
        return self._limits

    async def close(self) -> None:
        """Close every connection: data, rate limits, and the sentinels."""
        for client in {self.client, self._feed}:
            await client.aclose()
            if isinstance(client, redis.Redis):
                await _close_pool(client.connection_pool)
        if self._limits_pool is not None:
            await _close_pool(self._limits_pool)
        elif self._limits is not None:  # the cluster storage's own client
            await self._limits.bridge.storage.aclose()

    # --- construction -------------------------------------------------------------------

    def _client(self, decode_responses: bool) -> Client:
        if self.target.cluster:
            connections = self.max_connections + CLUSTER_SPARE_CONNECTIONS
            options = _cluster_options(self.target, self.timeout, connections)
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self.target.nodes],
                decode_responses=decode_responses,
                **options,
            )
        return redis.Redis(connection_pool=self._pool(decode_responses))

    def _pool(self, decode_responses: bool, retries: int | None = None) -> redis.ConnectionPool:
        """A blocking pool (callers wait up to `timeout` for a connection under a burst)
        for one server or the Sentinel primary."""
        target = self.target
        common: dict[str, Any] = {
            "decode_responses": decode_responses,
            "max_connections": self.max_connections,
            "timeout": self.timeout,
            **_connection_options(target, self.timeout, retries),
        }
        if not target.sentinel:
            return redis.BlockingConnectionPool.from_url(target.url, **common)
        sentinel = Sentinel(
            list(target.nodes),
            sentinel_kwargs={
                "socket_timeout": self.timeout,
                "socket_connect_timeout": self.timeout,
                **target.sentinel_auth,
            },
        )
        tls: dict[str, Any] = {}
        if target.tls:
            from redis.asyncio.sentinel import SentinelManagedSSLConnection

            tls = {"connection_class": SentinelManagedSSLConnection, **target.tls_files}
        return _BlockingSentinelPool(
            target.service,
            sentinel,
            db=target.db,
            username=target.username,
            password=target.password,
            **tls,
            **common,
        )


class Subscription:
    """The revocation channel's subscription: `async with` subscribes; `message()` is the
    next published payload, or None when none came within `timeout`."""

    def __init__(self, client: Client, channel: str) -> None:
        self.channel = channel
        self.client = client
        self.sharded = isinstance(client, RedisCluster)
        self.pubsub = client.pubsub()

    async def __aenter__(self) -> Subscription:
        if self.sharded:
            # A keyed command first: a failed subscribe does not make the cluster client
            # look for a new primary of the channel's slot, a failed command does.
            await self.client.exists(self.channel)
            await self.pubsub.ssubscribe(self.channel)
        else:
            await self.pubsub.subscribe(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()

    async def message(self, timeout: float) -> str | None:
        if self.sharded:
            got = await self.pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=timeout
            )
        else:
            got = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        if got is None or got["type"] not in ("message", "smessage"):
            return None
        return got["data"]


class _BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool (each new connection goes to the primary the sentinels name) that,
    like the one-server pool, makes a caller wait up to `timeout` for a connection under a
    burst instead of failing with "too many connections"."""


def _retry(retries: int) -> Retry:
    backoff = ExponentialWithJitterBackoff(base=RETRY_BASE, cap=RETRY_CAP)
    return Retry(backoff, retries, supported_errors=(RedisConnectionError,))


def _connection_options(
    target: RedisTarget, timeout: float, retries: int | None = None
) -> dict[str, Any]:
    retries = target.retries if retries is None else retries
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry_on_timeout": False,
        "retry": _retry(retries),
        "retry_on_error": [RedisConnectionError] if retries else [],
    }


def _cluster_options(target: RedisTarget, timeout: float, max_connections: int) -> dict:
    options: dict[str, Any] = {
        "username": target.username,
        "password": target.password,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _retry(target.retries),
        "max_connections": max_connections,
    }
    if target.tls:
        options.update(ssl=True, **target.tls_files)
    return options


async def _close_pool(pool: redis.ConnectionPool) -> None:
    await pool.disconnect()
    if isinstance(pool, SentinelConnectionPool):
        for client in pool.sentinel_manager.sentinels:
            await client.aclose()
