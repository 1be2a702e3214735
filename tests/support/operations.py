"""Proxies for the operations tests: an in-process `AuthProxy` (sidecar plus admin listener
on loopback) whose policy watch is live (`watched_proxy`), a real `python -m authproxy
serve` process (`serve_process`), and policy files written the way editors and Kubernetes
write them (`write_atomically`, `ConfigMapMount`)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authproxy.runtime.serve import ServeConfig
from tests.support.echo_backend import EchoBackend
from tests.support.keys import REFRESH_ENV, REFRESH_SECRET, Keys
from tests.support.running_proxy import RunningProxy, running_proxy

REPO = Path(__file__).resolve().parents[2]


# --- policy files -------------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one rename, as editors and `kubectl cp` do: a watcher never sees
    a half-written file."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


class ConfigMapMount:
    """The layout kubelet gives a mounted ConfigMap:

        dir/..2026_x/policy.yaml         the files of one version
        dir/..data -> ..2026_x           the version in use
        dir/policy.yaml -> ..data/policy.yaml

    An update writes a new timestamped directory, points a temporary symlink at it,
    renames that onto `..data` (one atomic step) and removes the old directory."""

    def __init__(self, directory: Path, text: str) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.generation = 0
        self.current = self._version_dir(text)
        (self.dir / "..data").symlink_to(self.current.name)
        (self.dir / "policy.yaml").symlink_to("..data/policy.yaml")

    @property
    def path(self) -> Path:
        return self.dir / "policy.yaml"

    def _version_dir(self, text: str) -> Path:
        self.generation += 1
        version = self.dir / f"..2026_01_01_00_00_{self.generation:02d}.{self.generation:09d}"
        version.mkdir()
        (version / "policy.yaml").write_text(text)
        return version

    def update(self, text: str) -> None:
        old = self.current
        self.current = self._version_dir(text)
        scratch = self.dir / "..data_tmp"
        scratch.symlink_to(self.current.name)
        os.replace(scratch, self.dir / "..data")
        (old / "policy.yaml").unlink()
        old.rmdir()


# --- one proxy in the test's event loop ---------------------------------------------------


def proxy_config(
    keys: Keys, policy_path: Path, backend: EchoBackend | None = None, **fields: Any
) -> ServeConfig:
    os.environ[REFRESH_ENV] = REFRESH_SECRET.decode()
    cfg = ServeConfig(
        policy=str(policy_path),
        jwks=[str(keys.jwks)],
        hmac_secret_envs=[f"refresh-hmac={REFRESH_ENV}"],
        listen="127.0.0.1:0",
        upstream=f"127.0.0.1:{backend.port}" if backend is not None else None,
        upstream_reflection=False,
        admin="127.0.0.1:0",
        shutdown_grace=0.5,
    )
    for key, value in fields.items():
        assert hasattr(cfg, key), key
        setattr(cfg, key, value)
    return cfg


async def watching(node: RunningProxy, attempts: int = 20) -> None:
    """Return once the policy watch reports changes: the policy file's times are set
    (its text untouched) until two touches in a row are each followed by a reload,
    counted as `unchanged`. Two, because a proxy may also reload once as its watch
    starts; touches are spaced past the debounce, so each causes at most one. (A file
    written beside the policy would not do: the watch ignores files it does not follow.)"""
    results = node.proxy.reloader.results
    seen = 0
    for _attempt in range(attempts):
        before = results["unchanged"]
        os.utime(node.policy_path)  # the policy file's times change, its text does not
        for _ in range(25):
            await asyncio.sleep(0.02)
            if results["unchanged"] > before:
                break
        seen = seen + 1 if results["unchanged"] > before else 0
        if seen == 2:
            node.baseline = dict(results)
            return
    raise AssertionError("the policy watch reported no change")


@asynccontextmanager
async def watched_proxy(
    keys: Keys,
    backend: EchoBackend,
    policy_path: Path,
    policy: str | None = None,
    **fields: Any,
) -> AsyncIterator[RunningProxy]:
    """The proxy (sidecar in front of `backend`, admin API on loopback, policy watched) on
    `policy_path`, written first when `policy` is given. With the watch on, it is live
    before the test starts (`watching`)."""
    if policy is not None:
        policy_path.parent.mkdir(parents=True, exist_ok=True)
        policy_path.write_text(policy)
    cfg = proxy_config(keys, policy_path, backend, **fields)
    async with running_proxy(cfg) as node:
        if cfg.watch_policy:
            await watching(node)
        yield node


# --- `python -m authproxy serve` as a process -------------------------------------------------


@dataclass
class ServeProcess:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    async def wait_for_line(self, needle: str, within: float = 30) -> str:
        """The next stderr line containing `needle` (earlier lines are kept in `lines`)."""

        async def read() -> str:
            assert self.proc.stderr is not None
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError("authproxy exited early:\n" + "".join(self.lines))
                line = raw.decode()
                self.lines.append(line)
                if needle in line:
                    return line

        return await asyncio.wait_for(read(), within)

    async def port_of(self, needle: str) -> int:
        line = await self.wait_for_line(needle)
        return int(line.split("listening on port ")[1].split(",")[0].split()[0])

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)


@asynccontextmanager
async def serve_process(
    keys: Keys, policy_path: Path, backend: EchoBackend, *flags: str
) -> AsyncIterator[ServeProcess]:
    """`python -m authproxy serve` in front of `backend`, admin API on a loopback port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    env[REFRESH_ENV] = REFRESH_SECRET.decode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authproxy", "serve",
        "--policy", str(policy_path), "--listen", "127.0.0.1:0",
        "--upstream", f"127.0.0.1:{backend.port}", "--no-upstream-reflection",
        "--admin", "127.0.0.1:0", "--jwks", str(keys.jwks),
        "--hmac-secret-env", f"refresh-hmac={REFRESH_ENV}", "--decision-log", "off",
        *flags,
        cwd=REPO, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield ServeProcess(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
