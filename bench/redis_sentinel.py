"""A real Redis Sentinel deployment: one primary, one replica (`--replicaof`) and three
sentinels (`redis-server CONFIG --sentinel`, the same binary), each on a free loopback
port in its own directory, without persistence.

The sentinels monitor the primary as `service` with a quorum of 2, declare it down after
1 s without an answer and fail over to the replica. `kill_primary()` SIGKILLs whichever
server the sentinels name as primary (a crash or a network cut); `wait_failover()` polls
(bounded) until every sentinel names another primary and that one answers as a master.

`start()` returns once the replica is in sync and every sentinel knows the primary, the
replica and the two other sentinels, so a failover can start right away. A start that
fails (a process exits, or the topology is not ready in time) stops everything and
raises with the processes' logs.

For the shared-state tests (`tests/support/redis_sentinel.py` adds the pytest fixtures)
and the benchmark's Sentinel row; nothing here imports pytest or `tests/`.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

from .procs import free_port, stop_process
from .redis_server import RedisNotInstalled
from .redis_server import binary as _binary

__all__ = [
    "DOWN_AFTER_MS",
    "FAILOVER_TIMEOUT_MS",
    "SERVICE",
    "START_TIMEOUT",
    "RedisProcess",
    "SentinelTopology",
]

SERVICE = "mymaster"
#: How long the sentinels wait without an answer before they call the primary down.
DOWN_AFTER_MS = 1000
#: The sentinels' failover timeout (also: how soon a failed failover is tried again).
FAILOVER_TIMEOUT_MS = 3000
#: How long a whole topology may take to be ready (processes up, replica in sync,
#: sentinels aware of each other: their hello messages go out every 2 s).
START_TIMEOUT = 30.0
#: Per command of the harness's own probes.
PROBE_TIMEOUT = 1.0


class RedisProcess:
    """One `redis-server` process (a data server or a sentinel) on a fixed loopback port,
    in its own directory, logging to `redis.log` there."""

    def __init__(self, binary: str, directory: Path, name: str, args: list[str]) -> None:
        self.name = name
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.dir / "redis.log"
        self.command = [binary, *args]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
            )

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError as e:
            return f"(no log: {e})"

    def kill(self) -> None:
        """SIGKILL (no goodbye to clients, like a crash) and reap."""
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """Terminate politely, then kill if it does not go."""
        if self.running:
            assert self.process is not None
            stop_process(self.process)


class SentinelTopology:
    """A primary, a replica and three sentinels monitoring them as `service`.

    With `username`/`password`, the data servers accept only that ACL user (the default
    user is off); the replica and the sentinels authenticate as it, and so must clients.
    """

    def __init__(
        self,
        directory: Path,
        service: str = SERVICE,
        username: str | None = None,
        password: str | None = None,
        binary: str | None = None,
    ) -> None:
        found = binary or _binary()
        if found is None:
            raise RedisNotInstalled("redis-server is not installed: apt-get install redis-server")
        self.binary = found
        self.dir = directory
        self.service = service
        self.username = username
        self.password = password
        self.servers = [
            RedisProcess(self.binary, directory / "primary", "primary", []),
            RedisProcess(self.binary, directory / "replica", "replica", []),
        ]
        primary, replica = self.servers
        for server in self.servers:
            server.command += self._server_args(server)
        replica.command += ["--replicaof", "127.0.0.1", str(primary.port)]
        self.sentinels = [
            RedisProcess(self.binary, directory / f"sentinel-{i}", f"sentinel-{i}", [])
            for i in (1, 2, 3)
        ]
        for sentinel in self.sentinels:
            config = sentinel.dir / "sentinel.conf"  # a sentinel rewrites its config file
            config.write_text(self._sentinel_config(sentinel, primary.port))
            sentinel.command += [str(config), "--sentinel"]
        #: The port of the server started as primary (sentinels may name another later).
        self.initial_primary_port = primary.port

    # --- configuration ------------------------------------------------------------------

    def _server_args(self, server: RedisProcess) -> list[str]:
        args = ["--port", str(server.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(server.dir), "--protected-mode", "no",
                "--replica-announce-ip", "127.0.0.1",
                # A full sync right away (the default waits 5 s for more replicas).
                "--repl-diskless-sync-delay", "0"]  # fmt: skip
        if self.password is not None:
            user = self.username or "default"
            if user == "default":
                args += ["--requirepass", self.password]
            else:
                args += ["--user", "default", "off",
                         "--user", user, "on", f">{self.password}", "~*", "&*", "+@all"]  # fmt: skip
                args += ["--masteruser", user]
            args += ["--masterauth", self.password]
        return args

    def _sentinel_config(self, sentinel: RedisProcess, primary_port: int) -> str:
        lines = [
            f"port {sentinel.port}",
            "bind 127.0.0.1",
            "protected-mode no",
            f'dir "{sentinel.dir}"',
            "sentinel resolve-hostnames no",
            "sentinel announce-ip 127.0.0.1",
            f"sentinel announce-port {sentinel.port}",
            f"sentinel monitor {self.service} 127.0.0.1 {primary_port} 2",
            f"sentinel down-after-milliseconds {self.service} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {self.service} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {self.service} 1",
        ]
        if self.password is not None:
            if self.username and self.username != "default":
                lines.append(f"sentinel auth-user {self.service} {self.username}")
            lines.append(f"sentinel auth-pass {self.service} {self.password}")
        return "\n".join(lines) + "\n"

    # --- addresses ----------------------------------------------------------------------

    @property
    def sentinel_ports(self) -> list[int]:
        return [s.port for s in self.sentinels]

    @property
    def url(self) -> str:
        """`redis+sentinel://[user:password@]127.0.0.1:s1,.../SERVICE` with this
        topology's credentials."""
        return self.url_with()

    def url_with(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        service: str | None = None,
        db: int | None = None,
        query: str = "",
    ) -> str:
        """The sentinel URL, with credentials, service name or database replaced (the
        topology's own when not given)."""
        user = self.username if username is None else username
        secret = self.password if password is None else password
        auth = ""
        if secret is not None:
            auth = f"{quote(user or '', safe='')}:{quote(secret, safe='')}@"
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        path = f"/{service or self.service}" + (f"/{db}" if db is not None else "")
        return f"redis+sentinel://{auth}{hosts}{path}" + (f"?{query}" if query else "")

    def server_on(self, port: int) -> RedisProcess:
        for server in self.servers:
            if server.port == port:
                return server
        raise LookupError(f"no data server of this topology listens on {port}")

    # --- probes (synchronous, each command bounded by PROBE_TIMEOUT) ---------------------

    def client(self, port: int, authenticated: bool = True) -> redis.Redis:
        """A client of one process (a data server, or a sentinel: then no credentials)."""
        data = port not in self.sentinel_ports and authenticated
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            username=self.username if data and self.username != "default" else None,
            password=self.password if data else None,
            socket_timeout=PROBE_TIMEOUT,
            socket_connect_timeout=PROBE_TIMEOUT,
            decode_responses=True,
        )

    def _ask(self, port: int, *command: str):
        with self.client(port) as c:
            return c.execute_command(*command)

    def named_primary(self, sentinel_port: int) -> int | None:
        """The primary's port according to one sentinel (None: it does not answer)."""
        try:
            address = self._ask(sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        except (redis.RedisError, OSError):
            return None
        return int(address[1]) if address else None

    def primary_port(self) -> int:
        """The primary's port, as the first answering sentinel names it."""
        for port in self.sentinel_ports:
            named = self.named_primary(port)
            if named is not None:
                return named
        raise RuntimeError(f"no sentinel of {self.sentinel_ports} names a primary")

    def role(self, port: int) -> str | None:
        """`master` / `slave` as the server on `port` reports itself (None: no answer)."""
        try:
            return str(self._ask(port, "ROLE")[0])
        except (redis.RedisError, OSError):
            return None

    def replication(self, port: int) -> dict[str, str]:
        try:
            with self.client(port) as c:
                return {k: str(v) for k, v in c.info("replication").items()}
        except (redis.RedisError, OSError):
            return {}

    def _sentinel_view(self, port: int) -> tuple[dict, list[dict]] | None:
        try:
            with self.client(port) as c:
                primary = c.execute_command("SENTINEL", "MASTER", self.service)
                replicas = c.execute_command("SENTINEL", "REPLICAS", self.service)
        except (redis.RedisError, OSError):
            return None

        def as_dict(reply) -> dict:
            if isinstance(reply, dict):
                return reply
            return dict(zip(reply[::2], reply[1::2], strict=True))

        return as_dict(primary), [as_dict(r) for r in replicas]

    def _not_ready(self) -> str | None:
        """What the topology still lacks before a failover can work (None: ready)."""
        for process in (*self.servers, *self.sentinels):
            if not process.running:
                assert process.process is not None
                return f"{process.name} exited with status {process.process.returncode}"
        primary, replica = self.servers
        if self.role(primary.port) != "master":
            return "the primary does not answer as master"
        link = self.replication(replica.port).get("master_link_status")
        if link != "up":
            return f"replica link to the primary is {link!r}"
        for sentinel in self.sentinels:
            view = self._sentinel_view(sentinel.port)
            if view is None:
                return f"{sentinel.name} does not answer SENTINEL MASTER {self.service}"
            master, replicas = view
            if int(master.get("port", 0)) != primary.port or "master" not in master.get(
                "flags", ""
            ):
                return f"{sentinel.name} sees the primary as {master}"
            if "down" in master.get("flags", "") or "disconnected" in master.get("flags", ""):
                return f"{sentinel.name} sees the primary as {master.get('flags')}"
            if int(master.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return f"{sentinel.name} knows {master.get('num-other-sentinels')} other sentinels"
            if not any(
                int(r.get("port", 0)) == replica.port and "down" not in r.get("flags", "")
                for r in replicas
            ):
                return f"{sentinel.name} does not know the replica yet ({replicas})"
        return None

    # --- lifecycle ----------------------------------------------------------------------

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} (port {p.port}) ---\n{p.log_tail()}"
            for p in (*self.servers, *self.sentinels)
        )

    def start(self, within: float = START_TIMEOUT) -> float:
        """Start every process and wait (bounded) until a failover could work; the seconds
        it took. The data servers come first, so the sentinels find the replica in the
        primary's first INFO."""
        started = time.monotonic()
        deadline = started + within
        primary, replica = self.servers
        try:
            for group in ([primary], [replica], self.sentinels):
                for process in group:
                    process.launch()
                self._wait(deadline, lambda g=group: self._group_not_ready(g))
            self._wait(deadline, self._not_ready)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - started

    def _group_not_ready(self, group: list[RedisProcess]) -> str | None:
        for process in group:
            if not process.running:
                assert process.process is not None
                return f"{process.name} exited with status {process.process.returncode}"
            if process is self.servers[1]:
                link = self.replication(process.port).get("master_link_status")
                if link != "up":
                    return f"replica link to the primary is {link!r}"
            elif process.port in self.sentinel_ports:
                if self.named_primary(process.port) is None:
                    return f"{process.name} does not name a primary"
            elif self.role(process.port) is None:
                return f"{process.name} does not answer"
        return None

    def _wait(self, deadline: float, not_ready) -> None:
        while (missing := not_ready()) is not None:
            exited = [p for p in (*self.servers, *self.sentinels) if p.process and not p.running]
            if exited or time.monotonic() > deadline:
                raise RuntimeError(f"the sentinel topology did not start: {missing}\n{self.logs()}")
            time.sleep(0.05)  # polling child processes that have no readiness signal

    def kill_primary(self) -> int:
        """SIGKILL the server the sentinels name as primary; its port."""
        port = self.primary_port()
        self.server_on(port).kill()
        return port

    def _failed_over(self, old_port: int) -> int | None:
        named = {self.named_primary(port) for port in self.sentinel_ports}
        if len(named) != 1:
            return None
        (port,) = named
        if port is None or port == old_port or self.role(port) != "master":
            return None
        return port

    async def wait_failover(self, old_port: int, within: float = 30.0) -> tuple[int, float]:
        """Poll (every 50 ms, for up to `within` s) until every sentinel names a primary
        other than `old_port` and that server answers ROLE as master: (its port, seconds
        waited). The probes run in a thread, not in the event loop. On timeout, raises
        with what each sentinel says and the logs."""
        started = time.monotonic()
        while True:
            port = await asyncio.to_thread(self._failed_over, old_port)
            elapsed = time.monotonic() - started
            if port is not None:
                return port, elapsed
            if elapsed > within:
                named = {s: self.named_primary(s) for s in self.sentinel_ports}
                raise AssertionError(
                    f"no failover from port {old_port} within {within:.0f}s; sentinels name"
                    f" {named}\n{self.logs()}"
                )
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        for process in (*self.sentinels, *self.servers):
            process.stop()
