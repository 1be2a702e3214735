"""A real Redis Cluster on loopback: `primaries` `redis-server` nodes in cluster mode
(each a `RedisServer`: free port, no persistence, its own directory), joined with
`redis-cli --cluster create` and ready once every node reports `cluster_state:ok`.

For the shared-state tests and benchmark rows that run against a cluster; nothing here
imports pytest or `tests/`.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from .procs import free_port
from .redis_server import START_TIMEOUT, RedisServer

#: A node's failure is noticed after this many ms (kept short for tests).
NODE_TIMEOUT_MS = 2000
#: A node's cluster bus listens this many ports above its client port.
BUS_OFFSET = 10000
_USUAL_CLI = Path("/usr/bin/redis-cli")


def cli_binary() -> str | None:
    """The `redis-cli` executable (it creates the cluster), or None."""
    return shutil.which("redis-cli") or (str(_USUAL_CLI) if _USUAL_CLI.is_file() else None)


def cluster_state(port: int, timeout: float = 0.5, password: str | None = None) -> str | None:
    """The node's `cluster_state` (`ok`, `fail`), or None when it does not answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            if password is not None:
                s.sendall(f"AUTH {password}\r\n".encode())
                if not s.recv(64).startswith(b"+OK"):
                    return None
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


def _node_args(directory: Path, password: str | None) -> tuple[str, ...]:
    args = (
        "--cluster-enabled", "yes",
        "--cluster-config-file", str(directory / "nodes.conf"),
        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
        # A replica's first full sync right away (the default waits 5 s for more replicas).
        "--repl-diskless-sync-delay", "0",
    )  # fmt: skip
    if password is not None:  # the replicas authenticate to their primaries with it too
        args += ("--requirepass", password, "--masterauth", password)
    return args


class RedisCluster:
    def __init__(
        self,
        directory: Path,
        primaries: int = 3,
        replicas: int = 0,
        password: str | None = None,
        tls: dict[str, str] | None = None,
    ) -> None:
        """`replicas`: per primary (a failover promotes one when its primary stops);
        `password`: the nodes require it (`requirepass`); `tls`: `redis-server` TLS
        options (`tls-cert-file`, `tls-key-file`, `tls-ca-cert-file`, ...): each node
        then also serves TLS on a port of its own (`tls_ports`) and the nodes talk to each
        other over TLS, while the plain ports stay for this harness."""
        cli = cli_binary()
        if cli is None:
            raise RuntimeError("redis-cli is not installed: apt-get install redis-tools")
        self.cli = cli
        self.dir = directory
        self.tls_ports = [free_port() for _ in range(primaries * (1 + replicas))] if tls else []
        self.nodes = []
        for i in range(primaries * (1 + replicas)):
            port = _cluster_port()
            args = _node_args(directory / f"node{i}", password)
            if tls:
                args += ("--tls-port", str(self.tls_ports[i]), "--tls-cluster", "yes",
                         "--tls-replication", "yes", "--cluster-port", str(port + BUS_OFFSET),
                         *(a for k, v in tls.items() for a in (f"--{k}", v)))  # fmt: skip
            self.nodes.append(RedisServer(directory / f"node{i}", port=port, extra_args=args))
        self.replicas = replicas
        self.password = password

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """`redis+cluster://` with every node as a seed (and the password, if any)."""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis+cluster://{auth}" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> float:
        """Start the nodes, join them, wait (bounded) until the cluster serves every slot;
        returns the seconds it took."""
        started = time.monotonic()
        for node in self.nodes:
            node.start()
        created = subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes",
             *(("-a", self.password, "--no-auth-warning") if self.password else ())],
            capture_output=True, text=True, timeout=START_TIMEOUT,
        )  # fmt: skip
        if created.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout[-2000:]}")
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if time.monotonic() > deadline:
                states = {p: self._state(p) for p in self.ports}
                self.stop()
                raise RuntimeError(f"the cluster did not become ready: {states}")
            time.sleep(0.05)  # polling processes that have no readiness signal
        return time.monotonic() - started

    def _ready(self) -> bool:
        """Every node serves all slots and knows every replica as one (a failover needs the
        other primaries to vote for the replica), and the replicas are in sync."""
        if any(self._state(p) != "ok" for p in self.ports):
            return False
        replicas = len(self.nodes) - len(self.nodes) // (1 + self.replicas)
        for port in self.ports:
            with self._client(port) as client:
                view = client.execute_command("CLUSTER", "NODES").decode()
            if view.count("slave") != replicas:
                return False
        return self.replicated()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def _state(self, port: int) -> str | None:
        return cluster_state(port, password=self.password)

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, socket_timeout=2)

    def replicated(self) -> bool:
        """True when every live primary that serves slots has its replicas online (a
        replica that never synced cannot be promoted) and they have everything it has
        written so far (replication offsets equal)."""
        for node in self.nodes:
            if not node.running:
                continue
            with self._client(node.port) as client:
                info = client.info("replication")
                view = client.execute_command("CLUSTER", "NODES").decode()
            (myself,) = [line.split() for line in view.splitlines() if "myself" in line]
            if info["role"] != "master" or len(myself) <= 8:  # a replica, or no slots
                continue
            replicas = [v for k, v in info.items() if k.startswith("slave")]
            if sum(r["state"] == "online" for r in replicas) < self.replicas:
                return False
            if any(r["offset"] < info["master_repl_offset"] for r in replicas):
                return False
        return True

    # --- which node serves what, and failing one ------------------------------------------

    def serving(self, key: str) -> int:
        """The port of the primary that serves `key`'s slot now (asked of a live node)."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                with self._client(node.port) as client:
                    slot = client.cluster("keyslot", key)
                    for start, end, primary, *_ in client.cluster("slots"):
                        if start <= slot <= end:
                            return int(primary[1])
            except redis.RedisError:
                continue
        raise RuntimeError(f"no live node says who serves {key!r}")

    def kill(self, port: int) -> None:
        """SIGKILL the node on `port` (a crash; its replica is promoted after the node
        timeout)."""
        next(node for node in self.nodes if node.port == port).kill()

    def wait_serving(self, key: str, not_by: int, within: float) -> tuple[int, float]:
        """Wait (bounded) until every live node is `ok` again and `key`'s slot is served
        by a primary other than `not_by`; returns that primary's port and the seconds the
        wait took."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            live = [node.port for node in self.nodes if node.running]
            if all(self._state(p) == "ok" for p in live):
                with contextlib.suppress(RuntimeError):
                    if (port := self.serving(key)) != not_by:
                        return port, time.monotonic() - started
            time.sleep(0.05)  # polling processes that have no readiness signal
        raise RuntimeError(f"{key!r} was not served by another primary within {within:.0f}s")
