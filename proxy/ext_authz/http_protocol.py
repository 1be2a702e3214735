"""HTTP/1.1 connections of the ext_authz HTTP mode: a lean `asyncio.Protocol`.

One `HttpConnection` per client connection. Its `RequestReader`
(`ext_authz_http_request`) queues each complete request; the queue is answered strictly in
order (pipelining), one request at a time, like aiohttp's server did, each as soon as its
last byte arrived. Answers are `Reply` bytes (`ext_authz_http_reply`), gathered and
written once per batch of requests.

The check runs *eagerly*: its first step runs right in `data_received`, with the
connection's driver task set as the current task (what `asyncio.timeout()` and the like
look for) and in the driver's context; every request of one read shares that setup. Most
checks finish in that step (everything in memory) and are answered without a task switch;
one that waits for I/O (Redis) is handed to the driver task, which resumes it exactly
where it stopped and then answers the rest of the queue itself.

A request must arrive whole within `request_timeout` of its first byte (408: a slow client
cannot hold a connection with an endless request), and a connection with no request for
`idle_timeout` is closed (dropped, when answers it does not read are still waiting to be
sent); the server's sweep calls `expire`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from time import monotonic
from typing import Any

from authproxy.ext_authz.http_reply import Reply, date_line, refusal
from authproxy.ext_authz.http_request import Headers, HttpLimits, Request, RequestReader

log = logging.getLogger("authproxy.ext_authz")

#: What a connection asks its server: (method, path as sent, headers, peer) -> a Reply.
Check = Callable[[str, str, Headers, str | None], Coroutine[Any, Any, Reply]]

#: Requests received but not answered yet (pipelined behind a slow one) before the
#: connection stops reading.
_MAX_QUEUED = 32

try:  # the current task during an eager step; without them, checks start in the driver
    from asyncio.tasks import _enter_task, _leave_task  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    _enter_task = _leave_task = None

#: `waiting` of a check handed over before its first step.
_NOT_STARTED = object()


@types.coroutine
def _resume(
    coro: Coroutine[Any, Any, Reply], waiting: Any, error: BaseException | None = None
) -> Generator[Any, Any, Reply]:
    """Drive `coro` on from where a step outside this task left it (waiting for
    `waiting`), passing what the task is sent or thrown; `error` is thrown in first."""
    while True:
        if error is None:
            try:
                sent = yield waiting
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # the task's cancellation, for the check to see
                error = exc
                continue
            try:
                waiting = coro.send(sent)
            except StopIteration as done:
                return done.value
        else:
            thrown, error = error, None
            try:
                waiting = coro.throw(thrown)
            except StopIteration as done:
                return done.value


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_check",
        "_closed",
        "_context",
        "_draining",
        "_driver",
        "_handed",
        "_last_active",
        "_limits",
        "_loop",
        "_on_closed",
        "_out",
        "_peer",
        "_queue",
        "_reader",
        "_reading_paused",
        "_stopped",
        "_transport",
        "_wake",
        "_write_paused",
        "busy",
    )

    def __init__(
        self, check: Check, limits: HttpLimits, on_closed: Callable[[HttpConnection], None]
    ) -> None:
        self._check = check
        self._limits = limits
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._peer: str | None = None
        #: Requests read and not answered yet, in order; a Reply is a refusal (the last).
        self._queue: deque[Request | Reply] = deque()
        self._reader = RequestReader(limits, self._queue)
        self._out: list[bytes] = []
        #: A check being finished by the driver task (busy), and its request.
        self.busy = False
        self._handed: tuple[Coroutine[Any, Any, Reply], Any, Request] | None = None
        self._wake: asyncio.Future[None] = self._loop.create_future()
        #: The driver's context: eager steps run in it too, as they would in a task.
        self._context = contextvars.copy_context()
        self._driver = self._loop.create_task(self._drive(), context=self._context)
        self._last_active = monotonic()
        #: No more requests are read (a refusal, connection: close, an upgrade, EOF).
        self._stopped = False
        #: Close once the queue is answered (the server is stopping).
        self._draining = False
        self._closed = False
        self._reading_paused = False
        self._write_paused = False

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = self._stopped = True
        self._queue.clear()
        if not self.busy:  # a check in flight finishes (its answer is dropped)
            self._driver.cancel()
        self._on_closed(self)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        reader = self._reader
        refused = reader.feed(data)
        if refused is not None:
            self._refuse(refused)
            return
        if reader.done:
            self._stopped = True
        if self._queue:
            self._run()
        elif self._stopped and not self.busy:  # an upgrade with nothing left to answer
            self._close()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._reading(False)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._reading(True)

    def eof_received(self) -> bool:
        self._stopped = True  # answer what was read, then close
        if not self.busy and not self._queue:
            self._close()
        return True

    # --- answering --------------------------------------------------------------------

    def _run(self) -> None:
        """Answer queued requests in order, each check's first step run right here."""
        if self._closed:
            return
        loop, driver = self._loop, self._driver
        try:
            _enter_task(loop, driver)  # type: ignore[misc]
        except (TypeError, RuntimeError):  # not from the loop's I/O: no eager step
            if not self.busy:
                self._start_in_driver()
        else:
            try:
                self._context.run(self._answer_eagerly)
            finally:
                _leave_task(loop, driver)  # type: ignore[misc]
        self._flush()
        if not self.busy:
            self._last_active = monotonic()
            if self._reading_paused:
                self._reading(True)
        elif len(self._queue) > _MAX_QUEUED:
            self._reading(False)

    def _answer_eagerly(self) -> None:
        """The queue, answered until a check has to wait (then handed to the driver)."""
        queue, out, check, peer = self._queue, self._out, self._check, self._peer
        date = date_line()
        while queue and not self.busy and not self._closed:
            request = queue.popleft()
            if type(request) is not tuple:  # a refusal: the last answer
                self._write(request, False, False, False)  # type: ignore[arg-type]
                return
            coro = check(request[0], request[1], request[2], peer)
            try:
                waiting = coro.send(None)
            except StopIteration as done:
                reply = done.value
                if request[3] and not request[4] and request[0] != "HEAD" and not self._draining:
                    # The usual answer (HTTP/1.1, keep-alive), ready unless the second changed.
                    out.append(reply.message if reply.message_date is date else reply.usual(date))
                else:
                    self._answer(reply, request)
                continue
            except BaseException:
                coro.close()
                self._close()
                raise
            self._hand_over(coro, waiting, request)

    def _start_in_driver(self) -> None:
        request = self._queue.popleft()
        if type(request) is not tuple:
            self._write(request, False, False, False)  # type: ignore[arg-type]
            return
        coro = self._check(request[0], request[1], request[2], self._peer)
        self._hand_over(coro, _NOT_STARTED, request)

    def _hand_over(self, coro: Coroutine[Any, Any, Reply], waiting: Any, request: Request) -> None:
        self.busy = True
        self._handed = (coro, waiting, request)
        self._wake.set_result(None)

    async def _drive(self) -> None:
        """The connection's task: finishes checks that had to wait, then the queue."""
        try:
            await self._serve_handed()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: never leave the client waiting for nothing
            log.exception("ext_authz HTTP connection failed")
            self.abort()

    async def _serve_handed(self) -> None:
        while True:
            try:
                await self._wake
            except asyncio.CancelledError:
                if self._handed is None or self._closed:
                    raise
                # Cancelled by what the check set up in its first step (a timeout): the
                # check gets the cancellation, as it would have in a task of its own.
                coro, waiting, request = self._handed
                self._handed = None
                reply = await _resume(coro, waiting, asyncio.CancelledError())
            else:
                assert self._handed is not None
                coro, waiting, request = self._handed
                self._handed = None
                if waiting is _NOT_STARTED:
                    reply = await coro
                else:
                    reply = await _resume(coro, waiting)
            self._answer(reply, request)
            self._flush()
            queue = self._queue
            while queue and not self._closed:
                request = queue.popleft()
                if type(request) is not tuple:
                    self._write(request, False, False, False)  # type: ignore[arg-type]
                    self._flush()
                    break
                reply = await self._check(request[0], request[1], request[2], self._peer)
                self._answer(reply, request)
                self._flush()
            if self._closed:
                return
            self._wake = self._loop.create_future()
            self.busy = False
            self._last_active = monotonic()
            if self._stopped and not self._transport.is_closing():  # type: ignore[union-attr]
                self._close()
            self._reading(True)

    def _answer(self, reply: Reply, request: Request) -> None:
        keep_alive = request[3] and not (self._draining and not self._queue)
        self._write(reply, keep_alive, request[4], request[0] == "HEAD")

    def _write(self, reply: Reply, keep_alive: bool, http10: bool, head: bool) -> None:
        self._out.append(reply.render(keep_alive, http10, head))
        if not keep_alive:
            self._stopped = True
            self._queue.clear()
            self._flush()
            self._close()

    def _flush(self) -> None:
        out = self._out
        if out:
            if not self._closed:
                transport = self._transport
                assert transport is not None
                transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _refuse(self, reply: Reply) -> None:
        """Stop reading; answer what came before, then `reply`, then close."""
        self._stopped = True
        self._reader.began = None
        self._queue.append(reply)
        self._run()

    def _reading(self, on: bool) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        on = on and not self._write_paused and len(self._queue) <= _MAX_QUEUED
        if on != self._reading_paused:
            return
        self._reading_paused = not on
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()  # after what is written

    # --- for the server ---------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Close the connection if its request is overdue or it has been idle too long."""
        if self._closed or self.busy:
            return
        limits = self._limits
        began = self._reader.began
        if began is not None:
            if now - began > limits.request_timeout:
                log.info("closed a connection whose request did not arrive in time")
                if self._queue:
                    self._stopped = True
                    self._close()
                else:
                    timeout = f"the request did not arrive within {limits.request_timeout:g}s"
                    self._refuse(refusal(408, timeout))
        elif not self._queue and now - self._last_active > limits.idle_timeout:
            self._stopped = True
            transport = self._transport
            if transport is not None and transport.get_write_buffer_size():
                transport.abort()  # answers the client does not read: not waited for
            else:
                self._close()

    def drain(self) -> None:
        """The server stops: answer the request being read (and those queued) with
        `connection: close`; close now when there is none."""
        self._draining = True
        if not self.busy and not self._queue and self._reader.began is None:
            self._stopped = True
            self._close()

    def abort(self) -> None:
        self._closed = self._stopped = True
        self._driver.cancel()
        if self._transport is not None:
            self._transport.abort()
