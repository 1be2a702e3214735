"""The admin listener (`--admin HOST:PORT`, loopback by default): the revocation API.

    POST /v1/revocations  {"jti": "...", "exp": 1234}      revoke one token until its exp
                          {"sub": "...", "before": 1234}   revoke every token of sub issued
                                                           before that time ("log out all")
    GET  /v1/revocations  the active revocations

With `--admin-token-env ENV`, every request needs `authorization: Bearer <$ENV>`.
Errors are JSON `{"error", "reason", "message"}` like the ext_authz denies: 400 for bad
input, 401 without the admin token, 503 when the state backend is unavailable.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from typing import Any

from aiohttp import web

from .http_listener import listen
from .jsonstrict import loads_strict
from .state import EXPIRY_GRACE, StateStore, StateUnavailable

log = logging.getLogger("authproxy.admin")

MAX_BODY = 16 * 1024
MAX_NAME = 512


class AdminServer:
    def __init__(self, store: StateStore, address: str, token: str | None = None) -> None:
        self.address = address
        self.port = 0  # known once started
        self.store = store
        self._token = token.encode() if token else None
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        app.router.add_post("/v1/revocations", self.revoke)
        app.router.add_get("/v1/revocations", self.list_revocations)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        self.port = await listen(self._runner, self.address)

    async def stop(self, grace: float = 0) -> None:
        await self._runner.cleanup()

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        if self._token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self._token):
                response = _error(401, "UNAUTHENTICATED", "the admin API needs its bearer token")
                response.headers["www-authenticate"] = "Bearer"
                return response
        try:
            return await handler(request)
        except StateUnavailable as e:
            return _error(503, "STATE_UNAVAILABLE", str(e))
        except web.HTTPException as e:
            return _error(e.status, "BAD_REQUEST", e.reason)

    async def revoke(self, request: web.Request) -> web.Response:
        try:
            body = loads_strict(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, "BAD_JSON", f"the body is not a JSON object: {e}")
        problem = _problem(body)
        if problem:
            return _error(400, "BAD_REVOCATION", problem)
        if "jti" in body:
            await self.store.revoke_token(body["jti"], float(body["exp"]))
            log.info("revoked token %s until %s", body["jti"], body["exp"])
        else:
            await self.store.revoke_subject(body["sub"], float(body["before"]))
            log.info("revoked every token of %s issued before %s", body["sub"], body["before"])
        return web.json_response({"revoked": body}, status=201)

    async def list_revocations(self, request: web.Request) -> web.Response:
        active = await self.store.revocations()
        return web.json_response({"revocations": [r.as_json() for r in active]})


def _problem(body: Any) -> str | None:
    """What is wrong with a revocation request body, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if set(body) == {"jti", "exp"}:
        name, when, what = body["jti"], body["exp"], "exp"
    elif set(body) == {"sub", "before"}:
        name, when, what = body["sub"], body["before"], "before"
    else:
        return (
            'expected {"jti": "...", "exp": <unix time>} or {"sub": "...", "before": <unix time>}'
        )
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        return f"jti/sub must be a non-empty string of at most {MAX_NAME} characters"
    if isinstance(when, bool) or not isinstance(when, int | float) or not math.isfinite(when):
        return f"'{what}' must be a number (seconds since the epoch)"
    if what == "exp" and when + EXPIRY_GRACE <= time.time():
        return f"'exp' is more than {EXPIRY_GRACE:.0f}s in the past: no policy accepts that token"
    return None


def _error(status: int, reason: str, message: str) -> web.Response:
    error = {400: "invalid_argument", 401: "unauthenticated", 503: "unavailable"}
    return web.Response(
        status=status,
        content_type="application/json",
        text=json.dumps(
            {"error": error.get(status, "error"), "reason": reason, "message": message}
        ),
    )
