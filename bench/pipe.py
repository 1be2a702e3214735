"""The floor of any relay in a Python process: bytes copied from each client connection
to a connection of its own to the backend and back, on asyncio, with no HTTP/2 and no
decision at all. It cannot authorize anything (it cannot even see a call); it is in the
latency runs for scale, as nghttpx is: what a hop through a Python event loop costs a
call's latency here before any relay work is done. Each client connection gets its own
backend connection, opened when the client connects; bytes that arrive first wait for it.
"""

from __future__ import annotations

import asyncio


class _Side(asyncio.Protocol):
    """One socket of a pair; what it reads goes to the other side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.early: list[bytes] = []  # read before the other side was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None:
            self.early.append(data)
        else:
            other.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.close()


class _Client(_Side):
    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream
        self.opening: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.opening = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        backend = _Side()
        backend.other = self
        try:
            await asyncio.get_running_loop().create_connection(lambda: backend, *self.upstream)
        except OSError:
            assert self.transport is not None
            self.transport.close()
            return
        self.other = backend
        assert backend.transport is not None
        for data in self.early:
            backend.transport.write(data)
        self.early.clear()


async def listen(host: str, port: int, upstream: str) -> asyncio.AbstractServer:
    """Pipe every connection to `host:port` to `upstream` (HOST:PORT)."""
    up_host, _, up_port = upstream.rpartition(":")
    target = (up_host, int(up_port))
    return await asyncio.get_running_loop().create_server(lambda: _Client(target), host, port)
