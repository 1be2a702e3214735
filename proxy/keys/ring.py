"""The keys in use, kept current: every `KeySource` merged into one `KeySet`.

The ring rebuilds the set whenever a source changes (a remote fetch brought new keys, a
key file was edited, a rotated key's `retire_at` passed); the `TokenVerifier` reads
`current` before each verification and forgets tokens verified with an older set, so
a key removed at the issuer stops verifying once its set is fetched again. It answers
the verifier's "unknown kid" (`refresh_for`) by fetching the remote sets that could hold
it, throttled per source, and fails closed with KEYS_UNAVAILABLE while such a set has
never loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from authproxy.decide.reasons import Denied, Reason
from authproxy.keys.keyset import KeySet, VerificationKey
from authproxy.keys.sources import KeyFetcher, KeyFile, KeySource, RemoteJwks
from authproxy.runtime.file_watch import FileWatch

log = logging.getLogger("authproxy.keys")


class KeyRing:
    def __init__(
        self,
        sources: Sequence[KeySource],
        fetcher: KeyFetcher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`fetcher` is the HTTP client the remote sources fetch with (closed with the
        ring). Raises `KeyLoadError` when the configured keys clash (one issuer, one kid
        twice)."""
        self.sources = list(sources)
        self.remote = [s for s in self.sources if isinstance(s, RemoteJwks)]
        self.files = [s for s in self.sources if isinstance(s, KeyFile)]
        self.fetcher = fetcher
        self.clock = clock
        self.current = KeySet(self._usable())  # strict at start: a clash is a config error
        self._tasks: list[asyncio.Task[None]] = []
        self._watch = FileWatch([f.path for f in self.files], self._files_changed, "key files")
        self._retire_timer: asyncio.TimerHandle | None = None

    # --- the set -----------------------------------------------------------------------

    def _usable(self) -> list[VerificationKey]:
        now = self.clock()
        return [
            key
            for source in self.sources
            for key in source.keys
            if key.retire_at is None or key.retire_at > now
        ]

    def rebuild(self) -> None:
        """Merge the sources again into `current`. A kid one issuer uses twice
        (say, a file and a URL publish the same key) keeps its first key."""
        keys: list[VerificationKey] = []
        seen: set[tuple[str, str | None]] = set()
        for key in self._usable():
            if (key.kid, key.issuer) in seen:
                log.warning("key id %r from %s is loaded already; ignored", key.kid, key.source)
                continue
            seen.add((key.kid, key.issuer))
            keys.append(key)
        self.current = KeySet(keys)
        self._schedule_retirement()

    def _schedule_retirement(self) -> None:
        """Rebuild when the next rotated key's `retire_at` passes."""
        if self._retire_timer is not None:
            self._retire_timer.cancel()
            self._retire_timer = None
        upcoming = [k.retire_at for k in self.current if k.retire_at is not None]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not running yet: `start` schedules it
        if upcoming:
            delay = max(0.0, min(upcoming) - self.clock()) + 0.01
            self._retire_timer = loop.call_later(delay, self.rebuild)

    def published_jwks(self) -> dict[str, Any]:
        """The public JWKs of the asymmetric keys from local key files that are in use:
        what this proxy's issuer signs with, for `/.well-known/jwks.json`."""
        in_use = {id(k) for k in self.current}
        return {
            "keys": [
                dict(key.public)
                for source in self.files
                for key in source.keys
                if key.public is not None and id(key) in in_use
            ]
        }

    @property
    def ready(self) -> bool:
        """Every remote key set has loaded at least once."""
        return all(source.loaded for source in self.remote)

    # --- running -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start following the sources (first fetches happen now, in the background)."""
        self._schedule_retirement()
        self._watch.start()
        for source in self.remote:
            self._tasks.append(asyncio.create_task(self._follow(source)))

    async def wait_loaded(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every remote set's first load."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.ready:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            await asyncio.sleep(min(0.05, left))
        return True

    async def close(self) -> None:
        await self._watch.stop()
        for source in self.remote:
            source.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._retire_timer is not None:
            self._retire_timer.cancel()
        if self.fetcher is not None:
            await self.fetcher.close()

    async def _follow(self, source: RemoteJwks) -> None:
        while True:
            await source.wait_due()  # follows unknown-kid fetches made meanwhile
            if await source.fetch("scheduled"):
                self.rebuild()

    async def _files_changed(self, why: str) -> None:
        changed = False
        for source in self.files:
            changed = source.reload() or changed
        if changed:
            self.rebuild()

    # --- the verifier's question --------------------------------------------------------

    async def refresh_for(self, kid: str, claimed_issuer: str | None) -> bool:
        """A token names `kid`, which no key has: fetch the remote sets that could hold it
        (unbound ones, and the one bound to the issuer the token claims), throttled. True
        when a set changed. Raises KEYS_UNAVAILABLE when such a set has never loaded."""
        candidates = [s for s in self.remote if s.issuer in (None, claimed_issuer)]
        if not candidates:
            return False
        # Shielded: the set is rebuilt after a fetch that changed it even when the call
        # that asked goes away meanwhile.
        if await asyncio.shield(self._refetch(candidates)):
            return True
        missing = [s for s in candidates if not s.loaded]
        if missing:
            source = missing[0]
            raise Denied(
                Reason.KEYS_UNAVAILABLE,
                f"the verification keys from {source.name} are not loaded yet"
                f" ({source.last_error or 'first fetch in progress'})",
            )
        return False

    async def _refetch(self, candidates: Sequence[RemoteJwks]) -> bool:
        results = await asyncio.gather(*(s.refetch_unknown() for s in candidates))
        if any(results):
            self.rebuild()
        return any(results)
