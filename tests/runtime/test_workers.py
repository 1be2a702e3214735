"""`authproxy serve --workers N` as real processes: a supervisor and N workers sharing the
listeners with SO_REUSEPORT, Redis shared state, signals forwarded, a failed worker ending
the whole process, and the configuration refused before any worker starts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests.support.echo_backend import EchoBackend, start_echo_backend
from tests.support.keys import REFRESH_ENV, REFRESH_SECRET, Keys
from tests.support.policies import TEST_POLICY
from tests.support.redis_server import RedisServer
from tests.support.running_proxy import error_info, parse_metrics
from tests.support.tokens import bearer

REPO = Path(__file__).resolve().parents[2]
#: Fresh connections per round: all on one worker by chance is 2 ** -39.
CONNECTIONS = 40
STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def free_ports(count: int) -> int:
    """The first of `count` consecutive free loopback ports."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count > 65535:
            continue
        held = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise AssertionError("no consecutive free ports")


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """The process runs (a zombie no longer does)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_of(int(entry.name)) == pid:
            found.append(int(entry.name))
    return found


def serve_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    env[REFRESH_ENV] = REFRESH_SECRET.decode()
    return env


@dataclass
class Supervised:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reading: bool = True  # stderr is still open

    @property
    def text(self) -> str:
        return "".join(self.lines)

    async def wait_for(self, pattern: str, count: int = 1, within: float = 40) -> list[str]:
        """The first `count` stderr lines matching `pattern` (a regex), waiting for them."""
        deadline = time.monotonic() + within
        while True:
            found = [line for line in self.lines if re.search(pattern, line)]
            if len(found) >= count:
                return found[:count]
            if not self.reading:
                raise AssertionError(f"exited without {count} x {pattern!r}:\n{self.text}")
            assert time.monotonic() < deadline, f"no {count} x {pattern!r} in:\n{self.text}"
            await asyncio.sleep(0.02)

    @property
    def workers(self) -> dict[int, int]:
        """worker index -> pid, from the supervisor's log."""
        return {int(m[1]): int(m[2]) for m in STARTED.finditer(self.text)}

    async def read(self) -> None:
        assert self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            self.lines.append(raw.decode(errors="replace"))
        self.reading = False


@asynccontextmanager
async def supervised(*flags: str) -> AsyncIterator[Supervised]:
    """`python -m authproxy serve FLAGS` with stderr collected; at exit the supervisor and any
    worker it started that is still there are killed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authproxy", "serve", *flags, "--decision-log", "off",
        cwd=REPO, env=serve_env(), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    running = Supervised(proc)
    reader = asyncio.create_task(running.read())
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in running.workers.values():
            with contextlib.suppress(OSError):  # gone already
                if alive(pid) and b"--worker-index" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(reader, 10)


@dataclass
class Ports:
    listen: int
    admin: int  # and admin + 1
    check_grpc: int
    check_http: int


def worker_flags(
    tmp_path: Path, keys: Keys, backend: EchoBackend, redis_url: str
) -> tuple[Ports, list[str]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    first = free_ports(5)
    ports = Ports(listen=first, admin=first + 1, check_grpc=first + 3, check_http=first + 4)
    return ports, [
        "--workers", "2", "--redis", redis_url, "--state-staleness", "5s",
        "--policy", str(policy), "--jwks", str(keys.jwks),
        "--hmac-secret-env", f"refresh-hmac={REFRESH_ENV}",
        "--listen", f"127.0.0.1:{ports.listen}", "--upstream", f"127.0.0.1:{backend.port}",
        "--no-upstream-reflection", "--admin", f"127.0.0.1:{ports.admin}",
        "--shutdown-grace", "1", "--no-policy-watch",
    ]  # fmt: skip


async def started(running: Supervised, ports: Ports) -> dict[int, int]:
    """Wait until both workers listen and are ready; worker index -> pid."""
    await running.wait_for(r"\[worker [01]\]: authproxy listening on port", count=2)
    async with aiohttp.ClientSession() as session:
        for admin in (ports.admin, ports.admin + 1):
            deadline = time.monotonic() + 20
            while True:
                async with session.get(f"http://127.0.0.1:{admin}/readyz") as answer:
                    if answer.status == 200:
                        break
                assert time.monotonic() < deadline, await answer.text()
                await asyncio.sleep(0.05)
    workers = running.workers
    assert sorted(workers) == [0, 1]
    for pid in workers.values():
        assert parent_of(pid) == running.proc.pid
    return workers


async def fresh_calls(port: int, method: str, token: str) -> list[str]:
    """One call on each of CONNECTIONS new connections: "OK" or the deny's reason."""

    async def one() -> str:
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            try:
                await channel.unary_unary(method)(b"{}", metadata=bearer(token), timeout=15)
            except grpc.aio.AioRpcError as e:
                info = error_info(e)
                return info.reason if info is not None else e.code().name
            return "OK"

    return list(await asyncio.gather(*(one() for _ in range(CONNECTIONS))))


async def decisions(admin: int, **labels: str) -> float:
    """Sum of `authproxy_requests_total` on one worker's /metrics with these labels."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin}/metrics") as answer,
    ):
        _, samples = parse_metrics(await answer.text())
    return sum(
        s.value
        for s in samples
        if s.name == "authproxy_requests_total"
        and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_two_workers_share_the_ports_and_stop_on_sigterm(
    tmp_path: Path,
    keys: Keys,
    issuer,
    redis_server: RedisServer,
):
    backend = await start_echo_backend()
    ports, flags = worker_flags(tmp_path, keys, backend, redis_server.url)
    flags += ["--ext-authz-grpc", f"127.0.0.1:{ports.check_grpc}"]
    flags += ["--ext-authz-http", f"127.0.0.1:{ports.check_http}"]
    try:
        async with supervised(*flags) as running:
            workers = await started(running, ports)
            # Every listener opened in both workers (SO_REUSEPORT).
            await running.wait_for(r"\[worker [01]\]: ext_authz gRPC", count=2)
            await running.wait_for(r"\[worker [01]\]: ext_authz HTTP", count=2)

            token = issuer.mint("access", "alice", ttl=300).token
            answers = await fresh_calls(ports.listen, "/test.Access/Report", token)
            assert answers == ["OK"] * CONNECTIONS
            # The kernel spread the connections: each worker decided some of them.
            per_worker = [
                await decisions(admin, decision="allow") for admin in (ports.admin, ports.admin + 1)
            ]
            assert all(n > 0 for n in per_worker), per_worker
            assert sum(per_worker) == CONNECTIONS

            check = external_auth_pb2.CheckRequest(
                attributes=attrs.AttributeContext(
                    request=attrs.AttributeContext.Request(
                        http=attrs.AttributeContext.HttpRequest(
                            method="POST",
                            path="/test.Access/Echo",
                            headers={"authorization": f"Bearer {token}"},
                        )
                    )
                )
            )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.check_grpc}") as channel:
                response = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(check)
            assert response.status.code == 0
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{ports.check_http}/test.Access/Echo") as answer,
            ):
                assert answer.status == 401

            # SIGHUP reaches every worker: each reloads the edited policy.
            (tmp_path / "policy.yaml").write_text(TEST_POLICY + "# edited\n")
            running.proc.send_signal(signal.SIGHUP)
            await running.wait_for(r"\[worker [01]\]: policy reloaded \(SIGHUP\)", count=2)

            running.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(running.proc.wait(), 20) == 0
            assert not any(alive(pid) for pid in workers.values())
            await running.wait_for(r"\[worker [01]\]: shutting down", count=2)
            await running.wait_for("all workers stopped")
    finally:
        await backend.server.stop(None)


async def test_a_revocation_posted_to_worker_0_is_enforced_by_worker_1(
    tmp_path: Path,
    keys: Keys,
    issuer,
    redis_server: RedisServer,
):
    backend = await start_echo_backend()
    ports, flags = worker_flags(tmp_path, keys, backend, redis_server.url)
    try:
        async with supervised(*flags) as running:
            workers = await started(running, ports)
            minted = issuer.mint("access", "alice", ttl=300)
            assert (
                await fresh_calls(ports.listen, "/test.Access/Report", minted.token)
                == ["OK"] * CONNECTIONS
            )

            body = {"jti": minted.jti, "exp": minted.exp}
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"http://127.0.0.1:{ports.admin}/v1/revocations", json=body) as answer,
            ):
                assert answer.status == 201, await answer.text()
            deadline = time.monotonic() + 10
            while True:  # until the revocation reached both workers' views
                answers = await fresh_calls(ports.listen, "/test.Access/Report", minted.token)
                if answers == ["TOKEN_REVOKED"] * CONNECTIONS:
                    break
                assert time.monotonic() < deadline, answers
                await asyncio.sleep(0.1)
            assert await decisions(ports.admin + 1, reason="TOKEN_REVOKED") > 0

            # Without their supervisor the workers do not serve on: they stop by themselves.
            running.proc.kill()
            await running.proc.wait()
            deadline = time.monotonic() + 15
            while any(alive(pid) for pid in workers.values()):
                assert time.monotonic() < deadline, running.text
                await asyncio.sleep(0.05)
            await running.wait_for(r"\[worker [01]\]: the supervisor is gone", count=2)
    finally:
        await backend.server.stop(None)


async def test_a_worker_that_dies_stops_the_others_and_the_supervisor_fails(
    tmp_path: Path,
    keys: Keys,
    redis_server: RedisServer,
):
    backend = await start_echo_backend()
    ports, flags = worker_flags(tmp_path, keys, backend, redis_server.url)
    try:
        async with supervised(*flags) as running:
            workers = await started(running, ports)
            os.kill(workers[1], signal.SIGKILL)
            assert await asyncio.wait_for(running.proc.wait(), 20) != 0
            assert not alive(workers[0])
            await running.wait_for(
                rf"worker 1 \(pid {workers[1]}\) exited unexpectedly \(killed by SIGKILL\)"
            )
            await running.wait_for(r"\[worker 0\]: shutting down")  # asked to stop: drained
    finally:
        await backend.server.stop(None)


async def test_one_worker_is_the_plain_process(tmp_path: Path, keys: Keys):
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    async with supervised(
        "--workers", "1", "--policy", str(policy), "--jwks", str(keys.jwks),
        "--hmac-secret-env", f"refresh-hmac={REFRESH_ENV}",
        "--ext-authz-grpc", "127.0.0.1:0", "--shutdown-grace", "1",
    ) as running:  # fmt: skip
        await running.wait_for("ext_authz gRPC")
        assert children_of(running.proc.pid) == []
        assert "worker" not in running.text
        running.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.proc.wait(), 20) == 0


async def run_serve(*flags: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authproxy", "serve", *flags,
        cwd=REPO, env=env or serve_env(), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_configurations_workers_cannot_run_are_refused_before_any_worker(
    tmp_path: Path, keys: Keys
):
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    base = [
        "--policy", str(policy), "--jwks", str(keys.jwks),
        "--hmac-secret-env", f"refresh-hmac={REFRESH_ENV}",
    ]  # fmt: skip
    check_grpc = ["--ext-authz-grpc", f"127.0.0.1:{free_ports(1)}"]
    two = ["--workers", "2", "--redis", "redis://127.0.0.1:1"]  # Redis is never reached
    missing = ["--jwks", str(tmp_path / "missing.json")]
    env = serve_env() | {"AUTHPROXY_WORKERS": "2"}  # the variable works like the flag
    cases = {
        "memory": run_serve(*base, *check_grpc, env=env),
        "listen": run_serve(*base, *two, "--upstream", "127.0.0.1:1", "--listen", "127.0.0.1:0"),
        "admin": run_serve(*base, *two, *check_grpc, "--admin", "0"),
        "zero": run_serve(*base, *check_grpc, "--workers", "0"),
        "bad key file, one process": run_serve(*base, *missing, *check_grpc),
        "bad key file, workers": run_serve(*base, *missing, *two, *check_grpc),
    }
    results = dict(zip(cases, await asyncio.gather(*cases.values()), strict=True))
    for name, (code, err) in results.items():
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1, (name, err)
        assert err.startswith("authproxy: error: "), (name, err)
        assert "started" not in err, (name, err)
    assert "--workers 2 needs shared state" in results["memory"][1]
    assert "give --redis URL" in results["memory"][1]
    assert "--workers 2 needs fixed ports: --listen 127.0.0.1:0" in results["listen"][1]
    assert "--admin 127.0.0.1:0" in results["admin"][1]
    assert "--workers" in results["zero"][1]
    # A configuration problem is reported exactly as by a single process.
    assert results["bad key file, workers"] == results["bad key file, one process"]
