"""A fake identity provider for the remote-key tests: a real aiohttp server on 127.0.0.1
(plain HTTP, or TLS with a certificate from `tests/support/certs.py`) serving OpenID Connect
discovery (`/.well-known/openid-configuration`) and its key set (`/jwks.json`).

Everything is settable while it runs: the published keys (EC P-256 or RSA, generated
here; `token()` signs with them), extra raw JWKs, the `Cache-Control` header, the issuer
the discovery document names, and a `mode` for how `/jwks.json` misbehaves:

    ok            the key set
    down          every path answers 503
    garbage       200 with a body that is not JSON
    not-jwks      200 with JSON that is not a key set
    slow          the key set, after waiting longer than any test's fetch timeout
    held          the key set once the test sets `release` (`holding` is set on arrival)
    huge          200 with a body of `huge_bytes`, Content-Length announced
    huge-chunked  the same without Content-Length (chunked transfer encoding)
    chunked       the key set, sent in several chunks with pauses between them
    redirect      302 to `/moved/jwks.json`, which serves a different, valid key set

Every request is counted per path, with its (monotonic) time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

from authproxy.keys.keygen import generate_private_key
from authproxy.keys.keyset import public_jwk

DISCOVERY = "/.well-known/openid-configuration"
JWKS = "/jwks.json"
MOVED = "/moved/jwks.json"
MODES = (
    "ok", "down", "garbage", "not-jwks", "slow", "held", "huge", "huge-chunked", "chunked",
    "redirect",
)  # fmt: skip
ALG_OF = {"EC": "ES256", "RSA": "RS256"}


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        return {**public_jwk(self.private.public_key()), "kid": self.kid, "use": "sig"}


@dataclass
class FakeIdp:
    #: Server TLS (a context with the certificate loaded); None serves plain HTTP.
    tls: ssl.SSLContext | None = None
    #: The key set's members: kid -> signing key (see `add_key`).
    keys: dict[str, SigningKey] = field(default_factory=dict)
    #: Raw JWKs published after the keys (say, one with private members).
    extra: list[dict[str, Any]] = field(default_factory=list)
    cache_control: str | None = None
    mode: str = "ok"
    #: The `issuer` the discovery document names; None: the real one.
    discovery_issuer: str | None = None
    #: How long "slow" waits before answering.
    slow_seconds: float = 5.0
    huge_bytes: int = 256 * 1024
    hits: Counter[str] = field(default_factory=Counter)
    #: (monotonic time, path) of every request, in order.
    log: list[tuple[float, str]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        #: "held": set when a key-set request arrives; the answer waits for `release`.
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> FakeIdp:
        app = web.Application()
        app.router.add_get(DISCOVERY, self._discovery)
        app.router.add_get(JWKS, self._jwks)
        app.router.add_get(MOVED, self._moved)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock, ssl_context=self.tls)
        await site.start()
        return self

    async def close(self) -> None:
        self._closing.set()  # release "slow" answers
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def issuer(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def jwks_url(self) -> str:
        return self.issuer + JWKS

    @property
    def discovery_url(self) -> str:
        return self.issuer + DISCOVERY

    # --- keys and tokens --------------------------------------------------------------

    def add_key(self, kid: str, kty: str = "EC") -> SigningKey:
        """Generate a key (EC P-256 or RSA 2048) and publish it under `kid`."""
        alg = ALG_OF[kty]
        key = SigningKey(kid, alg, generate_private_key(alg))
        self.keys[kid] = key
        return key

    def remove_key(self, kid: str) -> SigningKey:
        return self.keys.pop(kid)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.jwk() for key in self.keys.values()] + list(self.extra)}

    def token(self, kid: str, key: SigningKey | None = None, **claims: Any) -> str:
        """An access token signed by `key` (default: the published key `kid`) with a `kid`
        header; claims default to a valid access token of this issuer (None removes one)."""
        signer = key or self.keys[kid]
        return sign(signer, kid, self.issuer, **claims)

    # --- counting ---------------------------------------------------------------------

    def times(self, path: str = JWKS) -> list[float]:
        return [t for t, p in self.log if p == path]

    def since_last(self, path: str = JWKS) -> float:
        """Seconds since the last request to `path` (infinity: none yet)."""
        times = self.times(path)
        return time.monotonic() - times[-1] if times else float("inf")

    def _count(self, request: web.Request) -> None:
        self.hits[request.path] += 1
        self.log.append((time.monotonic(), request.path))

    # --- handlers ---------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.cache_control is not None:
            headers["cache-control"] = self.cache_control
        return headers

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        if self.mode == "down":
            return web.Response(status=503, text="maintenance")
        doc = {
            "issuer": self.discovery_issuer or self.issuer,
            "jwks_uri": self.jwks_url,
            "id_token_signing_alg_values_supported": ["ES256", "RS256"],
        }
        return web.json_response(doc)

    async def _moved(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        other = SigningKey("moved", "ES256", generate_private_key("ES256"))
        return web.json_response({"keys": [other.jwk()]})

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        mode = self.mode
        assert mode in MODES, mode
        body = json.dumps(self.jwks()).encode()
        if mode == "down":
            return web.Response(status=503, text="maintenance")
        if mode == "garbage":
            return web.Response(body=b'{"keys": [{"kty": "EC", ', headers=self._headers())
        if mode == "not-jwks":
            return web.Response(body=b'{"hello": ["world"]}', headers=self._headers())
        if mode == "redirect":
            raise web.HTTPFound(MOVED)
        if mode == "slow":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.slow_seconds)
        if mode == "held":
            self.holding.set()
            await self.release.wait()
        if mode == "huge":
            filler = b" " * self.huge_bytes  # whitespace: the body would even parse
            return web.Response(body=body[:-1] + filler + b"}", headers=self._headers())
        if mode in ("huge-chunked", "chunked"):
            if mode == "huge-chunked":
                body = body[:-1] + b" " * self.huge_bytes + b"}"
            return await self._trickle(request, body)
        return web.Response(body=body, headers=self._headers())

    async def _trickle(self, request: web.Request, body: bytes) -> web.StreamResponse:
        """`body` in chunked transfer encoding, a few pieces with pauses between."""
        response = web.StreamResponse(headers=self._headers())
        response.enable_chunked_encoding()
        await response.prepare(request)
        pieces = 4
        step = -(-len(body) // pieces)
        try:
            for i in range(0, len(body), step):
                await response.write(body[i : i + step])
                await asyncio.sleep(0.05)
            await response.write_eof()
        except ConnectionResetError:  # the client hung up (say, the answer was too large)
            pass
        return response


def sign(key: SigningKey, kid: str, issuer: str, **claims: Any) -> str:
    """An access token (policy: type access, audience api-access) signed by `key`, with
    `kid` in its header and `iss` = `issuer` unless overridden."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": "alice",
        "type": "access",
        "aud": "api-access",
        "iss": issuer,
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,  # every token differs: none is served from a cache
    }
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key.private, algorithm=key.alg, headers={"kid": kid})


def server_tls(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context
