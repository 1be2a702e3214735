"""Binding a listener to a `HOST:PORT` (the ext_authz HTTP mode and the admin API)."""

from __future__ import annotations

from aiohttp import web


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of `HOST:PORT` or `[::1]:PORT`; ValueError for a port that is not one."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def listen(runner: web.BaseRunner, address: str) -> int:
    """Set the runner up on `address` (`HOST:PORT`, `[::1]:PORT`); the bound port (for `:0`)."""
    host, port = split_address(address)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner.addresses[0][1]
