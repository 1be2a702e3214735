"""The Redis Cluster the shared-state tests will run against (`bench/redis_cluster.py`):
three primaries that serve every slot, with keys spread over all of them."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient

from bench.redis_cluster import RedisCluster, cluster_state
from tests.support.redis_server import redis_server_binary


async def test_three_primaries_serve_every_slot_and_share_the_keys(tmp_path: Path):
    redis_server_binary()  # a clear failure, never a skip, when Redis is not installed
    cluster = RedisCluster(tmp_path / "cluster")
    try:
        took = cluster.start()
        print(f"cluster of {len(cluster.ports)} primaries ready in {took:.2f} s")
        assert [cluster_state(p) for p in cluster.ports] == ["ok"] * 3
        assert cluster.url.startswith("redis+cluster://127.0.0.1:")
        client = ClusterClient(
            startup_nodes=[ClusterNode("127.0.0.1", cluster.ports[0])], decode_responses=True
        )
        try:
            for i in range(60):
                await client.set(f"authproxy:revoked:jti:{i}", "1")
            sizes = [await client.dbsize(target_nodes=node) for node in client.get_primaries()]
            assert all(size > 0 for size in sizes) and sum(sizes) == 60, sizes
        finally:
            await client.aclose()
    finally:
        cluster.stop()
    assert cluster_state(cluster.ports[0]) is None  # stopped
