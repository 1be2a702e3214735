"""Which security level each method needs, from the same policy the proxy enforces: the
policy file itself, or the running proxy's admin `/policy` endpoint.

`Level` names the levels (`Level.ACCESS == "access"`); the token kinds a `TokenStore`
holds are the three levels that take a token (`TOKEN_KINDS`).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from enum import StrEnum
from pathlib import Path

from authproxy.policy import model
from authproxy.policy.loader import load_policy, parse_policy
from authproxy.policy.model import Policy


class Level(StrEnum):
    """A method's security level in the policy, and the kind of token it takes. Each is a
    `str` equal to the policy's spelling, so `Level.TWO_FA == "2fa"` and bare strings work
    wherever a level is taken."""

    PUBLIC = model.PUBLIC  #: no token is sent
    TWO_FA = model.TWO_FA  #: the 2FA token (between `login()` and `verify_2fa()`)
    REFRESH = model.REFRESH  #: the refresh token
    ACCESS = model.ACCESS  #: the access token (refreshed as it nears its expiry)
    DENY = model.DENY  #: no token is sent: the proxy refuses the call anyway


#: The token kinds a `TokenStore` holds: the levels that take a token.
TOKEN_KINDS: tuple[Level, ...] = (Level.TWO_FA, Level.ACCESS, Level.REFRESH)


class MethodLevels:
    """The level of each method, read from a policy (`from_file`, `from_admin`)."""

    def __init__(self, policy: Policy) -> None:
        """`policy`: a parsed policy (the class methods read one from a file or a proxy)."""
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

    def level(self, method: str) -> Level:
        """The level of a method path (`/pkg.Service/Method`): exact rule, service
        wildcard, then the policy's default, as the proxy matches."""
        return Level(self.policy.match(method).level)
