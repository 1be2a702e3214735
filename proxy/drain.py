"""Stopping the sidecar's listener so that calls racing the stop end UNAVAILABLE, not
CANCELLED.

grpc core ends with CANCELLED ("cancelled by the caller", which clients do not retry)
every call it has accepted but not yet handed to the application when the server shuts
down (grpc/grpc#41785): the calls waiting in the server's queue (a grpc.aio server takes
them one at a time, so a busy proxy always holds some) and the calls that reach a
connection after the shutdown began. `Drain.stop` therefore stops in three steps:

1. Hold: every call the handler is given from now on waits (it never reaches the
   backend), while the server keeps taking calls until its queue is empty: channelz
   counts the calls the core holds, `Drain.active` the ones the handler runs (at most
   `QUEUE_SECONDS`). A client whose calls are all held sends no new ones meanwhile (nor
   can it open more streams than `--max-concurrent-streams`).
2. Stop: the core shutdown sends GOAWAY (clients take their next calls to a new
   connection) and closes the listener.
3. Refuse: the held calls end UNAVAILABLE (`SHUTTING_DOWN`; safe to retry). The calls
   in flight get the rest of the grace period; those still open then end UNAVAILABLE
   ("Cancelling all calls").

A call a client sends between steps 1 and 2, or after 2 before it has read the GOAWAY
(about one round trip), can still end CANCELLED: only grpc core can change that.
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc

log = logging.getLogger("authproxy.sidecar")

#: The status message of a call refused because the proxy is stopping.
SHUTTING_DOWN = "authproxy is shutting down: the call did not reach the backend; retry it"

#: Longest step 1 lasts (within the grace period): the queue empties in a moment unless
#: calls keep arriving faster than the proxy can take them.
QUEUE_SECONDS = 5.0
_POLL_SECONDS = 0.005


def _channelz():
    """grpc's channelz accessors (what grpcio-channelz serves), or None."""
    try:
        from grpc._cython import cygrpc
    except ImportError:  # pragma: no cover - every grpcio build has it
        return None
    return cygrpc if hasattr(cygrpc, "channelz_get_server") else None


def server_ids() -> set[int]:
    """The channelz ids of this process's gRPC servers (empty when they cannot be read)."""
    channelz, ids, start = _channelz(), set(), 0
    if channelz is None:
        return ids
    try:
        while True:
            page = json.loads(channelz.channelz_get_servers(start))
            batch = [int(s["ref"]["serverId"]) for s in page.get("server", ())]
            ids.update(batch)
            if page.get("end", True) or not batch:
                return ids
            start = max(batch) + 1
    except (ValueError, KeyError, TypeError, RuntimeError):
        return set()


def calls_held(server_id: int) -> int | None:
    """Calls the core has accepted for the server and not finished: queued, or handled
    by the application (channelz: started - succeeded - failed). None: unknown."""
    channelz = _channelz()
    if channelz is None:
        return None
    try:
        data = json.loads(channelz.channelz_get_server(server_id))["server"]["data"]
        done = int(data.get("callsSucceeded", 0)) + int(data.get("callsFailed", 0))
        return int(data.get("callsStarted", 0)) - done
    except (ValueError, KeyError, TypeError, RuntimeError):
        return None


class Drain:
    """One listener's stop: whether its handler holds and refuses new calls, how many
    calls the handler runs, and the listener's channelz id (`watch`)."""

    def __init__(self) -> None:
        self.refusing = False
        self.active = 0
        self.server_id: int | None = None
        self._released = asyncio.Event()

    def watch(self, create):
        """`create()` builds the grpc.aio server; its channelz id is noted on the way."""
        before = server_ids()
        server = create()
        new = server_ids() - before
        self.server_id = new.pop() if len(new) == 1 else None
        return server

    async def hold(self, limit: float) -> None:
        """Step 1: hold every new call; return once the core's queue is empty (or after
        `limit` seconds, or at once when channelz cannot tell)."""
        self.refusing = True
        if self.server_id is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            held = calls_held(self.server_id)
            if held is None or held <= self.active:
                return
            if loop.time() >= deadline:
                log.warning("stopping with %d calls still queued", held - self.active)
                return
            await asyncio.sleep(_POLL_SECONDS)

    async def stop(self, server: grpc.aio.Server, grace: float) -> None:
        """The three steps; in all at most `grace` seconds."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self.hold(min(grace, QUEUE_SECONDS))
        stopping = asyncio.ensure_future(server.stop(max(0.0, grace - (loop.time() - started))))
        # Release the held calls only once the core shutdown (GOAWAY) has begun.
        running = getattr(getattr(server, "_server", None), "is_running", None)
        while not stopping.done():
            await asyncio.sleep(0)
            if running is None or not running():
                break
        self._released.set()
        await stopping

    async def refused(self, _requests, context: grpc.aio.ServicerContext) -> None:
        """What every call given to the handler once it refuses runs: wait for step 3."""
        await self._released.wait()
        await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    def counted(self, behaviour):
        """`behaviour` (a handler's coroutine function), counted in `active` while it runs."""

        async def call(request, context: grpc.aio.ServicerContext):
            self.active += 1
            try:
                return await behaviour(request, context)
            finally:
                self.active -= 1

        return call
