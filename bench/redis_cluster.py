"""A real Redis Cluster on loopback: `primaries` `redis-server` nodes in cluster mode
(each a `RedisServer`: free port, no persistence, its own directory), joined with
`redis-cli --cluster create` and ready once every node reports `cluster_state:ok`.

For the shared-state tests and benchmark rows that run against a cluster; nothing here
imports pytest or `tests/`.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .redis_server import START_TIMEOUT, RedisServer

#: A node's failure is noticed after this many ms (kept short for tests).
NODE_TIMEOUT_MS = 2000
#: A node's cluster bus listens this many ports above its client port.
BUS_OFFSET = 10000
_USUAL_CLI = Path("/usr/bin/redis-cli")


def cli_binary() -> str | None:
    """The `redis-cli` executable (it creates the cluster), or None."""
    return shutil.which("redis-cli") or (str(_USUAL_CLI) if _USUAL_CLI.is_file() else None)


def cluster_state(port: int, timeout: float = 0.5) -> str | None:
    """The node's `cluster_state` (`ok`, `fail`), or None when it does not answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"CLUSTER INFO\r\n")
            reply = s.recv(4096).decode("latin-1")
    except OSError:
        return None
    for line in reply.splitlines():
        if line.startswith("cluster_state:"):
            return line.partition(":")[2].strip()
    return None


def _cluster_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too; Redis refuses
    ports above 55535 in cluster mode."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        if _free(port) and _free(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _node_args(directory: Path) -> tuple[str, ...]:
    return (
        "--cluster-enabled", "yes",
        "--cluster-config-file", str(directory / "nodes.conf"),
        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
    )  # fmt: skip


class RedisCluster:
    def __init__(self, directory: Path, primaries: int = 3, replicas: int = 0) -> None:
        """`replicas`: per primary (a failover promotes one when its primary stops)."""
        cli = cli_binary()
        if cli is None:
            raise RuntimeError("redis-cli is not installed: apt-get install redis-tools")
        self.cli = cli
        self.dir = directory
        self.nodes = [
            RedisServer(
                directory / f"node{i}",
                port=_cluster_port(),
                extra_args=_node_args(directory / f"node{i}"),
            )
            for i in range(primaries * (1 + replicas))
        ]
        self.replicas = replicas

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """`redis+cluster://` with every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> float:
        """Start the nodes, join them, wait (bounded) until the cluster serves every slot;
        returns the seconds it took."""
        started = time.monotonic()
        for node in self.nodes:
            node.start()
        created = subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=START_TIMEOUT,
        )  # fmt: skip
        if created.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout[-2000:]}")
        deadline = time.monotonic() + START_TIMEOUT
        while any(cluster_state(p) != "ok" for p in self.ports):
            if time.monotonic() > deadline:
                states = {p: cluster_state(p) for p in self.ports}
                self.stop()
                raise RuntimeError(f"the cluster did not become ready: {states}")
            time.sleep(0.05)  # polling processes that have no readiness signal
        return time.monotonic() - started

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
