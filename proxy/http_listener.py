"""Binding an aiohttp runner to a `HOST:PORT` (the ext_authz HTTP mode and the admin API)."""

from __future__ import annotations

from aiohttp import web


async def listen(runner: web.BaseRunner, address: str) -> int:
    """Set the runner up on `address` (`HOST:PORT`, `[::1]:PORT`); the bound port (for `:0`)."""
    host, _, port = address.rpartition(":")
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True).start()
    return runner.addresses[0][1]
