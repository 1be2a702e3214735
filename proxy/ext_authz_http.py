"""The Envoy ext_authz HTTP front end (Envoy's `http_service` mode), on aiohttp.

Envoy sends the original method, `path_prefix` + the original path (query included) and
the headers its `allowed_headers` lets through. We answer 200 to allow — with the
identity headers (Envoy copies the ones `allowed_upstream_headers` matches onto the
upstream request, overwriting) and `x-envoy-auth-headers-to-remove` — or 401/403/400/429
to deny, with the body and headers `ext_authz.reply` builds. An unexpected failure
answers 500, which Envoy treats as an authorization *error* (`failure_mode_allow`,
`status_on_error`), never as an allow.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .ext_authz import Allow, CheckRequest, Deny, answer, refuse
from .http_listener import listen
from .pipeline import Authorizer

log = logging.getLogger("authproxy.ext_authz")

HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
#: Replaces aiohttp's default `Server` header (which names library versions).
SERVER = ("server", "authproxy")
#: Request line and header limits: room for long paths and for tokens up to the policy's
#: `max_token_bytes` limit (64 KiB at most), so the pipeline, not the parser, refuses them.
MAX_LINE = 16 * 1024
MAX_FIELD = 64 * 1024 + 64


class CheckHttpServer:
    def __init__(
        self, authorizer: Authorizer, address: str, path_prefix: str = "", reuse_port: bool = False
    ) -> None:
        """`reuse_port`: SO_REUSEPORT, so several worker processes share the port."""
        if path_prefix and (not path_prefix.startswith("/") or path_prefix.endswith("/")):
            raise ValueError(
                f"--ext-authz-http-path-prefix {path_prefix!r} must start with '/' and not end"
                " with '/' (Envoy's path_prefix, like /check)"
            )
        self.address = address
        self.reuse_port = reuse_port
        self.port = 0  # known once started
        self.authorizer = authorizer
        self.path_prefix = path_prefix
        self.errors_total = 0
        self._runner = web.ServerRunner(
            _Server(
                self.handle,
                access_log=None,
                max_line_size=MAX_LINE,
                max_field_size=MAX_FIELD,
            ),
            handle_signals=False,
        )

    async def start(self) -> None:
        if not self.reuse_port:
            self.port = await listen(self._runner, self.address)
            return
        host, _, port = self.address.rpartition(":")
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, host.strip("[]"), int(port), reuse_address=True, reuse_port=True
        )
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self, grace: float) -> None:
        await self._runner.shutdown()
        await self._runner.cleanup()

    async def handle(self, request: web.BaseRequest) -> web.Response:
        try:
            return await self._check(request)
        except Exception:
            self.errors_total += 1
            log.exception("ext_authz check failed; answering 500 (an error for Envoy)")
            return web.Response(status=500, text="authorization check failed", headers=(SERVER,))

    async def _check(self, request: web.BaseRequest) -> web.Response:
        headers = tuple(request.headers.items())
        peer = request.remote  # Envoy: list it in --trusted-proxy to use x-forwarded-for
        path = request.raw_path  # as sent: not decoded, query included
        prefix = self.path_prefix
        if prefix and not (path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] == "/"):
            result: Allow | Deny = refuse(
                self.authorizer,
                CheckRequest(request.method, path, headers, peer),
                f"the check path does not start with the path prefix {prefix}/",
            )
        else:
            result = await answer(
                self.authorizer, CheckRequest(request.method, path[len(prefix) :], headers, peer)
            )
        if isinstance(result, Allow):
            out = result.rendered.get("http")
            if out is None:
                out = result.rendered["http"] = (
                    *result.headers,
                    SERVER,
                    *((HEADERS_TO_REMOVE, ",".join(result.remove)),) * bool(result.remove),
                )
            return web.Response(status=200, headers=out)
        return web.Response(
            status=result.status, headers=(*result.headers, SERVER), body=result.body.encode()
        )


class _Protocol(RequestHandler):
    """aiohttp's connection handler, with our answer for requests its parser refuses
    (garbage, over-long lines or headers): a JSON 400 like every other refusal, no
    library versions in `server`, no echo of the input, one log line instead of a
    traceback per request."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        log.info("refused an unreadable HTTP request (%d): %s", status, type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        body = {
            "error": "invalid_argument" if status < 500 else "internal",
            "reason": "REQUEST_MALFORMED" if status < 500 else "INTERNAL",
            "message": "the HTTP request could not be read",
        }
        response = web.Response(
            status=status,
            headers=(SERVER, ("content-type", "application/json")),
            body=json.dumps(body).encode(),
        )
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)
