"""The bytes of an HTTP/1.1 answer in the ext_authz HTTP mode: status line, `date`, header
lines and body, and the JSON refusals of requests that cannot be read at all.

A `Reply` keeps its usual message (HTTP/1.1, keep-alive, not HEAD) whole for the current
second, so an answer shared between requests (an allow: `ext_authz_http` keeps one per
`Allow`) is written from ready bytes; only the `date` line makes it change, once a second.
"""

from __future__ import annotations

import json
from email.utils import formatdate
from http import HTTPStatus
from time import time

SERVER_LINE = b"server: authproxy\r\n"
_JSON_LINE = b"content-type: application/json\r\n"


def status_line(status: int, http10: bool = False) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.{0 if http10 else 1} {status} {phrase}\r\n".encode()


_date: list = [0, b""]


def date_line() -> bytes:
    """The `date` header line: formatted once a second, and the same bytes object all
    that second (a `Reply` compares it by identity)."""
    now = int(time())
    if now != _date[0]:
        _date[1] = f"date: {formatdate(now, usegmt=True)}\r\n".encode()
        _date[0] = now
    return _date[1]


class Reply:
    """An answer: status, header lines ("name: value\r\n" each, content-length included;
    no date, no connection) and body."""

    __slots__ = ("body", "first", "lines", "message", "message_date", "status")

    def __init__(self, status: int, lines: bytes, body: bytes = b"") -> None:
        self.status = status
        self.lines = lines
        self.body = body
        self.first = status_line(status) + lines
        #: The usual message, and the `date_line` it holds; `usual` renews them.
        self.message = b""
        self.message_date = b""

    def usual(self, date: bytes) -> bytes:
        """The message for HTTP/1.1 and keep-alive, not HEAD: the common case, kept."""
        if self.message_date is not date:
            self.message = b"".join((self.first, date, b"\r\n", self.body))
            self.message_date = date
        return self.message

    def render(self, keep_alive: bool, http10: bool, head: bool) -> bytes:
        date = date_line()
        if keep_alive and not http10 and not head:
            return self.usual(date)
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


#: The answer to bytes llhttp cannot parse as a request.
MALFORMED = refusal(400, "the HTTP request could not be read")
