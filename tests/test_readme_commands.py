"""The README's commands, run as written against the repository's own files.

`## Running it`: its shell block (found by the heading) runs with bash in a temporary
directory holding a copy of what it reads from the checkout (`policy.yaml`, `examples/`),
so the keys and logs it writes never land in the repository. Visible substitutions, and
no others:

- `python3 -m venv ...` and `pip install ...` are skipped (installing takes minutes and
  needs a package index); `.venv` in the copy is a link to the virtualenv running these
  tests, which holds the project and the example extra, so the block's own
  `. .venv/bin/activate` puts its `bin/` first on PATH (it is removed from the inherited
  PATH, so the activation is what finds `authproxy`);
- the fixed ports 8080 (proxy), 9901 (admin) and 50051 (backend) become free ones.

The block must print the three calls' answers and stop both background processes itself;
whatever is left of its process group is killed at the end.

`### Docker` and `### Envoy ext_authz` (and the command in examples/envoy/envoy.yaml's
header): Docker does not run here, so each `docker run` becomes what the image would run:
its ENTRYPOINT and CMD with the image's ENV (read from the Dockerfile), then the command's
`-e` variables (`-e NAME` takes NAME from the shell, as Docker does), every value naming a
`-v` mount's container path replaced by the host file. Addresses inside the container
(`0.0.0.0:PORT`, the default sidecar listener) become free loopback ports, and the
upstream `backend:50051` an echo backend on loopback. Each command must start with the
shipped `policy.yaml`, keys from `authproxy keygen` and a REFRESH_SECRET, and answer
`/readyz` with 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp
import pytest

from authproxy.keys.keygen import keygen
from authproxy.runtime.serve import DEFAULT_LISTEN
from tests.support.dockerfile import exec_form, final_stage, image_env, in_image
from tests.support.echo_backend import start_echo_backend
from tests.support.readme import README, section, shell_blocks

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
SCRIPT_SECONDS = 120
START_SECONDS = 30
#: The README's fixed ports, rewritten to free ones.
FIXED_PORTS = ("8080", "9901", "50051")
#: Lines of "Running it" that install (skipped: the test's virtualenv stands in).
INSTALL_LINES = ("python3 -m venv ", "pip install ")


# --- reading the README -----------------------------------------------------------------


def commands(block: str, comment: str = "") -> list[str]:
    """The block's commands, continuation lines joined, comment lines dropped; `comment`:
    a prefix every line has (like "#   " in a YAML header) that is removed first."""
    out, pending = [], ""
    for raw in block.splitlines():
        line = raw.removeprefix(comment).strip() if comment else raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without AUTHPROXY_* settings, REFRESH_SECRET or the virtualenv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AUTHPROXY_") and k not in ("REFRESH_SECRET", "VIRTUAL_ENV")
    }
    venv_bin = str(VENV / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return {**env, **extra}


def copy_checkout(dest: Path) -> Path:
    """What the README's commands read from the repository root."""
    shutil.copy2(REPO / "policy.yaml", dest / "policy.yaml")
    shutil.copytree(
        REPO / "examples", dest / "examples", ignore=shutil.ignore_patterns("__pycache__")
    )
    return dest


# --- "Running it" ---------------------------------------------------------------------------


def running_it_script(ports: Mapping[str, int]) -> str:
    (block,) = shell_blocks(section(README, "## Running it"))
    kept = [line for line in block.splitlines() if not line.startswith(INSTALL_LINES)]
    skipped = [line for line in block.splitlines() if line.startswith(INSTALL_LINES)]
    assert len(skipped) == 2, skipped  # exactly the venv and the install, nothing else
    assert any("[example]" in line for line in skipped), "install the example backend's extra"
    script = "\n".join(kept) + "\n"
    for fixed, port in ports.items():
        assert re.search(rf"\b{fixed}\b", script), f"the block no longer uses port {fixed}"
        script = re.sub(rf"\b{fixed}\b", str(port), script)
    return script


def group_members(pgid: int) -> list[int]:
    """Live processes (zombies left out) of process group `pgid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, group = (entry / "stat").read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            found.append(int(entry.name))
    return found


def wait_exited(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait (on pidfds, no polling) until every pid exited; return those still running."""
    running = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], timeout)[0]:
                running.append(pid)
        finally:
            os.close(fd)
    return running


def test_running_it_works_as_written(tmp_path: Path) -> None:
    work = copy_checkout(tmp_path)
    (work / ".venv").symlink_to(VENV, target_is_directory=True)
    ports = {fixed: free_port() for fixed in FIXED_PORTS}
    (work / "running-it.sh").write_text(running_it_script(ports))
    proc = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "running-it.sh"],
        cwd=work,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the background jobs join it
    )
    try:
        out, err = proc.communicate(timeout=SCRIPT_SECONDS)
        logs = "".join(
            f"--- {name} ---\n{(work / name).read_text()}"
            for name in ("backend.log", "proxy.log")
            if (work / name).exists()
        )
        assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}\n{logs}"
        assert "HealthCheck: SERVING" in out, out
        assert "CreateRecord without a token: UNAUTHENTICATED TOKEN_MISSING" in out, out
        assert "CreateRecord with alice's token: record owned by alice" in out, out
        # The client library's quickstart, through the same proxy.
        assert "GetProfile: bob@example.com (user id " in out, out
        assert out.endswith("logged out\n"), out
        # The block's closing `kill` stops the backend and the proxy.
        assert wait_exited(group_members(proc.pid), 20) == [], "a background process kept running"
        assert '"reason":"TOKEN_MISSING"' in (work / "proxy.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_running_it_says_what_the_refresh_secret_needs() -> None:
    text = section(README, "## Running it")
    assert "at least 32 bytes" in text
    assert "--hmac-secret-env refresh-hmac=REFRESH_SECRET" in text
    assert "--refresh-secret-env REFRESH_SECRET" in text


# --- the proxy started as the Docker and Envoy sections say --------------------------------


class Serving:
    """`authproxy serve` (a real process) until every expected port logged "listening"."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
        self.argv, self.env, self.cwd = list(argv), dict(env), cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.seen: list[str] = []

    async def ready(self, ports: Sequence[int], admin: int) -> dict:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.wait_for(self._listening(ports), START_SECONDS)
        async with (
            aiohttp.ClientSession(trust_env=False) as http,
            http.get(f"http://127.0.0.1:{admin}/readyz") as response,
        ):
            body = await response.json()
            assert response.status == 200, (body, self.log())
            return body

    async def _listening(self, ports: Sequence[int]) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        wanted = {f"listening on port {p}" for p in ports}
        while wanted:
            line = (await self.proc.stderr.readline()).decode()
            if not line:
                await self.proc.wait()
                raise AssertionError(f"exited {self.proc.returncode}:\n{self.log()}")
            self.seen.append(line)
            wanted = {w for w in wanted if not re.search(rf"{w}\b", line)}

    def log(self) -> str:
        return f"{shlex.join(self.argv)}\n" + "".join(self.seen)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    """A copy of the checkout's files plus keys/ as "Running it" makes them."""
    copy_checkout(tmp_path)
    keygen("ES256", tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "jwks.json")
    return tmp_path


def docker_runs() -> list[str]:
    (block,) = shell_blocks(section(README, "### Docker"))
    runs = [c for c in commands(block) if c.startswith("docker run ")]
    assert len(runs) >= 1
    return runs


def parse_docker_run(command: str) -> tuple[list[str], dict[str, str | None], list[str], str]:
    """(published `-p` mappings, `-e` variables (None: from the shell), `-v` mounts, image)."""
    words = shlex.split(command)[2:]
    published, variables, mounts = [], {}, []
    while words and words[0].startswith("-"):
        option = words.pop(0)
        if option == "--rm":
            continue
        value = words.pop(0)
        if option == "-p":
            published.append(value)
        elif option == "-e":
            name, sep, rest = value.partition("=")
            variables[name] = rest if sep else None
        elif option == "-v":
            mounts.append(value)
        else:
            raise AssertionError(f"the test does not know docker run {option}")
    assert len(words) == 1, f"docker run ... IMAGE, without arguments after it: {words}"
    return published, variables, mounts, words[0]


def container_env(command: str, work: Path, secret: str) -> tuple[dict[str, str], list[int]]:
    """The environment `authproxy serve` gets in the container, the host files and loopback
    ports standing in for the mounts and container addresses; and the container ports
    the command publishes."""
    published, variables, mounts, image = parse_docker_run(command)
    assert image == "authproxy" == final_stage()
    shell = {"REFRESH_SECRET": secret}
    env: dict[str, str] = dict(image_env(image))
    for name, value in variables.items():
        assert value is not None or name in shell, f"-e {name} from a shell that lacks it"
        env[name] = value if value is not None else shell[name]
    for mount in mounts:
        host, container, *_ = mount.replace("$PWD", str(work)).split(":")
        assert Path(host).is_file(), f"-v {mount}: {host} does not exist"
        env = {k: host if v == container else v for k, v in env.items()}
    return env, [int(p.rpartition(":")[2]) for p in published]


def listener_vars(env: Mapping[str, str]) -> dict[str, str]:
    """The container's listeners: variable -> address (the sidecar's default included)."""
    names = ("AUTHPROXY_ADMIN", "AUTHPROXY_EXT_AUTHZ_GRPC", "AUTHPROXY_EXT_AUTHZ_HTTP")
    found = {n: env[n] for n in names if n in env}
    if "AUTHPROXY_UPSTREAM" in env:
        found["AUTHPROXY_LISTEN"] = env.get("AUTHPROXY_LISTEN", DEFAULT_LISTEN)
    return found


@pytest.mark.parametrize("command", docker_runs())
async def test_docker_run_starts_with_the_shipped_files(command: str, shipped: Path) -> None:
    secret = secrets.token_urlsafe(32)
    env, published = container_env(command, shipped, secret)
    listeners = listener_vars(env)
    container_ports = {int(a.rpartition(":")[2]) for a in listeners.values()}
    assert set(published) <= container_ports, f"-p publishes a port nothing listens on: {command}"
    loopback = {name: free_port() for name in listeners}
    env.update({name: f"127.0.0.1:{port}" for name, port in loopback.items()})
    backend = None
    if "AUTHPROXY_UPSTREAM" in env:
        assert env["AUTHPROXY_UPSTREAM"] == "backend:50051"
        backend = await start_echo_backend()
        env["AUTHPROXY_UPSTREAM"] = f"127.0.0.1:{backend.port}"
    image = final_stage()
    entry = exec_form(in_image(image, "ENTRYPOINT")[-1]) + exec_form(in_image(image, "CMD")[-1])
    assert entry[0] == "authproxy", entry  # the console script the image installs
    argv = [str(VENV / "bin" / "authproxy"), *entry[1:]]
    proxy = Serving(argv, clean_env(**env), shipped)
    try:
        body = await proxy.ready(list(loopback.values()), loopback["AUTHPROXY_ADMIN"])
        assert body["checks"]["keys"].startswith("ok"), body
    finally:
        await proxy.stop()
        if backend is not None:
            await backend.server.stop(None)


def envoy_commands() -> list[tuple[str, str]]:
    (block,) = shell_blocks(section(README, "### Envoy ext_authz"))
    found = [("README", c) for c in commands(block) if c.startswith("authproxy serve ")]
    lines = (REPO / "examples" / "envoy" / "envoy.yaml").read_text().splitlines()
    header = "\n".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
    found += [("envoy.yaml", c) for c in commands(header, "#") if c.startswith("authproxy serve ")]
    assert {where for where, _ in found} == {"README", "envoy.yaml"}
    return found


ENVOY_COMMANDS = envoy_commands()


@pytest.mark.parametrize(
    "command",
    [command for _, command in ENVOY_COMMANDS],
    ids=[f"{where}-{i}" for i, (where, _) in enumerate(ENVOY_COMMANDS)],
)
async def test_envoy_commands_start_with_the_shipped_files(command: str, shipped: Path) -> None:
    ports: list[int] = []

    def loopback(match: re.Match[str]) -> str:
        ports.append(free_port())
        return f"127.0.0.1:{ports[-1]}"

    argv = shlex.split(re.sub(r"(?:0\.0\.0\.0|127\.0\.0\.1):\d+", loopback, command))
    assert ports, command
    admin = free_port()
    argv = [str(VENV / "bin" / "authproxy"), *argv[1:], "--admin", f"127.0.0.1:{admin}"]
    env = clean_env(REFRESH_SECRET=secrets.token_urlsafe(32))
    proxy = Serving(argv, env, shipped)
    try:
        await proxy.ready([*ports, admin], admin)
    finally:
        await proxy.stop()
