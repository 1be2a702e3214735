"""What the client library's tests share: a server interceptor that records what reaches
the example backend, a policy that forwards tokens to it, and token minting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from examples.backend.api.v1 import api_pb2
from tests.support.example_backend import PASSWORD, POLICY, Proxied, decoded

REFRESH = "/api.v1.AuthService/RefreshToken"
GET_PROFILE = "/api.v1.UserService/GetProfile"


class Recorder(grpc.aio.ServerInterceptor):
    """Every call that reaches the backend: (method, its metadata)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[tuple[str, str | bytes], ...]]] = []

    async def intercept_service(self, continuation, handler_call_details):
        details = handler_call_details
        self.calls.append((details.method, tuple(details.invocation_metadata or ())))
        return await continuation(details)

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.calls if m == method)


def forwarding_policy(tmp_path: Path, leeway: str = "30s") -> Path:
    """policy.yaml with `forward_token: true` (the backend sees each call's authorization
    header, so a test can check which token reached which method) and `leeway`."""
    text = POLICY.read_text()
    assert "\nleeway: 30s" in text
    text = text.replace("\nleeway: 30s", f"\nleeway: {leeway}\nforward_token: true", 1)
    path = tmp_path / "policy" / "forwarding.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def sent_token(metadata: tuple[tuple[str, Any], ...]) -> str | None:
    values = [v for k, v in metadata if k == "authorization"]
    assert len(values) <= 1, values
    return values[0].removeprefix("Bearer ") if values else None


def short_access(proxied: Proxied, access_token: str, ttl: float) -> str:
    """An access token like `access_token` (same subject, roles, session) that expires in
    `ttl` seconds (negative: already expired), minted with the backend's own key."""
    claims = decoded(access_token)
    issuer = proxied.example.backend.auth.tokens.issuer
    return issuer.mint(
        "access",
        claims["sub"],
        ttl=ttl,
        roles=claims.get("roles", []),
        permissions=claims.get("permissions", []),
        scopes=claims.get("scope"),
        extra={"sid": claims["sid"]},
    ).token


def target(proxied: Proxied) -> str:
    assert proxied.proxy.sidecar is not None
    return f"127.0.0.1:{proxied.proxy.sidecar.port}"


async def signed_up(proxied: Proxied, email: str, enable_2fa: bool = False) -> Any:
    request = api_pb2.SignUpRequest(email=email, password=PASSWORD, enable_2fa=enable_2fa)
    return await proxied.auth.SignUp(request)
