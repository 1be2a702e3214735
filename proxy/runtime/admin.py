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

Every route is registered with its access class (`Access`); a route registered without
one, and any unknown path, is treated as `PRIVATE`, so a route added later is closed until
someone opens it on purpose. With `--admin-token-env ENV` every route but the probes
(`/healthz`, `/readyz`), the published public keys and `/metrics` needs `authorization:
Bearer <$ENV>`, and `--admin-metrics-auth` puts `/metrics` behind it too. Without the secret, the read-only
routes are open and the private ones (the revocation API) answer only on a loopback
address (403 elsewhere), so a listener opened for kubelet probes is never an open
revocation endpoint. Errors are JSON `{"error", "reason", "message"}` like the ext_authz denies: 400
for bad input, 401 without the admin token, 403 as above, 404 for an unknown key, 503 when
the state backend is unavailable.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import socket
import time
from enum import Enum
from typing import Any, Protocol

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

from authproxy.keys.jsonstrict import loads_strict
from authproxy.state.store import EXPIRY_GRACE, StateStore, StateUnavailable
from authproxy.wire.listen import listen_on

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


class Access(Enum):
    """Who may call a route."""

    #: Liveness and readiness: always open (kubelet probes carry no secrets).
    PROBE = "probe"
    #: Prometheus exposition: open, or behind the admin token with `--admin-metrics-auth`.
    METRICS = "metrics"
    #: Published public keys: always open, like any identity provider's JWKS (other
    #: services and proxies fetch them with `--jwks URL`, which sends no secret).
    KEYS = "keys"
    #: Read-only status and published keys: behind the admin token when one is configured.
    READ = "read"
    #: Revocations: behind the admin token; without one, only on a loopback address.
    PRIVATE = "private"


class AdminServer:
    def __init__(
        self,
        store: StateStore,
        address: str,
        token: str | None = None,
        status: AdminStatus | None = None,
        metrics_auth: bool = False,
    ) -> None:
        self.address = address
        self.port = 0  # known once started
        self.store = store
        self.status = status
        self._token = token.encode() if token else None
        self._private_open = token is not None or _is_loopback(address)
        self._metrics_auth = metrics_auth
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        #: Each route's resource and its access class; anything else is PRIVATE.
        self.access: dict[web.AbstractResource, Access] = {}
        self._route("POST", "/v1/revocations", self.revoke, Access.PRIVATE)
        self._route("GET", "/v1/revocations", self.list_revocations, Access.PRIVATE)
        self._route("GET", "/healthz", self.healthz, Access.PROBE)
        self._route("GET", "/readyz", self.readyz, Access.PROBE)
        self._route("GET", "/metrics", self.metrics, Access.METRICS)
        self._route("GET", "/policy", self.policy, Access.READ)
        self._route("GET", "/.well-known/jwks.json", self.jwks, Access.KEYS)
        self._route("GET", "/public-key", self.public_key, Access.KEYS)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)

    def _route(self, method: str, path: str, handler, access: Access) -> None:
        route = self.app.router.add_route(method, path, handler)
        assert route.resource is not None
        known = self.access.setdefault(route.resource, access)
        assert known is access, f"{path}: one path, one access class"

    async def start(self) -> None:
        """Bind and listen (OSError when the port cannot be had)."""
        await self._runner.setup()

        async def serve(sock: socket.socket) -> None:
            await web.SockSite(self._runner, sock).start()

        self.port = await listen_on(self.address, serve)

    async def stop(self, grace: float = 0) -> None:
        await self._runner.cleanup()

    def access_of(self, request: web.Request) -> Access:
        """The route's access class; PRIVATE for a route registered without one and for
        a path no route serves."""
        resource = request.match_info.route.resource
        return self.access.get(resource, Access.PRIVATE) if resource else Access.PRIVATE

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        access = self.access_of(request)
        if access in (Access.PROBE, Access.KEYS) or (
            access is Access.METRICS and not self._metrics_auth
        ):
            return await handler(request)
        if access is Access.PRIVATE and not self._private_open:
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
        elif access is Access.METRICS:  # --admin-metrics-auth without a secret: refused
            return _error(403, "FORBIDDEN", "--admin-metrics-auth needs --admin-token-env")
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
