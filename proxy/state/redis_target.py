"""Where the shared Redis is, from `--redis`: one server, or a Sentinel-managed primary.

    redis://[user:password@]host:port[/db]          one server (rediss:// for TLS)
    redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/db]
        the primary that the sentinels at those addresses name for SERVICE; after a
        failover, new connections go to the new primary (`rediss+sentinel://`: TLS to
        the primary; query `sentinel_username` / `sentinel_password` when the sentinels
        require their own credentials, `ssl_ca_certs` / `ssl_certfile` / `ssl_keyfile`
        for TLS files)

The user and password in the URL are the Redis ACL user of the data nodes (URL-encoded).
Any other scheme is refused at start with a message naming the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as redis
from limits.aio.storage import RedisStorage
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_QUERY_KEYS = ("sentinel_username", "sentinel_password", *_TLS_FILES)


class RedisUrlError(ValueError):
    """A `--redis` URL the proxy cannot use; `str()` says why and what would work."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    url: str
    sentinel: bool = False
    #: The sentinels' addresses (Sentinel mode).
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_auth: dict[str, str] = field(default_factory=dict)
    tls_files: dict[str, str] = field(default_factory=dict)


def parse_redis_url(url: str) -> RedisTarget:
    """The target `url` names; RedisUrlError for a scheme or form the proxy cannot use."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in SINGLE_SCHEMES:
        return RedisTarget(url)
    if scheme not in SENTINEL_SCHEMES:
        supported = ", ".join(f"{s}://" for s in (*SINGLE_SCHEMES, *SENTINEL_SCHEMES))
        raise RedisUrlError(
            f"--redis: unsupported scheme {parts.scheme!r} (supported: {supported}; Redis"
            " Cluster is not supported)"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = sorted(set(query) - set(_QUERY_KEYS))
    if unknown:
        raise RedisUrlError(
            f"--redis: unknown parameter(s) {', '.join(unknown)} (known: {', '.join(_QUERY_KEYS)})"
        )
    hosts = parts.netloc.rpartition("@")[2]
    sentinels = tuple(_address(h) for h in hosts.split(",") if h)
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise RedisUrlError(
            "--redis: a Sentinel URL is redis+sentinel://[user:password@]host:port[,host:port"
            "...]/SERVICE[/db]"
        )
    sentinel_auth = {
        k.removeprefix("sentinel_"): v for k, v in query.items() if k.startswith("sentinel_")
    }
    return RedisTarget(
        url,
        sentinel=True,
        sentinels=sentinels,
        service=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=scheme.startswith("rediss"),
        sentinel_auth=sentinel_auth,
        tls_files={k: v for k, v in query.items() if k in _TLS_FILES},
    )


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RedisUrlError(f"--redis: sentinel address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def connection_pool(
    target: RedisTarget, decode_responses: bool, timeout: float, max_connections: int
) -> redis.ConnectionPool:
    """A pool for the data node: a blocking one (callers wait up to `timeout` for a
    connection under a burst) for one server; for Sentinel, one that asks the sentinels
    for the primary on each new connection, so connections made after a failover reach
    the new primary."""
    common: dict[str, Any] = {
        "decode_responses": decode_responses,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry_on_timeout": False,
    }
    if not target.sentinel:
        return redis.BlockingConnectionPool.from_url(
            target.url, max_connections=max_connections, timeout=timeout, **common
        )
    sentinel = _sentinel(target, timeout)
    return _BlockingSentinelPool(
        target.service,
        sentinel,
        max_connections=max_connections,
        timeout=timeout,
        db=target.db,
        username=target.username,
        password=target.password,
        **_tls(target),
        **common,
    )


class _BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool (each new connection goes to the primary the sentinels name) that,
    like the one-server pool, makes a caller wait up to `timeout` for a connection under a
    burst instead of failing with "too many connections"."""


async def close_pool(pool: redis.ConnectionPool) -> None:
    """Close the pool's connections, and for Sentinel the connections to the sentinels."""
    await pool.disconnect()
    if isinstance(pool, SentinelConnectionPool):
        for client in pool.sentinel_manager.sentinels:
            await client.aclose()


def _sentinel(target: RedisTarget, timeout: float) -> Sentinel:
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        **target.sentinel_auth,
    }
    return Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)


def _tls(target: RedisTarget) -> dict[str, Any]:
    if not target.tls:
        return {}
    from redis.asyncio.sentinel import SentinelManagedSSLConnection

    return {"connection_class": SentinelManagedSSLConnection, **target.tls_files}


def rate_limit_storage(key_prefix: str, pool: redis.ConnectionPool) -> RedisStorage:
    """The `limits` library's storage on `pool` (one server, or the Sentinel primary: it
    follows failovers as the pool does), with keys under `key_prefix`. The URL only
    names the client library; the pool says where to connect."""
    return RedisStorage(
        "async+redis://localhost:6379",
        implementation="redispy",
        key_prefix=key_prefix,
        wrap_exceptions=True,
        connection_pool=pool,
    )
