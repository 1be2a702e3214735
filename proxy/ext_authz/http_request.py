"""Reading requests in the ext_authz HTTP mode: llhttp (httptools) parses, a
`RequestReader` collects each complete request into its connection's queue and enforces
the limits.

Limits, each refused with a JSON answer (the connection then closes): request target
longer than `max_line` -> 414; a header field over `max_field`, more than `max_headers`
fields or a header block over `max_head` -> 431; a body over `max_body` -> 413; anything
llhttp cannot parse -> 400. A body (Envoy's `with_request_body`) is counted and dropped:
the decision never reads it.

The parser's callbacks only collect. Names, values and the target are decoded as they
arrive: UTF-8, and undecodable bytes kept as surrogates, so a byte is never lost or
changed (the plain `decode()` first: for valid UTF-8 it gives the same text, at a lower
cost per call than naming the error handler). A header block is measured field by field
only when it could be over a limit (it arrived in pieces, or in one piece larger than
`max_field`), in the bytes that were sent.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from time import monotonic

import httptools

from authproxy.ext_authz.http_reply import MALFORMED, Reply, refusal

log = logging.getLogger("authproxy.ext_authz")

Headers = tuple[tuple[str, str], ...]
#: A request read and not answered yet: method, target as sent, headers, keep-alive,
#: HTTP/1.0.
Request = tuple[str, str, Headers, bool, bool]

#: Header bytes collected before they are handed to the parser mid-field (so a header
#: trickling in byte by byte is not re-joined once per byte).
_COALESCE = 4096
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")}


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


class _Refused(Exception):
    """Raised in a parser callback to stop parsing with this answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.reply = refusal(status, message)


class RequestReader:
    """The requests of one connection, from its bytes into `queue` (shared with the
    connection, which answers and pops them). `began` is when the request being read
    started (monotonic; None between requests); `done` is set once a request asked for
    the connection to end (`connection: close`, HTTP/1.0, an upgrade): what follows it is
    not read."""

    __slots__ = (
        "_body",
        "_chunk",
        "_fed_at",
        "_head_fed",
        "_headers",
        "_in_head",
        "_limits",
        "_parser",
        "_pending",
        "_queue",
        "_url",
        "began",
        "done",
    )

    def __init__(self, limits: HttpLimits, queue: deque[Request | Reply]) -> None:
        self._limits = limits
        self._queue = queue
        self._parser = httptools.HttpRequestParser(self)
        self.began: float | None = None
        self.done = False
        self._fed_at = 0.0
        self._in_head = False
        self._chunk = 0
        self._head_fed = 0
        self._pending = bytearray()
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body = 0

    def feed(self, data: bytes) -> Reply | None:
        """Parse `data`; complete requests join the queue. Returns the refusal to answer
        after them when the bytes break a limit or cannot be parsed (read no further)."""
        if self._in_head:  # the rest of a header block that arrived in pieces
            limits = self._limits
            self._head_fed += len(data)
            if self._head_fed > limits.max_head + limits.max_field:
                return refusal(431, f"the header fields are over {limits.max_head} bytes")
            if b"\n" not in data and len(self._pending) + len(data) < _COALESCE:
                self._pending += data
                return None
            if self._pending:
                self._pending += data
                data = bytes(self._pending)
                self._pending.clear()
        self._chunk = len(data)
        self._fed_at = monotonic()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # CONNECT, Upgrade: answered, then closed
            self.done = True
            queue = self._queue
            if queue and type(queue[-1]) is tuple:
                method, target, headers, _, http10 = queue[-1]
                queue[-1] = (method, target, headers, False, http10)
        except httptools.HttpParserError as e:
            refused = e.__context__
            if isinstance(refused, _Refused):
                log.info("refused an HTTP request (%d): %s", refused.reply.status, refused)
                return refused.reply
            if not (self.done and self.began is None):  # else: bytes after the last request
                log.info("refused an unreadable HTTP request: %s", type(e).__name__)
                return MALFORMED
        return None

    # --- llhttp callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.began = self._fed_at
        self._in_head = True
        self._head_fed = 0
        self._url = b""
        self._headers = []
        self._body = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_line:
            raise _Refused(414, f"the request target is over {self._limits.max_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        try:
            self._headers.append((name.decode(), value.decode()))
        except UnicodeDecodeError:
            self._headers.append((_text(name), _text(value)))

    def on_headers_complete(self) -> None:
        self._in_head = False
        headers = self._headers
        limits = self._limits
        if len(headers) > limits.max_headers:
            raise _Refused(431, f"the request has over {limits.max_headers} header fields")
        # A header block read in one piece no longer than `max_field` holds no field over
        # the limits; any other is measured, in the bytes that were sent.
        if self._head_fed or self._chunk > limits.max_field:
            total = 0
            for name, value in headers:
                size = len(_sent(name)) + len(_sent(value))
                if size > limits.max_field:
                    raise _Refused(431, f"a header field is over {limits.max_field} bytes")
                total += size
            if total > limits.max_head:
                raise _Refused(431, f"the header fields are over {limits.max_head} bytes")

    def on_body(self, body: bytes) -> None:
        self._body += len(body)
        if self._body > self._limits.max_body:
            raise _Refused(413, f"the request body is over {self._limits.max_body} bytes")

    def on_message_complete(self) -> None:
        parser = self._parser
        method = parser.get_method()
        keep_alive = parser.should_keep_alive()
        url = self._url
        try:
            target = url.decode()
        except UnicodeDecodeError:
            target = _text(url)
        self._queue.append(
            (
                _METHODS.get(method) or method.decode("ascii", "replace"),
                target,
                tuple(self._headers),
                keep_alive,
                parser.get_http_version() == "1.0",
            )
        )
        self.began = None
        if not keep_alive:
            self.done = True  # nothing after this request is read


def _text(raw: bytes) -> str:
    """Bytes that are not UTF-8 as text: each undecodable byte kept as a surrogate."""
    return raw.decode("utf-8", "surrogateescape")


def _sent(text: str) -> bytes:
    """The bytes a decoded name or value was sent as (`_text` undone)."""
    return text.encode("utf-8", "surrogateescape")
