"""Fixtures for a real Redis Sentinel deployment (`bench/redis_sentinel.py`: one primary,
one replica and three sentinels on free loopback ports).

`sentinel_topology` — a started `SentinelTopology` (function scope: a test that kills the
primary never hands its topology to another test), stopped at teardown;
`protected_sentinel_topology` — the same with an ACL user and password on the data
servers. Test modules import them (`from tests.support.redis_sentinel import ...`). A
missing `redis-server` fails the test with the message of `tests/support/redis_server.py`:
it is never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.redis_sentinel import (
    DOWN_AFTER_MS,
    FAILOVER_TIMEOUT_MS,
    SERVICE,
    START_TIMEOUT,
    RedisProcess,
    SentinelTopology,
)
from tests.support.redis_server import redis_server_binary

__all__ = [
    "DOWN_AFTER_MS",
    "FAILOVER_TIMEOUT_MS",
    "PROTECTED_PASSWORD",
    "PROTECTED_USER",
    "SERVICE",
    "START_TIMEOUT",
    "RedisProcess",
    "SentinelTopology",
    "protected_sentinel_topology",
    "sentinel_topology",
]


@pytest.fixture
def sentinel_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    """A started primary + replica + three sentinels (service `mymaster`), stopped at
    teardown."""
    topology = SentinelTopology(tmp_path_factory.mktemp("sentinel"), binary=redis_server_binary())
    topology.start()
    try:
        yield topology
    finally:
        topology.stop()


#: The ACL user and password of `protected_sentinel_topology` (the password needs
#: URL-encoding: `url` encodes it).
PROTECTED_USER = "proxy"
PROTECTED_PASSWORD = "s3cret/p@ss:word"


@pytest.fixture
def protected_sentinel_topology(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SentinelTopology]:
    """Like `sentinel_topology`, but the data servers accept only the ACL user
    PROTECTED_USER with PROTECTED_PASSWORD (the default user is off); its `url` carries
    them."""
    topology = SentinelTopology(
        tmp_path_factory.mktemp("sentinel"),
        username=PROTECTED_USER,
        password=PROTECTED_PASSWORD,
        binary=redis_server_binary(),
    )
    topology.start()
    try:
        yield topology
    finally:
        topology.stop()
