"""Which security level each method needs, from the same policy the proxy enforces: the
policy file itself, or the running proxy's admin `/policy` endpoint."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

from authproxy.policy.loader import load_policy, parse_policy
from authproxy.policy.model import Policy


class MethodLevels:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    @classmethod
    def from_file(cls, path: str | Path) -> MethodLevels:
        """Read and validate a policy file (a bad file raises `PolicyError`, naming the
        file, line and problem, as `authproxy policy check` does)."""
        return cls(load_policy(path))

    @classmethod
    def from_admin(
        cls, url: str, timeout: float = 5.0, admin_token: str | None = None
    ) -> MethodLevels:
        """Fetch the policy the proxy is running from its admin API (`GET {url}/policy`;
        `admin_token` is the proxy's `--admin-token-env` secret, which the endpoint needs
        when the proxy has one). Blocking: from asyncio, use `from_admin_async`."""
        endpoint = url.rstrip("/") + "/policy"
        request = urllib.request.Request(endpoint)
        if admin_token is not None:
            request.add_header("Authorization", f"Bearer {admin_token}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = json.load(response)
        return cls(parse_policy(status["text"], endpoint))

    @classmethod
    async def from_admin_async(
        cls, url: str, timeout: float = 5.0, admin_token: str | None = None
    ) -> MethodLevels:
        """`from_admin`, in a thread, so the event loop keeps running."""
        return await asyncio.to_thread(cls.from_admin, url, timeout, admin_token)

    def level(self, method: str) -> str:
        """The level of a method path (`/pkg.Service/Method`): exact rule, service
        wildcard, then the policy's default, as the proxy matches."""
        return self.policy.match(method).level
