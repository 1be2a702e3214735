"""The admin listener (`--admin HOST:PORT`, loopback by default).

    GET  /healthz         200 while the process runs (liveness)
    GET  /readyz          200 when ready to serve (policy and keys loaded, upstream and
                          Redis reachable, not draining); 503 otherwise; JSON per check
    GET  /metrics         Prometheus exposition
    GET  /policy          the active policy: version, loaded-at, rules, last reload error,
                          reload counts, and the file's text
    POST /v1/revocations  {"jti": "...", "exp": 1234}      revoke one token until its exp
                          {"sub": "...", "before": 1234}   revoke every token of sub issued
                                                           before that time ("log out all")
    GET  /v1/revocations  the active revocations
    GET  /.well-known/jwks.json   the public keys the proxy loaded from local key files
                          (JWKS; asymmetric keys only, without retire times)
    GET  /public-key      PEM of the newest of those keys; `?kid=KID` picks one (404 JSON
                          for an unknown kid or when no asymmetric key is loaded)

The status and key endpoints are read-only and open (probes and scrapers carry no
secrets; public keys are public). The revocation API needs `authorization: Bearer <$ENV>`
with `--admin-token-env ENV`; on a non-loopback address it is refused (403) unless that
secret is configured, so a listener opened for kubelet probes is never an open revocation
endpoint. Errors are JSON `{"error", "reason", "message"}` like the ext_authz denies: 400
for bad input, 401 without the admin token, 403 as above, 404 for an unknown key, 503 when
the state backend is unavailable.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import time
from typing import Any, Protocol

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

from .http_listener import listen
from .jsonstrict import loads_strict
from .state import EXPIRY_GRACE, StateStore, StateUnavailable

log = logging.getLogger("authproxy.admin")

MAX_BODY = 16 * 1024
MAX_NAME = 512
#: The published keys change only on a rotation, which keeps the old key published for a
#: while: caching them for minutes is safe.
KEYS_CACHE_CONTROL = "public, max-age=300"
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


class AdminStatus(Protocol):
    """What the read-only endpoints report (implemented by `serve.AuthProxy`)."""

    async def readiness(self) -> tuple[bool, dict[str, str]]: ...
    def policy_status(self) -> dict[str, Any]: ...
    def metrics(self) -> bytes: ...
    def published_jwks(self) -> dict[str, Any]: ...


class AdminServer:
    def __init__(
        self,
        store: StateStore,
        address: str,
        token: str | None = None,
        status: AdminStatus | None = None,
    ) -> None:
        self.address = address
        self.port = 0  # known once started
        self.store = store
        self.status = status
        self._token = token.encode() if token else None
        self._writes_open = token is not None or _is_loopback(address)
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        app.router.add_post("/v1/revocations", self.revoke)
        app.router.add_get("/v1/revocations", self.list_revocations)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/policy", self.policy)
        app.router.add_get("/.well-known/jwks.json", self.jwks)
        app.router.add_get("/public-key", self.public_key)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        self.port = await listen(self._runner, self.address)

    async def stop(self, grace: float = 0) -> None:
        await self._runner.cleanup()

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)  # the read-only status endpoints
        if not self._writes_open:
            return _error(
                403,
                "FORBIDDEN",
                "the revocation API on a non-loopback admin address needs --admin-token-env",
            )
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

    # --- status -------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.status is None:
            return web.json_response({"ready": True, "checks": {}})
        ready, checks = await self.status.readiness()
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        if self.status is None:
            raise web.HTTPNotFound()
        return web.Response(body=self.status.metrics(), headers={"content-type": CONTENT_TYPE})

    async def policy(self, request: web.Request) -> web.Response:
        if self.status is None:
            raise web.HTTPNotFound()
        return web.json_response(self.status.policy_status())

    # --- published keys ------------------------------------------------------------------

    def _published(self) -> list[dict[str, Any]]:
        if self.status is None:
            return []
        return [
            _public_only(k) for k in self.status.published_jwks().get("keys", []) if _is_public(k)
        ]

    async def jwks(self, request: web.Request) -> web.Response:
        if self.status is None:
            raise web.HTTPNotFound()
        return web.json_response(
            {"keys": self._published()}, headers={"cache-control": KEYS_CACHE_CONTROL}
        )

    async def public_key(self, request: web.Request) -> web.Response:
        keys = self._published()
        kid = request.query.get("kid")
        if kid is not None:
            chosen = next((k for k in keys if k.get("kid") == kid), None)
            if chosen is None:
                return _error(404, "KEY_NOT_FOUND", f"no published key has kid {kid!r}")
        elif keys:
            chosen = keys[-1]  # the newest: keygen adds a key at the end
        else:
            return _error(404, "KEY_NOT_FOUND", "no public key is loaded from a key file")
        try:
            pem = jwt.PyJWK(chosen).key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, AttributeError) as e:
            log.warning("cannot serve key %r as PEM: %s", chosen.get("kid"), e)
            return _error(404, "KEY_NOT_FOUND", f"key {chosen.get('kid')!r} has no PEM form")
        headers = {"cache-control": KEYS_CACHE_CONTROL}
        if chosen.get("kid"):
            headers["x-key-id"] = str(chosen["kid"])
        return web.Response(body=pem, content_type="application/x-pem-file", headers=headers)


def _is_public(jwk: Any) -> bool:
    """Only asymmetric public keys are published (never an HMAC secret or private parts)."""
    return (
        isinstance(jwk, dict)
        and jwk.get("kty") in ("RSA", "EC", "OKP")
        and not any(m in jwk for m in PRIVATE_MEMBERS)
    )


def _public_only(jwk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in jwk.items() if k != "retire_at"}


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


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(status: int, reason: str, message: str) -> web.Response:
    error = {
        400: "invalid_argument",
        401: "unauthenticated",
        403: "permission_denied",
        404: "not_found",
        503: "unavailable",
    }
    return web.Response(
        status=status,
        content_type="application/json",
        text=json.dumps(
            {"error": error.get(status, "error"), "reason": reason, "message": message}
        ),
    )
