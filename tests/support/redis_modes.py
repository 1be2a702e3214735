"""The shared-state tests run against each way the proxy can use Redis: one server, a
Sentinel-managed primary (a primary, a replica, three sentinels) and a Redis Cluster
(three primaries). The `redis_url` fixture is parametrized over the three, so every test
that takes it runs once per mode (test ids `[single]`, `[sentinel]`, `[cluster]`).

The Sentinel topology and the cluster are started once per test session (a few seconds
each) and emptied before every test that gets them; tests that stop or fail over servers
start their own (`sentinel_topology`, `bench.redis_cluster.RedisCluster`).

`raw_client(url)` is a plain client of any of the three (the proxy's own connection code,
`state/redis_link.py`), for tests that look at or change what Redis holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import redis

from authproxy.state.redis_link import Client, RedisLink
from authproxy.state.redis_target import parse_redis_url
from bench.redis_cluster import RedisCluster
from bench.redis_sentinel import SentinelTopology
from tests.support.redis_server import redis_server_binary

MODES = ("single", "sentinel", "cluster")


@pytest.fixture(scope="session")
def session_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    topology = SentinelTopology(
        tmp_path_factory.mktemp("sentinel-shared"), binary=redis_server_binary()
    )
    topology.start()
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="session")
def session_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    redis_server_binary()  # a clear failure, never a skip, when Redis is not installed
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster-shared"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=MODES)
def redis_url(request: pytest.FixtureRequest) -> str:
    """A `--redis` URL of an empty Redis in each mode."""
    return url_for(request, request.param)


def url_for(request: pytest.FixtureRequest, mode: str) -> str:
    """A `--redis` URL of an empty Redis in `mode` (one of MODES), for fixtures that are
    parametrized over more than the Redis modes (in-memory state, say)."""
    if mode == "single":
        return request.getfixturevalue("redis_server").url
    if mode == "sentinel":
        topology: SentinelTopology = request.getfixturevalue("session_sentinel")
        _flush([topology.initial_primary_port])
        return topology.url
    assert mode == "cluster", mode
    cluster: RedisCluster = request.getfixturevalue("session_cluster")
    _flush(cluster.ports)
    return cluster.url


def _flush(ports: list[int]) -> None:
    for port in ports:
        with redis.Redis(port=port, socket_timeout=10) as client:
            client.flushall()


@asynccontextmanager
async def raw_client(url: str, timeout: float = 5.0) -> AsyncIterator[Client]:
    """A client of the Redis `url` names (any mode), closed on exit."""
    link = RedisLink(parse_redis_url(url), timeout, max_connections=8)
    try:
        yield link.client
    finally:
        await link.close()
