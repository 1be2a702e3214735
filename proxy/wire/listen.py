"""Binding a listener to `HOST:PORT`. Every listener of the proxy (the sidecar, the
ext_authz gRPC and HTTP servers, the admin API) binds here, when it starts: one way to
read an address, one dual-stack rule, one error for a port that cannot be had.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of `HOST:PORT` or `[::1]:PORT`; ValueError for a port that is not one."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def bind(address: str, reuse_port: bool = False) -> list[socket.socket]:
    """Sockets bound to `HOST:PORT` (`[::1]:PORT`), not yet listening; one per address the
    host resolves to, all on one port (the first one's, for port 0). `[::]` takes IPv4 too
    (dual stack, as grpc binds it). OSError naming the address when it cannot be had;
    `reuse_port` (SO_REUSEPORT) lets worker processes share the port."""
    host, port = split_address(address)
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, where in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                dual = host == "::"
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
            if port == 0 and len(sockets) > 1:
                where = (where[0], sockets[0].getsockname()[1], *where[2:])
            sock.bind(where)
            sock.setblocking(False)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise OSError(e.errno, f"cannot listen on {address}: {e.strerror or e}") from None
    return sockets


async def listen_on(
    address: str,
    serve: Callable[[socket.socket], Awaitable[object]],
    reuse_port: bool = False,
) -> int:
    """Bind `address` and hand each bound socket to `serve`, which listens on it; the
    bound port. When binding or serving fails, the sockets are closed and the error
    raised (OSError naming the address for a port that cannot be had)."""
    sockets = bind(address, reuse_port)
    try:
        for sock in sockets:
            await serve(sock)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets[0].getsockname()[1]
