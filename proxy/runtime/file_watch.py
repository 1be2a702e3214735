"""Following files that operators replace while the proxy runs: the policy, key files,
TLS certificates.

`FileWatch` follows the *directories* holding the files (watchfiles: inotify, or polling
where that is unavailable), so it sees editors that replace a file, cert-manager
rewriting a Secret, and Kubernetes ConfigMap/Secret updates, which swap a `..data`
symlink rather than writing the file. Only changes to the followed files count
(`Followed`): other files in those directories, such as a log file written beside the
policy, neither wake the callback nor log anything. Changes within `DEBOUNCE_MS` are
taken together.
The callback also runs once when the watch starts listening, so a change made while the
proxy was starting (or while a failed watch was being re-established) is not lost. The
callback decides whether anything really changed (content hash, mtime); the watch only
says "look again".
"""

from __future__ import annotations

import asyncio
import logging
import os
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


class Followed:
    """The watch filter: True for a change to a followed file, or to what it points at.

    A change counts when its path is a followed file (as given, or its symlink target
    within a watched directory) or lies under a `..`-named entry of a watched directory:
    kubelet's atomic writer keeps a ConfigMap's or Secret's files in `..<timestamp>/`
    and swaps the `..data` symlink on an update. Anything else (a log file, an editor's
    swap file) is ignored. Until the watch has `listening` set, every change counts, so
    the watch's first wake-up comes even while other files in the directory keep
    changing."""

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self.paths = [os.path.abspath(p) for p in paths]
        self.directories = sorted({os.path.dirname(p) for p in self.paths})
        self.listening = False

    def __call__(self, change: watchfiles.Change, path: str) -> bool:
        path = os.path.abspath(path)
        if not self.listening or path in self.paths:
            return True
        for directory in self.directories:
            inside = path.removeprefix(directory + os.sep)
            if inside != path and inside.startswith(".."):
                return True
        return path in {os.path.realpath(p) for p in self.paths}


class FileWatch:
    def __init__(self, paths: Iterable[str | Path], on_change: OnChange, name: str) -> None:
        # The directories holding the paths as given: in a ConfigMap or Secret mount the
        # file is a symlink into `..data`, which an update replaces.
        self.followed = Followed(paths)
        self.directories = sorted({Path(d) for d in self.followed.directories})
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
            listening = self.followed.listening = False
            try:
                async for changes in watchfiles.awatch(
                    *self.directories,
                    watch_filter=self.followed,
                    debounce=DEBOUNCE_MS,
                    step=50,
                    stop_event=self._stop,
                    recursive=True,
                    yield_on_timeout=True,  # a first (empty) yield once the watch listens
                    rust_timeout=IDLE_TIMEOUT_MS,
                ):
                    if not listening:
                        listening = self.followed.listening = True
                        await self._call("started watching")
                    elif changes:
                        changed = ", ".join(sorted({path for _, path in changes}))
                        log.debug("%s: %s changed", self.name, changed)
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
