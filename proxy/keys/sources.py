"""Where verification keys come from, and keeping each source current.

* `KeyFile` — a JWKS file or a PEM public key. Loaded strictly at start (a bad file stops
  the proxy with one clear line); reloaded when the file changes (`keys/ring.py` watches
  it), and a bad edit then keeps the last good keys.
* `SecretKeys` — HMAC secrets from environment variables; loaded once.
* `RemoteJwks` — a JWKS URL (`--jwks https://...`, `--issuer-jwks ISSUER=URL`), fetched
  with aiohttp. Cached for the response's `Cache-Control: max-age`, clamped to
  `[cache_min, cache_max]`, and fetched again in the background when that runs out. A
  token naming an unknown `kid` asks for one immediate fetch, at most once per
  `refetch_interval` (a storm of made-up kids costs the identity provider one request
  per interval; the kids stay unknown meanwhile). A failed fetch (down, slow, not 200,
  too large, not a JWKS) keeps the last good keys, is logged and counted, and is retried
  with backoff (1 s doubling, up to `cache_min`).
* `OidcJwks` — `--oidc-issuer URL`: OpenID Connect discovery
  (`URL/.well-known/openid-configuration`) names the `jwks_uri`; the document's `issuer`
  must be exactly the configured one. Its keys verify only tokens of that issuer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from authproxy.keys.jsonstrict import loads_strict
from authproxy.keys.keyset import (
    KeyLoadError,
    VerificationKey,
    keys_from_jwks,
    load_hmac_env,
    load_pem_public_key,
)

log = logging.getLogger("authproxy.keys")

_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|[,\s])(?:no-cache|no-store)(?:$|[,\s])", re.IGNORECASE)


@dataclass(frozen=True)
class FetchSettings:
    """How remote key sets are fetched and cached (the `--jwks-*` flags)."""

    timeout: float = 5.0
    #: Without `Cache-Control: max-age`, a fetched set is used this long.
    cache_default: float = 300.0
    cache_min: float = 60.0
    cache_max: float = 86_400.0
    #: An unknown `kid` triggers a fetch at most once per this many seconds per source.
    refetch_interval: float = 30.0
    max_bytes: int = 1024 * 1024


class FetchError(Exception):
    """A fetch that produced no usable key set; the message says why."""


class KeyFetcher:
    """The HTTP client every remote key set fetches with: one connection pool (made on
    first use, which needs a running event loop), TLS verified against the system roots
    or only `ssl_context`'s CAs. Built with the sources; the `KeyRing` closes it."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.ssl_context or True, limit=8)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def ssl_context_for(ca_file: str | None) -> ssl.SSLContext | None:
    """The TLS context for fetching keys: the system roots, or only `ca_file`'s CAs."""
    if ca_file is None:
        return None
    context = ssl.create_default_context(cafile=ca_file)
    with contextlib.suppress(AttributeError):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class KeySource:
    """One origin of keys. `keys` is the last good set; `results` counts loads."""

    def __init__(self, name: str, issuer: str | None) -> None:
        self.name = name
        self.issuer = issuer
        self.keys: list[VerificationKey] = []
        #: When the current keys were loaded (None: never).
        self.loaded_at: float | None = None
        self.last_error: str | None = None
        self.results: dict[str, int] = {}

    def _count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1

    @property
    def loaded(self) -> bool:
        return self.loaded_at is not None


class SecretKeys(KeySource):
    def __init__(self, env: str, kid: str | None) -> None:
        super().__init__(f"${env}", None)
        self.keys = [load_hmac_env(env, kid)]
        self.loaded_at = time.time()


class KeyFile(KeySource):
    """A JWKS file, or a PEM public key (`pem_kid` set, possibly to None for the
    thumbprint: `pem=True`)."""

    def __init__(
        self, path: str, issuer: str | None = None, pem: bool = False, pem_kid: str | None = None
    ) -> None:
        super().__init__(path, issuer)
        self.path = path
        self.pem = pem
        self.pem_kid = pem_kid
        self.keys, self._digest = self._read()  # strict: KeyLoadError stops the start
        self.loaded_at = time.time()

    def _read(self) -> tuple[list[VerificationKey], bytes]:
        try:
            data = Path(self.path).read_bytes()
        except OSError as e:
            kind = "PEM key" if self.pem else "JWKS"
            raise KeyLoadError(f"{self.path}: cannot read {kind}: {e.strerror}") from None
        if self.pem:
            return [load_pem_public_key(self.path, self.pem_kid, self.issuer)], _digest(data)
        return keys_from_jwks(data, self.path, self.issuer, strict=True), _digest(data)

    def reload(self) -> bool:
        """Read the file again; True when its keys changed. A bad file keeps the last
        good keys (logged and counted)."""
        try:
            keys, digest = self._read()
        except KeyLoadError as e:
            self.last_error = str(e)
            self._count("error")
            log.error("key file reload refused; still using the previous keys: %s", e)
            return False
        if digest == self._digest:
            self._count("unchanged")
            return False
        self.keys, self._digest = keys, digest
        self.loaded_at = time.time()
        self.last_error = None
        self._count("ok")
        log.info("key file %s reloaded: %s", self.path, ", ".join(k.kid for k in keys))
        return True


class RemoteJwks(KeySource):
    def __init__(
        self,
        url: str,
        issuer: str | None,
        settings: FetchSettings,
        fetcher: KeyFetcher,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(url, issuer)
        self.url = url
        self.settings = settings
        self.fetcher = fetcher
        self.clock = clock
        self._digest = b""
        self._fresh_until = 0.0  # clock(): when the cached set should be fetched again
        self._last_attempt: float | None = None
        self._failures = 0
        self._inflight: asyncio.Task[bool] | None = None
        #: Set when `_fresh_until` moves (any fetch ended), to wake `wait_due`.
        self._rescheduled = asyncio.Event()

    # --- when to fetch --------------------------------------------------------------------

    def due_in(self) -> float:
        """Seconds until the next background fetch."""
        if self._last_attempt is None:
            return 0.0
        return max(0.0, self._fresh_until - self.clock())

    async def wait_due(self) -> None:
        """Return once the next background fetch is due. A fetch made meanwhile (for an
        unknown kid) moves that time, a failed one closer (the backoff): the wait follows."""
        while (delay := self.due_in()) > 0:
            self._rescheduled.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._rescheduled.wait()

    async def refetch_unknown(self) -> bool:
        """A token names a kid this set lacks: fetch now unless one was made within
        `refetch_interval` (then the kid stays unknown: a negative result is cached)."""
        last = self._last_attempt
        recent = last is not None and self.clock() - last < self.settings.refetch_interval
        if self._inflight is None and recent:
            self._count("throttled")
            return False
        return await self.fetch("unknown kid")

    # --- fetching ------------------------------------------------------------------------

    async def fetch(self, why: str) -> bool:
        """Fetch now (one fetch at a time: concurrent callers share it); True when the keys
        changed."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch(why))
            self._inflight.add_done_callback(self._fetched)
        return await asyncio.shield(self._inflight)

    def _fetched(self, task: asyncio.Task[bool]) -> None:
        self._inflight = None

    def cancel(self) -> None:
        """Stop a fetch in progress (the proxy is stopping)."""
        if self._inflight is not None:
            self._inflight.cancel()

    async def _fetch(self, why: str) -> bool:
        self._last_attempt = self.clock()
        try:
            url = await self.jwks_url()
            data, max_age = await self._get(url)
            digest = _digest(data)
            if digest == self._digest:
                self._succeeded(max_age)
                self._count("unchanged")
                return False
            try:
                keys = keys_from_jwks(data, url, self.issuer, strict=False)
            except KeyLoadError as e:
                raise FetchError(str(e)) from None
        except asyncio.CancelledError:
            raise
        except FetchError as e:
            self._failed(str(e), why)
            return False
        except Exception as e:  # a bug must not stop the refresh loop; counted as an error
            log.exception("fetching keys from %s failed", self.name)
            self._failed(f"{type(e).__name__}: {e}", why)
            return False
        old = {k.kid for k in self.keys}
        self.keys, self._digest = keys, digest
        self._succeeded(max_age)
        self._count("ok")
        new = {k.kid for k in keys}
        log.info(
            "keys from %s loaded (%s): %d keys%s%s",
            self.name,
            why,
            len(keys),
            f"; added {', '.join(sorted(new - old))}" if new - old else "",
            f"; removed {', '.join(sorted(old - new))}" if old - new and old else "",
        )
        return True

    def _succeeded(self, max_age: float | None) -> None:
        s = self.settings
        life = s.cache_default if max_age is None else max_age
        life = min(max(life, s.cache_min), s.cache_max)
        self._fresh_until = self.clock() + life
        self._rescheduled.set()
        self.loaded_at = time.time()
        if self._failures:
            log.info("keys from %s are available again", self.name)
        self._failures = 0
        self.last_error = None

    def _failed(self, problem: str, why: str) -> None:
        self._failures += 1
        self.last_error = problem
        self._count("error")
        backoff = min(2.0 ** (self._failures - 1), self.settings.cache_min)
        backoff *= random.uniform(0.9, 1.1)  # replicas do not retry in step
        self._fresh_until = self.clock() + backoff
        self._rescheduled.set()
        kept = f"keeping the {len(self.keys)} keys loaded before" if self.loaded else "no keys yet"
        log.warning(
            "fetching keys from %s failed (%s): %s; %s; retrying in %.1fs",
            self.name,
            why,
            problem,
            kept,
            backoff,
        )

    async def jwks_url(self) -> str:
        return self.url

    async def _get(self, url: str) -> tuple[bytes, float | None]:
        """The body of a 200 answer and its max-age; FetchError otherwise."""
        limit = self.settings.max_bytes
        try:
            async with self.fetcher.session().get(
                url,
                allow_redirects=False,
                headers={"accept": "application/json, application/jwk-set+json"},
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            ) as response:
                if response.status != 200:
                    raise FetchError(f"{url} answered HTTP {response.status}")
                if response.content_length is not None and response.content_length > limit:
                    raise FetchError(f"{url}: the answer is larger than {limit} bytes")
                # `read(n)` returns what has arrived so far, not n bytes: read to the end.
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        raise FetchError(f"{url}: the answer is larger than {limit} bytes")
                    chunks.append(chunk)
                return b"".join(chunks), _max_age(response.headers.get("cache-control"))
        except TimeoutError:
            raise FetchError(f"{url}: no answer within {self.settings.timeout:g}s") from None
        except aiohttp.ClientError as e:
            raise FetchError(f"{url}: {type(e).__name__}: {e}") from None


class OidcJwks(RemoteJwks):
    """The key set an OpenID Connect issuer's discovery document names."""

    def __init__(
        self,
        issuer: str,
        settings: FetchSettings,
        fetcher: KeyFetcher,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(discovery_url(issuer), issuer, settings, fetcher, clock)
        self._jwks_uri: str | None = None

    async def jwks_url(self) -> str:
        """The `jwks_uri`, discovered again after any failure (it may have moved)."""
        if self._jwks_uri is None or self._failures:
            self._jwks_uri = await self._discover()
        return self._jwks_uri

    async def _discover(self) -> str:
        data, _ = await self._get(self.url)
        try:
            doc = loads_strict(data)
        except ValueError as e:
            raise FetchError(f"{self.url}: not a valid JSON document: {e}") from None
        if not isinstance(doc, dict):
            raise FetchError(f"{self.url}: the discovery document is not a JSON object")
        if doc.get("issuer") != self.issuer:
            raise FetchError(
                f"{self.url}: the discovery document names issuer {str(doc.get('issuer'))[:128]!r},"
                f" not {self.issuer!r} (OpenID Connect Discovery 4.3)"
            )
        uri = doc.get("jwks_uri")
        scheme = "http://" if self.issuer.startswith("http://") else "https://"
        if not isinstance(uri, str) or not uri.startswith(("https://", scheme)):
            raise FetchError(f"{self.url}: 'jwks_uri' must be an {scheme.rstrip(':/')} URL")
        return uri


def discovery_url(issuer: str) -> str:
    """OpenID Connect Discovery 4: the issuer with `/.well-known/openid-configuration`."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def _max_age(cache_control: str | None) -> float | None:
    if not cache_control:
        return None
    if _NO_CACHE.search(cache_control):
        return 0.0
    m = _MAX_AGE.search(cache_control)
    return float(m.group(1)) if m else None


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
