"""`authproxy serve` as a real process: it serves decisions, relays to the backend, and
exits 0 on SIGTERM after draining; run without a backend it serves Envoy ext_authz only;
every shipped policy file validates."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authproxy.policy.loader import load_policy
from tests.support.echo_backend import start_echo_backend
from tests.support.keys import REFRESH_ENV, REFRESH_SECRET, Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import error_info
from tests.support.tokens import bearer

REPO = Path(__file__).resolve().parents[2]
#: Every shipped policy file (the tests beside some of them are not policies).
SHIPPED_POLICIES = [
    REPO / "policy.yaml",
    *(p for p in sorted(REPO.glob("policies/*.yaml")) if not p.name.endswith(".tests.yaml")),
]


async def _wait_for_line(stream: asyncio.StreamReader, needle: str, seen: list[str]) -> None:
    while True:
        line = (await stream.readline()).decode()
        if not line:
            raise AssertionError("authproxy exited early:\n" + "".join(seen))
        seen.append(line)
        if needle in line:
            return


async def test_serve_process_serves_and_drains_on_sigterm(tmp_path: Path, keys: Keys, issuer):
    backend = await start_echo_backend()
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    env[REFRESH_ENV] = REFRESH_SECRET.decode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authproxy", "serve",
        "--policy", str(policy), "--listen", "127.0.0.1:0",
        "--upstream", f"127.0.0.1:{backend.port}", "--jwks", str(keys.jwks),
        "--hmac-secret-env", f"refresh-hmac={REFRESH_ENV}", "--shutdown-grace", "1",
        cwd=REPO, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    seen: list[str] = []
    try:
        await asyncio.wait_for(_wait_for_line(proc.stderr, "listening on port", seen), 30)
        port = int(seen[-1].split("listening on port ")[1].split(",")[0])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/test.Access/Report")(b"{}", timeout=10)
            assert error_info(caught.value).reason == "TOKEN_MISSING"

            token = issuer.mint("access", "alice", ttl=300).token
            md = bearer(token)
            hang = channel.unary_unary("/test.Access/Hang")(b"{}", metadata=md, timeout=30)
            await asyncio.wait_for(backend.hang_started.wait(), 10)
            proc.send_signal(signal.SIGTERM)
            # The in-flight call is given the grace period, then ended with a status the
            # client retries (never CANCELLED); the process exits 0.
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await hang
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = (await proc.stderr.read()).decode()
        assert "shutting down" in "".join(seen) + rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await backend.server.stop(None)


@pytest.mark.parametrize(
    "path",
    [str(p.relative_to(REPO)) for p in SHIPPED_POLICIES],
)
def test_shipped_policies_are_valid(path: str):
    policy = load_policy(REPO / path)
    assert policy.rule_count > 0
    assert policy.default.level != "public"


def test_policy_check_cli_accepts_shipped_policies():
    for path in SHIPPED_POLICIES:
        done = subprocess.run(
            [sys.executable, "-m", "authproxy", "policy", "check", str(path)],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "OK" in done.stdout


async def test_serve_process_runs_only_the_ext_authz_front_ends(tmp_path: Path, keys: Keys, issuer):
    """No --upstream: the process serves Envoy ext_authz (gRPC and HTTP) and no sidecar."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    env[REFRESH_ENV] = REFRESH_SECRET.decode()
    env["AUTHPROXY_EXT_AUTHZ_HTTP"] = "127.0.0.1:0"  # the environment works like the flag
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authproxy", "serve", "--policy", str(policy),
        "--ext-authz-grpc", "127.0.0.1:0", "--ext-authz-http-path-prefix", "/check",
        "--jwks", str(keys.jwks), "--hmac-secret-env", f"refresh-hmac={REFRESH_ENV}",
        cwd=REPO, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    seen: list[str] = []
    try:
        await asyncio.wait_for(_wait_for_line(proc.stderr, "ext_authz gRPC", seen), 30)
        grpc_port = int(seen[-1].split("listening on port ")[1].split()[0])
        await asyncio.wait_for(_wait_for_line(proc.stderr, "ext_authz HTTP", seen), 30)
        http_port = int(seen[-1].split("listening on port ")[1].split()[0])
        assert not any("authproxy listening" in line for line in seen)  # no sidecar

        token = issuer.mint("access", "alice", ttl=300).token
        http = attrs.AttributeContext.HttpRequest(
            method="POST",
            path="/test.Access/Echo",
            headers={"content-type": "application/grpc", "authorization": f"Bearer {token}"},
        )
        request = external_auth_pb2.CheckRequest(
            attributes=attrs.AttributeContext(request=attrs.AttributeContext.Request(http=http))
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            response = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(request)
        assert response.status.code == 0
        assert ("x-auth-subject", "alice") in [
            (h.header.key, h.header.value) for h in response.ok_response.headers
        ]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{http_port}/check/test.Access/Echo") as answer,
        ):
            assert answer.status == 401
            assert (await answer.json())["reason"] == "TOKEN_MISSING"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
