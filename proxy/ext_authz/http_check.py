"""The Envoy ext_authz HTTP front end (Envoy's `http_service` mode).

Envoy sends the original method, `path_prefix` + the original path (query included) and
the headers its `allowed_headers` lets through. We answer 200 to allow — with the
identity headers (Envoy copies the ones `allowed_upstream_headers` matches onto the
upstream request, overwriting) and `x-envoy-auth-headers-to-remove` — or 401/403/400/429
to deny, with the body and headers `ext_authz.deny_for` builds. An unexpected failure
answers 500, which Envoy treats as an authorization *error* (`failure_mode_allow`,
`status_on_error`), never as an allow.

HTTP/1.1 itself is three modules: `ext_authz_http_request` reads requests (limits),
`ext_authz_http_protocol` answers them on a connection (keep-alive, pipelining, timeouts),
`ext_authz_http_reply` renders the bytes. An allow's answer is rendered once and kept with
the `Allow` (which `ext_authz.allow_for` shares between equal requests: same identity,
rule, policy version and headers to remove), so a repeated allow is answered from ready
bytes; a different decision is a different `Allow`, never the same answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from time import monotonic
from typing import TYPE_CHECKING

from authproxy.decide.pipeline import Authorizer
from authproxy.decide.reasons import Denied, Reason
from authproxy.decide.request_fields import expected_fields
from authproxy.ext_authz.answer import (
    Allow,
    Allows,
    CheckRequest,
    Deny,
    Headers,
    allow_for,
    deny_for,
    is_grpc,
    refuse,
)
from authproxy.ext_authz.http_protocol import HttpConnection
from authproxy.ext_authz.http_reply import SERVER_LINE, Reply
from authproxy.ext_authz.http_request import HttpLimits
from authproxy.wire.listen import listen_on

if TYPE_CHECKING:
    from authproxy.runtime.tracing import Tracing

log = logging.getLogger("authproxy.ext_authz")

HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ERROR = Reply(
    500,
    SERVER_LINE + b"content-type: text/plain; charset=utf-8\r\ncontent-length: 26\r\n",
    b"authorization check failed",
)
#: This front end's key for `Allow.rendered_as`.
_RENDERED = "http1"


#: A rule on request fields needs the body, which only the gRPC Check API carries here.
_NO_BODY = Denied(
    Reason.FIELDS_UNAVAILABLE,
    "the HTTP ext_authz mode reads no request body: check this route with the gRPC mode"
    " (with_request_body, pack_as_bytes: true)",
)


class CheckHttpServer:
    def __init__(
        self,
        authorizer: Authorizer,
        address: str,
        path_prefix: str = "",
        reuse_port: bool = False,
        limits: HttpLimits | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """`reuse_port`: SO_REUSEPORT, so several worker processes share the port;
        `limits`: sizes and timeouts (read when a connection opens); `tracing`: a span per
        check, continuing the checked request's trace (None: off)."""
        if path_prefix and (not path_prefix.startswith("/") or path_prefix.endswith("/")):
            raise ValueError(
                f"--ext-authz-http-path-prefix {path_prefix!r} must start with '/' and not end"
                " with '/' (Envoy's path_prefix, like /check)"
            )
        self.address = address
        self.reuse_port = reuse_port
        self.port = 0  # known once started
        self.authorizer = authorizer
        self.decide_http = authorizer.decide_http
        if tracing is not None:
            self.decide_http = tracing.decide_http(authorizer.decide_http, "ext_authz.http")
        self.allows = Allows()
        self.path_prefix = path_prefix
        self.limits = limits or HttpLimits()
        self.errors_total = 0
        self.connections: set[HttpConnection] = set()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None

    async def start(self) -> None:
        """Bind and listen (OSError when the port cannot be had)."""
        loop = asyncio.get_running_loop()

        async def serve(sock: socket.socket) -> None:
            server = await loop.create_server(self._connection, sock=sock, backlog=1024)
            self._servers.append(server)

        self.port = await listen_on(self.address, serve, self.reuse_port)
        self._sweep()

    async def stop(self, grace: float) -> None:
        """Stop listening; let requests being read or decided finish (answered with
        `connection: close`) for up to `grace` seconds, then close what is left."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if not self._servers:
            return
        for server in self._servers:
            server.close()
        self._all_closed = asyncio.Event()
        for connection in tuple(self.connections):
            connection.drain()
        if self.connections and grace > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._all_closed.wait()
        for connection in tuple(self.connections):
            connection.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def _connection(self) -> HttpConnection:
        connection = HttpConnection(self.check, self.limits, self._closed)
        self.connections.add(connection)
        return connection

    def _closed(self, connection: HttpConnection) -> None:
        self.connections.discard(connection)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def _sweep(self) -> None:
        """Close connections whose request is overdue or that idled too long."""
        if self.connections:
            now = monotonic()
            for connection in tuple(self.connections):
                connection.expire(now)
        limits = self.limits
        every = min(1.0, max(0.05, min(limits.request_timeout, limits.idle_timeout) / 4))
        self._sweeper = asyncio.get_running_loop().call_later(every, self._sweep)

    async def check(self, method: str, path: str, headers: Headers, peer: str | None) -> Reply:
        """The answer to one check: `path` as sent (not decoded, query included), `peer`
        the client's address (Envoy: list it in --trusted-proxy to use x-forwarded-for)."""
        try:
            prefix = self.path_prefix
            if prefix:
                if not (path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] == "/"):
                    return _deny_reply(
                        refuse(
                            self.authorizer,
                            CheckRequest(method, path, headers, peer),
                            f"the check path does not start with the path prefix {prefix}/",
                        )
                    )
                path = path[len(prefix) :]
            # `ext_authz.answer`'s steps, inline: no request view and no coroutine more
            # per check (about 1 µs, 3 % of a check here).
            authorizer = self.authorizer
            policy = authorizer.policy  # one snapshot: header names match the decision
            grpc = is_grpc(headers)
            decision = await self.decide_http(method, path, headers, grpc, policy, peer)
            identity = decision.identity
            if decision.allowed and identity and expected_fields(decision.rule, identity):
                decision = authorizer.refuse_later(decision, _NO_BODY)  # bodies: gRPC only
            if not decision.allowed:
                return _deny_reply(deny_for(decision, grpc))
            return allow_for(decision, headers, policy, self.allows).rendered_as(
                _RENDERED, _allow_reply
            )
        except Exception:
            self.errors_total += 1
            log.exception("ext_authz check failed; answering 500 (an error for Envoy)")
            return _ERROR


def _allow_reply(allow: Allow) -> Reply:
    headers = allow.headers
    if allow.remove:
        headers = (*headers, (HEADERS_TO_REMOVE, ",".join(allow.remove)))
    return Reply(200, SERVER_LINE + _lines(headers) + b"content-length: 0\r\n")


def _deny_reply(deny: Deny) -> Reply:
    body = deny.body.encode()
    lines = _lines(deny.headers) + SERVER_LINE + b"content-length: %d\r\n" % len(body)
    return Reply(deny.status, lines, body)


def _lines(headers: Headers) -> bytes:
    """Header lines; ValueError (a 500) for a name or value that would break the message."""
    out = []
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"header {name[:64]!r} cannot be sent")
        out.append(f"{name}: {value}\r\n")
    return "".join(out).encode("utf-8")
