"""The proxy's log stays readable: writes to other files beside the policy and keys (the
proxy's own log file among them) neither wake a reload nor log anything, and a backend
whose reflection does not answer gets one plain line per retry."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from authproxy.sidecar.catalog import reflection_problem
from tests.support.keys import REFRESH_ENV, REFRESH_SECRET, Keys
from tests.support.policies import TEST_POLICY

REPO = Path(__file__).resolve().parents[2]
#: Writes to the log file and to another file beside the policy, each.
WRITES = 300


def proxy_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    env[REFRESH_ENV] = REFRESH_SECRET.decode()
    return env


async def log_line(log: Path, pattern: str, within: float = 30) -> re.Match[str]:
    """The first match of `pattern` in the log file, waiting up to `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        found = re.search(pattern, log.read_text())
        if found:
            return found
        assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{log.read_text()}"
        await asyncio.sleep(0.1)


async def reloads(session: aiohttp.ClientSession, admin: str) -> dict[str, int]:
    async with session.get(f"{admin}/policy") as answer:
        assert answer.status == 200
        return (await answer.json())["reloads"]


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_writes_beside_the_policy_neither_reload_nor_log(
    tmp_path: Path, keys: Keys, level: str
) -> None:
    conf = tmp_path / "conf"  # the policy, the keys and the proxy's log, side by side
    conf.mkdir()
    policy, jwks, log = conf / "policy.yaml", conf / "jwks.json", conf / "authproxy.log"
    policy.write_text(TEST_POLICY)
    shutil.copy(keys.jwks, jwks)
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authproxy", "serve", "--log-level", level,
            "--policy", str(policy), "--jwks", str(jwks),
            "--hmac-secret-env", f"refresh-hmac={REFRESH_ENV}",
            "--ext-authz-http", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--decision-log", "stderr",  # each denied call writes a line to the log file
            cwd=REPO, env=proxy_env(), stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        admin_port = (await log_line(log, r"admin API listening on port (\d+)"))[1]
        http_port = (await log_line(log, r"ext_authz HTTP listening on port (\d+)"))[1]
        admin, check = f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{http_port}"
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while (await reloads(session, admin))["unchanged"] < 1:  # the watch has started
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            assert (await reloads(session, admin)) == {"ok": 0, "error": 0, "unchanged": 1}
            with (conf / "neighbour.log").open("a") as neighbour:
                for i in range(WRITES):
                    neighbour.write(f"line {i}\n")
                    neighbour.flush()
                    async with session.get(f"{check}/test.Access/Echo") as answer:
                        assert answer.status == 401  # denied: a decision line in the log
            deadline = time.monotonic() + 30
            while log.read_text().count('"decision":"deny"') < WRITES:
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            # A real edit, after all those writes: once it is live, the watch has been
            # through every earlier change.
            edited = conf / ".policy.yaml.tmp"
            edited.write_text(TEST_POLICY + "# edited\n")
            os.replace(edited, policy)
            deadline = time.monotonic() + 30
            while (await reloads(session, admin))["ok"] < 1:
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            assert (await reloads(session, admin)) == {"ok": 1, "error": 0, "unchanged": 1}
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
    text = log.read_text()
    assert text.count("policy reloaded") == 1, text
    assert "neighbour.log" not in text
    assert "authproxy.log" not in text
    assert "filtered out" not in text
    if level == "info":
        assert "change detected" not in text, text
        assert "watchfiles" not in text, text


async def test_reflection_retries_are_one_plain_line_each(tmp_path: Path, keys: Keys) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authproxy", "serve", "--policy", str(policy),
        "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1",  # nothing listens there
        "--jwks", str(keys.jwks), "--hmac-secret-env", f"refresh-hmac={REFRESH_ENV}",
        cwd=REPO, env=proxy_env(), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    lines: list[str] = []

    async def until_retries(count: int) -> None:
        assert proc.stderr is not None
        while sum("retrying in" in line for line in lines) < count:
            raw = await proc.stderr.readline()
            assert raw, "authproxy exited early:\n" + "".join(lines)
            lines.append(raw.decode())

    try:
        await asyncio.wait_for(until_retries(3), 30)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    text = "".join(lines)
    assert "AioRpcError" not in text
    assert "debug_error_string" not in text
    assert "StatusCode." not in text
    retries = [line for line in lines if "retrying in" in line]
    pattern = (
        r"^\S+ \S+ INFO authproxy: reflection on 127\.0\.0\.1:1 not answering "
        r"\(UNAVAILABLE: .+\); retrying in {}s\n$"
    )
    for line, delay in zip(retries, ("0.5", "1", "2"), strict=True):
        assert re.match(pattern.format(re.escape(delay)), line), line
    for line in lines:  # every line is a log record of its own: no continuation lines
        assert re.match(r"^\d{4}-\d\d-\d\d ", line), text


def test_a_reflection_timeout_reads_as_no_answer() -> None:
    assert reflection_problem(TimeoutError(), 5.0) == (True, "no answer within 5s")
