"""In-memory state kept in a file (`--state-file PATH`): one proxy without Redis keeps its
revocations and single-use records across restarts.

The file (JSON, written only by the proxy):

    {"version": 1,
     "tokens":   {"<jti>": <exp>, ...},
     "subjects": {"<sub>": [<before>, <expires>], ...},
     "used":     {"<jti>": <until>, ...}}

- Every write is atomic: a temporary file in the same directory, fsync, `os.replace`,
  fsync of the directory. A reader (or a crash) sees the old file or the new one.
- A revocation is on disk before `revoke_token` / `revoke_subject` return, so before the
  admin API answers 201. If it cannot be written, the revocation still applies in memory
  and the call raises `StateUnavailable` (the admin API answers 503: not durable).
- A single-use record is written within `USE_FLUSH_DELAY` (batched: uses are on the hot
  path), and on a clean shutdown. A crash in that delay forgets the uses of its last
  moments: such a refresh token could be presented once more.
- At start the file is read (only unexpired entries are kept) and written back pruned,
  so an unreadable, malformed or unwritable file stops the start with an error naming it
  (`StateFileError`), never a silent empty state. A missing file is a first start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from authproxy.state.atomic_file import write_atomically
from authproxy.state.store import (
    DEFAULT_SUBJECT_TTL,
    EXPIRY_GRACE,
    MemoryState,
    Revocation,
    StateUnavailable,
)

log = logging.getLogger("authproxy.state")

VERSION = 1
#: Longest delay before a recorded use is on disk (seconds).
USE_FLUSH_DELAY = 0.5


class StateFileError(Exception):
    """The state file cannot be read, parsed or written at start (the message names it)."""


class FileState(MemoryState):
    """`MemoryState` that loads its records from `path` and writes them back on change."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        subject_ttl: float = DEFAULT_SUBJECT_TTL,
        clock: Callable[[], float] = time.time,
        flush_delay: float = USE_FLUSH_DELAY,
    ) -> None:
        """Read the file and write it back pruned; StateFileError when either fails."""
        super().__init__(subject_ttl, clock)
        self.path = Path(path)
        self.flush_delay = flush_delay
        self.failures_total = 0
        self._changes = 0  # bumped by every change
        self._saved = 0  # the value of `_changes` the file holds
        self._lock = asyncio.Lock()
        self._flush: asyncio.Task[None] | None = None
        # One thread writes, in the order the snapshots were taken, even when a caller
        # waiting for its write is cancelled: an older picture never replaces a newer one.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="state-file")
        self._read()
        try:
            write_atomically(self.path, self._dump())
        except OSError as e:
            raise StateFileError(f"--state-file {self.path}: cannot write it: {e}") from None

    # --- changes ------------------------------------------------------------------------

    async def revoke_token(self, jti: str, exp: float) -> None:
        await super().revoke_token(jti, exp)
        self._changes += 1
        await self._save()

    async def revoke_subject(self, sub: str, before: float) -> None:
        await super().revoke_subject(sub, before)
        self._changes += 1
        await self._save()

    async def first_use(self, jti: str, exp: float) -> bool:
        first = await super().first_use(jti, exp)
        if first:
            self._changes += 1
            if self._flush is None or self._flush.done():
                self._flush = asyncio.create_task(self._flush_later())
        return first

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush
        with contextlib.suppress(StateUnavailable):  # logged and counted by `_save`
            await self._save()
        self._writer.shutdown(wait=False)
        await super().close()

    # --- the file -----------------------------------------------------------------------

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_delay)
        with contextlib.suppress(StateUnavailable):  # the next change or close tries again
            await self._save()

    async def _save(self) -> None:
        """Write the file unless a write that began after the last change did already."""
        async with self._lock:
            if self._saved >= self._changes:
                return
            upto = self._changes
            data = self._dump()  # taken under the lock, in the loop: one consistent picture
            try:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._writer, write_atomically, self.path, data)
            except OSError as e:
                self.failures_total += 1
                log.error("--state-file %s: cannot write it: %s", self.path, e)
                raise StateUnavailable(
                    f"applied in memory, but not saved to {self.path}: lost on restart"
                ) from None
            self._saved = upto

    def _dump(self) -> bytes:
        now = self.clock()
        view = self.view
        data = {
            "version": VERSION,
            "tokens": {j: e for j, e in view.tokens.items() if e + EXPIRY_GRACE > now},
            "subjects": {s: [b, e] for s, (b, e) in view.subjects.items() if e > now},
            "used": {j: u for j, u in self._used.items() if u > now},
        }
        return json.dumps(data, separators=(",", ":")).encode()

    def _read(self) -> None:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            log.info("--state-file %s does not exist yet: starting with no revocations", self.path)
            return
        except OSError as e:
            raise StateFileError(f"--state-file {self.path}: cannot read it: {e}") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError(f"expected a JSON object with version {VERSION}")
            tokens = {str(j): _number(e) for j, e in _mapping(data, "tokens").items()}
            subjects = {str(s): _pair(v) for s, v in _mapping(data, "subjects").items()}
            used = {str(j): _number(u) for j, u in _mapping(data, "used").items()}
        except (ValueError, UnicodeDecodeError) as e:
            raise StateFileError(
                f"--state-file {self.path}: not a state file this proxy can read ({e});"
                " restore it, or remove it to start with no revocations"
            ) from None
        now = self.clock()
        revocations = [Revocation(jti=j, expires=e) for j, e in tokens.items()]
        revocations += [Revocation(sub=s, before=b, expires=e) for s, (b, e) in subjects.items()]
        kept = [r for r in revocations if r.until > now]
        self.view.merge(kept)
        self._used = {j: u for j, u in used.items() if u > now}
        log.info(
            "--state-file %s: loaded %d revocations and %d single-use records (%d expired dropped)",
            self.path,
            len(kept),
            len(self._used),
            len(revocations) - len(kept) + len(used) - len(self._used),
        )


def _mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{key!r} is not an object")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a time")
    return float(value)


def _pair(value: Any) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{value!r} is not [before, expires]")
    return _number(value[0]), _number(value[1])
