"""In-memory state kept in a file (`--state-file`, `proxy/state/file.py`): a real
`python -m authproxy serve` process keeps a revocation and a spent refresh token across a
kill; what loading keeps and drops; write failures; and the start-up warning when
revocations live in memory only. (A corrupt file failing the start: `test_cli.py`.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import grpc
import pytest

from authproxy.keys.issuer import TokenIssuer
from authproxy.state.file import FileState
from authproxy.state.store import EXPIRY_GRACE, StateUnavailable
from tests.support.echo_backend import start_echo_backend
from tests.support.keys import REFRESH_ENV, REFRESH_SECRET, Keys
from tests.support.policies import SINGLE_USE_POLICY, TEST_POLICY
from tests.support.running_proxy import config_for, error_info, running_proxy
from tests.support.tokens import bearer

REPO = Path(__file__).resolve().parents[2]
VOLATILE = "kept in memory only"
START_BOUND = 30.0  # a process start on a busy machine


@asynccontextmanager
async def serve_process(
    *args: str, stderr_lines: list[str]
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, int]]:
    """`python -m authproxy serve ARGS --admin 127.0.0.1:0`: (process, sidecar port, admin
    port) once both listen; killed at exit if still running. Log lines go to stderr_lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    env[REFRESH_ENV] = REFRESH_SECRET.decode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authproxy", "serve", *args, "--admin", "127.0.0.1:0",
        "--hmac-secret-env", f"refresh-hmac={REFRESH_ENV}", "--shutdown-grace", "1",
        cwd=REPO, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None

    async def port_of(needle: str) -> int:
        while True:
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise AssertionError("authproxy exited early:\n" + "".join(stderr_lines))
            stderr_lines.append(line)
            if needle in line:
                return int(line.split("listening on port ")[1].split(",")[0])

    try:
        admin = await asyncio.wait_for(port_of("admin API listening"), START_BOUND)
        sidecar = await asyncio.wait_for(port_of("authproxy listening"), START_BOUND)
        yield proc, sidecar, admin
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def call(port: int, method: str, token: str) -> str:
    """OK, or the deny reason."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        md = bearer(token)
        try:
            await channel.unary_unary(method)(b"{}", metadata=md, timeout=10)
        except grpc.aio.AioRpcError as e:
            info = error_info(e)
            return info.reason if info is not None else e.code().name
    return "OK"


async def test_a_revocation_and_a_spent_refresh_token_survive_a_killed_proxy(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer
):
    """Revoke through the admin API, SIGKILL the process as soon as it answers 201 (no
    shutdown flush), start it again on the same file: still revoked, still spent."""
    backend = await start_echo_backend()
    policy = tmp_path / "policy.yaml"
    policy.write_text(SINGLE_USE_POLICY)
    state_file = tmp_path / "state" / "authproxy-state.json"
    state_file.parent.mkdir()
    args = ("--policy", str(policy), "--listen", "127.0.0.1:0", "--jwks", str(keys.jwks),
            "--upstream", f"127.0.0.1:{backend.port}", "--state-file", str(state_file))  # fmt: skip
    access = issuer.mint("access", "alice", ttl=300)
    refresh = issuer.mint("refresh", "bob", ttl=300)
    lines: list[str] = []
    try:
        async with serve_process(*args, stderr_lines=lines) as (proc, port, admin_port):
            assert await call(port, "/test.Access/Echo", access.token) == "OK"
            assert await call(port, "/test.Refresh/Echo", refresh.token) == "OK"  # spent
            body = {"jti": access.claims["jti"], "exp": access.claims["exp"]}
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"http://127.0.0.1:{admin_port}/v1/revocations", json=body) as r,
            ):
                assert r.status == 201
            proc.send_signal(signal.SIGKILL)  # a crash: nothing more is written
            assert await proc.wait() == -signal.SIGKILL
        assert not any(VOLATILE in line for line in lines)  # persisted: no warning

        async with serve_process(*args, stderr_lines=lines) as (proc, port, _):
            assert await call(port, "/test.Access/Echo", access.token) == "TOKEN_REVOKED"
            assert await call(port, "/test.Refresh/Echo", refresh.token) == "REFRESH_REUSED"
            other = issuer.mint("access", "carol", ttl=300).token
            assert await call(port, "/test.Access/Echo", other) == "OK"
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), START_BOUND) == 0
    finally:
        await backend.server.stop(None)


def write_state(path: Path, tokens: dict, subjects: dict, used: dict) -> None:
    data = {"version": 1, "tokens": tokens, "subjects": subjects, "used": used}
    path.write_text(json.dumps(data))


async def test_loading_keeps_only_unexpired_entries_and_rewrites_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, "authproxy.state")
    now = time.time()
    path = tmp_path / "state.json"
    gone = now - EXPIRY_GRACE - 60  # expired, leeway included
    write_state(
        path,
        tokens={"old": gone, "in-leeway": now - 1, "live": now + 300},
        subjects={"old-sub": [now - 7200, now - 60], "live-sub": [now - 60, now + 3600]},
        used={"old-use": now - 60, "live-use": now + 300},
    )
    state = FileState(path)
    try:
        assert "loaded 3 revocations and 1 single-use records (3 expired dropped)" in caplog.text
        assert not state.revoked("old", "x", None)
        assert state.revoked("in-leeway", "x", None)  # still accepted within the leeway
        assert state.revoked("live", "x", None)
        assert not state.revoked("j", "old-sub", now - 3600)
        assert state.revoked("j", "live-sub", now - 3600)
        assert not await state.used("old-use")
        assert await state.used("live-use")
        saved = json.loads(path.read_text())  # written back without the expired entries
        assert sorted(saved["tokens"]) == ["in-leeway", "live"]
        assert sorted(saved["subjects"]) == ["live-sub"]
        assert sorted(saved["used"]) == ["live-use"]
    finally:
        await state.close()


async def test_a_use_reaches_the_file_without_a_shutdown(tmp_path: Path):
    path = tmp_path / "state.json"
    state = FileState(path)
    try:
        assert await state.first_use("refresh-1", time.time() + 300)
        deadline = time.monotonic() + 10.0
        while "refresh-1" not in json.loads(path.read_text())["used"]:
            assert time.monotonic() < deadline, "the use never reached the file"
            await asyncio.sleep(0.05)
    finally:
        await state.close()
    again = FileState(path)
    assert await again.used("refresh-1")
    await again.close()


async def test_a_revocation_that_cannot_be_saved_applies_and_says_so(tmp_path: Path):
    directory = tmp_path / "gone"
    directory.mkdir()
    state = FileState(directory / "state.json")
    try:
        shutil.rmtree(directory)  # the volume went away
        with pytest.raises(StateUnavailable, match="not saved"):
            await state.revoke_token("jti-1", time.time() + 300)
        assert state.revoked("jti-1", "x", None)  # in force in memory all the same
        assert state.failures_total == 1
    finally:
        await state.close()


@pytest.mark.parametrize(
    ("policy", "admin", "state_file", "warned"),
    [
        (TEST_POLICY, None, False, True),  # token levels: revocation checks run
        (TEST_POLICY, None, True, False),
        ("version: 1\ndefault: public\n", "127.0.0.1:0", False, True),  # the admin API
        ("version: 1\ndefault: public\n", None, False, False),  # nothing to revoke
    ],
    ids=["token-levels", "state-file", "admin-api", "public-only"],
)
async def test_a_warning_says_revocations_are_lost_on_restart(
    tmp_path: Path,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    policy: str,
    admin: str | None,
    state_file: bool,
    warned: bool,
):
    caplog.set_level(logging.WARNING, "authproxy")
    cfg = config_for(tmp_path, keys, policy, ext_authz_grpc="127.0.0.1:0", admin=admin)
    if state_file:
        cfg.state_file = str(tmp_path / "state.json")
    async with running_proxy(cfg):  # said at start, once every configuration check passed
        pass
    assert (VOLATILE in caplog.text) is warned, caplog.text
