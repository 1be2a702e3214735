"""Following files that operators replace while the proxy runs: the policy, key files,
TLS certificates.

`FileWatch` follows the *directories* holding the files (watchfiles: inotify, or polling
where that is unavailable), so it sees editors that replace a file, cert-manager
rewriting a Secret, and Kubernetes ConfigMap/Secret updates, which swap a `..data`
symlink rather than writing the file. Changes within `DEBOUNCE_MS` are taken together.
The callback also runs once when the watch starts listening, so a change made while the
proxy was starting (or while a failed watch was being re-established) is not lost. The
callback decides whether anything really changed (content hash, mtime); the watch only
says "look again".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import watchfiles

log = logging.getLogger("authproxy.files")

#: Changes within this many milliseconds are taken together (an editor's save, a
#: ConfigMap swap, cert-manager writing tls.crt then tls.key).
DEBOUNCE_MS = 150
#: The watcher wakes this often when nothing changes (its first wake-up means listening).
IDLE_TIMEOUT_MS = 500

#: Called with why it was called: "started watching" or "file changed".
OnChange = Callable[[str], Awaitable[object]]


class FileWatch:
    def __init__(self, paths: Iterable[str | Path], on_change: OnChange, name: str) -> None:
        # The directories holding the paths as given: in a ConfigMap or Secret mount the
        # file is a symlink into `..data`, which an update replaces.
        self.directories = sorted({Path(p).absolute().parent for p in paths})
        self.on_change = on_change
        self.name = name
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        if self.directories and self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _watch(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            listening = False
            try:
                async for changes in watchfiles.awatch(
                    *self.directories,
                    watch_filter=None,
                    debounce=DEBOUNCE_MS,
                    step=50,
                    stop_event=self._stop,
                    recursive=True,
                    yield_on_timeout=True,  # a first (empty) yield once the watch listens
                    rust_timeout=IDLE_TIMEOUT_MS,
                ):
                    if not listening:
                        listening = True
                        await self._call("started watching")
                    elif changes:
                        await self._call("file changed")
                    delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a directory went away, the watch failed: retry
                log.warning(
                    "watching %s for %s failed (%s); retrying", self.directories, self.name, e
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _call(self, why: str) -> None:
        try:
            await self.on_change(why)
        except asyncio.CancelledError:
            raise
        except Exception:  # the callback reports its own problems; the watch goes on
            log.exception("reloading %s failed", self.name)
