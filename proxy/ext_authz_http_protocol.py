"""HTTP/1.1 for the ext_authz HTTP mode: a lean `asyncio.Protocol` on llhttp (httptools).

One `HttpConnection` per client connection. The parser's callbacks only collect; each
complete request is queued, and the queue is answered strictly in order (pipelining),
one request at a time, like aiohttp's server did. A request is answered as soon as its
last byte arrived (a body, when Envoy sends one with `with_request_body`, is read, counted
against a limit and dropped: the decision never reads it).

The check runs *eagerly*: its first step runs right in `data_received`, with the
connection's driver task set as the current task (what `asyncio.timeout()` and the like
look for) and in the driver's context. Most checks finish in that step (everything in memory) and are answered
without a task switch; one that waits for I/O (Redis) is handed to the driver task, which
resumes it exactly where it stopped and then answers the rest of the queue itself.

Limits, each refused with a JSON answer and the connection closed: request target longer
than `max_line` -> 414; a header field over `max_field`, more than `max_headers` fields or
a header block over `max_head` -> 431; a body over `max_body` -> 413; anything llhttp
cannot parse -> 400. A request must arrive whole within `request_timeout` of its first
byte (408: a slow client cannot hold a connection with an endless request), and a
connection with no request for `idle_timeout` is closed (dropped, when answers it does
not read are still waiting to be sent).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from time import monotonic, time
from typing import Any

import httptools

log = logging.getLogger("authproxy.ext_authz")

#: What a connection asks its server: (method, path as sent, headers, peer) -> a Reply.
Check = Callable[[str, str, tuple[tuple[str, str], ...], str | None], Coroutine[Any, Any, "Reply"]]

SERVER_LINE = b"server: authproxy\r\n"
_JSON_LINE = b"content-type: application/json\r\n"
#: Requests received but not answered yet (pipelined behind a slow one) before the
#: connection stops reading.
_MAX_QUEUED = 32
#: Header bytes a connection collects before handing them to the parser mid-field (so a
#: header trickling in byte by byte is not re-joined once per byte).
_COALESCE = 4096

try:  # the current task during an eager step; without them, checks start in the driver
    from asyncio.tasks import _enter_task, _leave_task  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    _enter_task = _leave_task = None


@dataclass(frozen=True)
class HttpLimits:
    #: The request target (path and query) as sent.
    max_line: int = 16 * 1024
    #: One header field, name and value; room for the policy's largest `max_token_bytes`
    #: (64 KiB), so the pipeline, not the parser, refuses a large token.
    max_field: int = 64 * 1024 + 64
    max_headers: int = 256
    #: Every header field together.
    max_head: int = 256 * 1024
    #: A request body (Envoy's `with_request_body`): read and dropped, never kept.
    max_body: int = 8 * 1024 * 1024
    #: Seconds from a request's first byte until it must have arrived whole.
    request_timeout: float = 10.0
    #: Seconds a connection may wait for its next request (aiohttp's keep-alive default).
    idle_timeout: float = 75.0


# --- rendering ---------------------------------------------------------------------------


def status_line(status: int, http10: bool = False) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.{0 if http10 else 1} {status} {phrase}\r\n".encode()


_date = [0, b""]


def date_line() -> bytes:
    """The `date` header line; formatted once a second."""
    now = int(time())
    if now != _date[0]:
        _date[1] = f"date: {formatdate(now, usegmt=True)}\r\n".encode()
        _date[0] = now
    return _date[1]  # type: ignore[return-value]


class Reply:
    """An answer: status, header lines ("name: value\r\n" each, content-length included;
    no date, no connection) and body. The usual message (HTTP/1.1, keep-alive) is kept
    whole for the current second, so an answer shared between requests (an allow) is
    written from ready bytes."""

    __slots__ = ("_date", "_message", "body", "first", "lines", "status")

    def __init__(self, status: int, lines: bytes, body: bytes = b"") -> None:
        self.status = status
        self.lines = lines
        self.body = body
        self.first = status_line(status) + lines
        self._date = b""
        self._message = b""

    def refresh(self, date: bytes) -> None:
        self._message = b"".join((self.first, date, b"\r\n", self.body))
        self._date = date

    def render(self, keep_alive: bool, http10: bool, head: bool) -> bytes:
        date = date_line()
        if keep_alive and not http10 and not head:
            if self._date is not date:
                self.refresh(date)
            return self._message
        if keep_alive:
            closing = b"connection: keep-alive\r\n" if http10 else b""
        else:
            closing = b"connection: close\r\n"
        first = status_line(self.status, True) + self.lines if http10 else self.first
        return b"".join((first, date, closing, b"\r\n", b"" if head else self.body))


def refusal(status: int, message: str) -> Reply:
    """A JSON answer to a request that cannot be judged at all (it is not echoed)."""
    body = json.dumps(
        {"error": "invalid_argument", "reason": "REQUEST_MALFORMED", "message": message}
    ).encode()
    return Reply(status, SERVER_LINE + _JSON_LINE + b"content-length: %d\r\n" % len(body), body)


_MALFORMED = refusal(400, "the HTTP request could not be read")


class _Refused(Exception):
    """Raised in a parser callback to stop parsing with this answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.reply = refusal(status, message)


#: A parsed request waiting for its answer: method, path, headers, keep-alive, HTTP/1.0.
_Request = tuple[str, str, tuple[tuple[str, str], ...], bool, bool]

_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")}


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


# --- the connection ----------------------------------------------------------------------


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_began",
        "_body",
        "_check",
        "_chunk",
        "_closed",
        "_context",
        "_draining",
        "_driver",
        "_handed",
        "_head_fed",
        "_headers",
        "_in_head",
        "_last_active",
        "_limits",
        "_loop",
        "_on_closed",
        "_out",
        "_parser",
        "_peer",
        "_pending",
        "_queue",
        "_raw",
        "_reading_paused",
        "_stopped",
        "_transport",
        "_url",
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
        self._parser = httptools.HttpRequestParser(self)
        self._peer: str | None = None
        #: Requests read and not answered yet, in order; a Reply is a refusal (the last).
        self._queue: deque[_Request | Reply] = deque()
        self._out: list[bytes] = []
        #: A check being finished by the driver task (busy), and its request.
        self.busy = False
        self._handed: tuple[Coroutine[Any, Any, Reply], Any, _Request] | None = None
        self._wake: asyncio.Future[None] = self._loop.create_future()
        #: The driver's context: eager steps run in it too, as they would in a task.
        self._context = contextvars.copy_context()
        self._driver = self._loop.create_task(self._drive(), context=self._context)
        #: Reading a request: since when (monotonic); None between requests.
        self._began: float | None = None
        self._last_active = monotonic()
        self._in_head = False
        self._chunk = 0
        self._head_fed = 0
        self._pending = bytearray()
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._headers: tuple[tuple[str, str], ...] = ()
        self._body = 0
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
        if self._in_head:  # the rest of a header block that arrived in pieces
            limits = self._limits
            self._head_fed += len(data)
            if self._head_fed > limits.max_head + limits.max_field:
                self._refuse(refusal(431, f"the header fields are over {limits.max_head} bytes"))
                return
            if b"\n" not in data and len(self._pending) + len(data) < _COALESCE:
                self._pending += data
                return
            if self._pending:
                self._pending += data
                data = bytes(self._pending)
                self._pending.clear()
        self._chunk = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # CONNECT, Upgrade: answered, then closed
            self._stopped = True
            if self._queue and isinstance(self._queue[-1], tuple):
                self._queue[-1] = (*self._queue[-1][:3], False, self._queue[-1][4])
            elif not self.busy:
                self._close()
        except httptools.HttpParserError as e:
            refused = e.__context__
            if isinstance(refused, _Refused):
                log.info("refused an HTTP request (%d): %s", refused.reply.status, refused)
                self._refuse(refused.reply)
            elif self._stopped and self._began is None:  # bytes after `connection: close`
                self._run()
            else:
                log.info("refused an unreadable HTTP request: %s", type(e).__name__)
                self._refuse(_MALFORMED)
            return
        if self._queue:
            self._run()

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

    # --- llhttp callbacks (they only collect; `_run` answers) -------------------------

    def on_message_begin(self) -> None:
        self._began = monotonic()
        self._in_head = True
        self._head_fed = 0
        self._url = b""
        self._raw = []
        self._body = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_line:
            raise _Refused(414, f"the request target is over {self._limits.max_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        raw = self._raw
        limits = self._limits
        if len(raw) > limits.max_headers:
            raise _Refused(431, f"the request has over {limits.max_headers} header fields")
        # A header block read in one piece no longer than `max_field` holds no field over
        # the limits; any other is measured.
        if self._head_fed or self._chunk > limits.max_field:
            total = 0
            for name, value in raw:
                size = len(name) + len(value)
                if size > limits.max_field:
                    raise _Refused(431, f"a header field is over {limits.max_field} bytes")
                total += size
            if total > limits.max_head:
                raise _Refused(431, f"the header fields are over {limits.max_head} bytes")
        self._headers = tuple(
            [
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in raw
            ]
        )

    def on_body(self, body: bytes) -> None:
        self._body += len(body)
        if self._body > self._limits.max_body:
            raise _Refused(413, f"the request body is over {self._limits.max_body} bytes")

    def on_message_complete(self) -> None:
        parser = self._parser
        method = parser.get_method()
        keep_alive = parser.should_keep_alive()
        self._queue.append(
            (
                _METHODS.get(method) or method.decode("ascii", "replace"),
                self._url.decode("utf-8", "surrogateescape"),
                self._headers,
                keep_alive,
                parser.get_http_version() == "1.0",
            )
        )
        self._began = None
        self._last_active = monotonic()
        if not keep_alive:
            self._stopped = True  # nothing after this request is read
        if len(self._queue) > _MAX_QUEUED:
            self._reading(False)

    # --- answering --------------------------------------------------------------------

    def _run(self) -> None:
        """Answer queued requests in order, each check's first step run right here."""
        queue = self._queue
        loop, driver = self._loop, self._driver
        while queue and not self.busy and not self._closed:
            request = queue.popleft()
            if type(request) is not tuple:  # a refusal: the last answer
                self._write(request, False, False, False)  # type: ignore[arg-type]
                break
            coro = self._check(request[0], request[1], request[2], self._peer)
            try:
                _enter_task(loop, driver)  # type: ignore[misc]
            except (TypeError, RuntimeError):  # not from the loop's I/O: no eager step
                self._hand_over(coro, _NOT_STARTED, request)
                break
            try:
                waiting = self._context.run(coro.send, None)
            except StopIteration as done:
                reply = done.value
                if request[3] and not request[4] and request[0] != "HEAD" and not self._draining:
                    date = date_line()  # the usual answer, inline: HTTP/1.1, keep-alive
                    if reply._date is not date:
                        reply.refresh(date)
                    self._out.append(reply._message)
                else:
                    self._answer(reply, request)
                continue
            except BaseException:
                coro.close()
                self._close()
                raise
            finally:
                _leave_task(loop, driver)  # type: ignore[misc]
            self._hand_over(coro, waiting, request)
            break
        self._flush()
        if self._reading_paused and not self.busy:
            self._reading(True)

    def _hand_over(self, coro: Coroutine[Any, Any, Reply], waiting: Any, request: _Request) -> None:
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

    def _answer(self, reply: Reply, request: _Request) -> None:
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
        self._began = None
        self._in_head = False
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
        if self._began is not None:
            if now - self._began > limits.request_timeout:
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
        if not self.busy and not self._queue and self._began is None:
            self._stopped = True
            self._close()

    def abort(self) -> None:
        self._closed = self._stopped = True
        self._driver.cancel()
        if self._transport is not None:
            self._transport.abort()


_NOT_STARTED = object()
