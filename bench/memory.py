"""Memory per connection and per stream: VmRSS of a server process (from
/proc/PID/status) before and after bench.h2gen `hold` opens

1. N connections that complete the HTTP/2 preface and the SETTINGS exchange, no streams
   ("idle"), then
2. M bidi streams on those connections (packed up to the server's
   SETTINGS_MAX_CONCURRENT_STREAMS, at most 100 per connection), each past one message
   and its echo, so through the proxy each one is a live upstream call too ("open").

Figures are the growth per 1,000. Each target is a fresh process that has made one
call (so first-call imports and caches are in its base), not the throughput runs'
processes: a process that has served load reuses freed memory, which would hide growth.
The proxy's figure includes its upstream side (its channel to the backend); the backend,
called directly (and measured first, while it is fresh), is the floor.
"""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

from . import load, procs
from .fixtures import PAYLOAD, Fixtures, check_calls
from .servers import STREAM_METHOD

#: Settle time before reading VmRSS.
SETTLE_SECONDS = 0.5
#: File descriptors a process needs besides the held connections.
SPARE_FDS = 256


def vmrss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_room(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it) up to the hard limit
    as far as `wanted` connections need; return how many connections fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < need:
        top = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
        soft = top
    return wanted if soft == resource.RLIM_INFINITY else max(0, min(wanted, soft - SPARE_FDS))


async def _settled(pid: int) -> int:
    await asyncio.sleep(SETTLE_SECONDS)
    return vmrss_kib(pid)


async def _held(server: procs.Server, target: load.Target, connections: int, streams: int):
    held = load.Held(target, connections)
    base = await _settled(server.pid)
    try:
        await held.open()
        idle = await _settled(server.pid)
        await held.streams(streams)
        busy = await _settled(server.pid)
    finally:
        await held.close()
    return {
        "base_mib": base / 1024,
        "mib_per_1k_connections": (idle - base) / 1024 / connections * 1000,
        "mib_per_1k_streams": (busy - idle) / 1024 / streams * 1000,
        "connections": connections,
        "streams": streams,
    }


async def measure(fx: Fixtures, logs: Path, connections: int, streams: int) -> dict:
    backend = procs.baseline("mem-backend", "backend", logs)
    upstream = ["--upstream", f"127.0.0.1:{backend.port}"]
    proxy = procs.proxy("mem-proxy", [*upstream, *fx.proxy_flags()], logs)
    body = logs / "mem-body.grpc"
    body.write_bytes(load.grpc_frames([PAYLOAD]))
    try:
        for server in (backend, proxy):
            await server.wait_listening()
        await check_calls(backend.port, None, 1)
        await check_calls(proxy.port, fx.token, 1)
        out = {}
        # The backend first: the proxy's held streams are upstream calls to it.
        for name, server, token in (("backend", backend, None), ("proxy", proxy, fx.token)):
            target = load.Target(server.port, STREAM_METHOD, body, load.token_headers(token))
            out[name] = await _held(server, target, connections, streams)
        return out
    finally:
        proxy.stop()
        backend.stop()
