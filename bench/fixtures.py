"""What every benchmark part shares: a signing key and its JWKS, the policy, a token, the
descriptor set that tells the proxy which bench methods are unary, and the checks that a
benchmarked call really is allowed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
from google.protobuf import descriptor_pb2

from authproxy.keys.issuer import TokenIssuer
from authproxy.keys.keygen import keygen
from authproxy.policy.loader import parse_policy

from .servers import STREAM_METHOD, UNARY_METHOD

ISSUER = "bench"
#: One access-token service; everything else is denied.
AUTH_POLICY = f"""\
version: 1
default: deny
issuer: {ISSUER}
tokens:
  access: {{type: access, audience: api-access}}
methods:
  /bench.Svc/*: access
http:
  "GET /api/items/{{id}}": access
"""
PAYLOAD = b"x" * 64


@dataclass
class Fixtures:
    dir: Path
    issuer: TokenIssuer
    token: str

    @property
    def jwks(self) -> Path:
        return self.dir / "jwks.json"

    def policy(self, text: str = AUTH_POLICY) -> Path:
        path = self.dir / f"policy-{abs(hash(text)):x}.yaml"
        path.write_text(text)
        return path

    def fresh_tokens(self, n: int) -> list[str]:
        return [self.issuer.mint("access", f"user-{i}", ttl=3600).token for i in range(n)]

    def proxy_flags(self, policy: str = AUTH_POLICY) -> list[str]:
        """Flags of a sidecar on these keys and `policy` (the bench methods' kinds from a
        descriptor set: the echo backend has no reflection)."""
        return [
            "--policy", str(self.policy(policy)),
            "--jwks", str(self.jwks),
            "--descriptor-set", str(self.dir / "bench.protoset"),
            "--no-upstream-reflection",
            "--log-level", "warning",
        ]  # fmt: skip


def make_fixtures(directory: Path) -> Fixtures:
    key = keygen("ES256", directory / "k.pem", directory / "jwks.json")
    issuer = TokenIssuer(parse_policy(AUTH_POLICY, "bench"), {"access": key})
    _write_descriptor_set(directory / "bench.protoset")
    return Fixtures(directory, issuer, issuer.mint("access", "bench-user", ttl=3600).token)


def _write_descriptor_set(path: Path) -> None:
    fd = descriptor_pb2.FileDescriptorProto(name="bench.proto", package="bench")
    service = fd.service.add(name="Svc")
    service.method.add(name="Echo", input_type=".B", output_type=".B")
    service.method.add(
        name="Chat", input_type=".B", output_type=".B", client_streaming=True, server_streaming=True
    )
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[fd]).SerializeToString())


async def check_calls(port: int, token: str | None, stream_messages: int) -> None:
    """One unary and one bidi call through `port` with the load's headers must succeed
    and echo (h2load sees only HTTP 200, which gRPC sends for failures too)."""
    md = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await channel.unary_unary(UNARY_METHOD)(PAYLOAD, metadata=md, timeout=10)
        if answer != PAYLOAD:
            raise RuntimeError(f"port {port}: the unary echo came back as {answer[:20]!r}")
        call = channel.stream_stream(STREAM_METHOD)(iter([PAYLOAD] * stream_messages), metadata=md)
        answers = [m async for m in call]
        if answers != [PAYLOAD] * stream_messages:
            raise RuntimeError(f"port {port}: the stream echoed {len(answers)} messages")


async def decision_counts(admin_port: int, workers: int = 1) -> dict[str, float]:
    """The proxy's decisions so far by decision (allow/deny), from its /metrics (worker I
    of `--workers N` serves its own on the admin port + I)."""
    text = ""
    async with aiohttp.ClientSession() as session:
        for port in range(admin_port, admin_port + workers):
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text += await response.text()
    counts: dict[str, float] = {"allow": 0.0, "deny": 0.0}
    for match in re.finditer(r"^authproxy_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        decision = re.search(r'decision="([^"]+)"', match.group(1))
        if decision:
            counts[decision.group(1)] = counts.get(decision.group(1), 0.0) + float(match.group(2))
    return counts


def check_allowed(target: str, requests: int, before: dict, after: dict) -> None:
    """Every request h2load counted was an allow (calls cut at the end may add a few)."""
    allowed = after["allow"] - before["allow"]
    denied = after.get("deny", 0) - before.get("deny", 0)
    if denied or allowed < requests:
        raise RuntimeError(f"{target}: {requests} requests but {allowed} allows, {denied} denies")


def check_answers_allowed(target: str, answered: int, before: dict, after: dict) -> None:
    """Every call answered with a message in a latency run was an allow (calls shed
    under overload are not answered with a message, so they are not counted)."""
    allowed = after["allow"] - before["allow"]
    if allowed < answered:
        raise RuntimeError(f"{target}: {answered} calls answered but only {allowed} allows")
