"""Live policy edits: watch the policy file, validate a new version fully, swap it in.

The watcher follows the file's *directory* (watchfiles: inotify, or polling where that is
unavailable), so it sees editors that replace the file and Kubernetes ConfigMap updates,
which swap a `..data` symlink rather than writing the file; changes to other files there
(a log file beside the policy) are ignored (`file_watch.Followed`). SIGHUP reloads too. A new
version must parse and validate completely, name only keys the proxy has and pass its
tests (`decide/policy_tests.py`); then the `Authorizer`'s policy attribute is replaced in
one assignment, so a call keeps the version it started with. An invalid edit (a failing
test included) is never applied: the last good policy stays, the `file:line` problems
are logged and counted, and `/policy` shows the error until a good version loads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from authproxy.decide.pipeline import Authorizer
from authproxy.keys.ring import KeyRing
from authproxy.policy.loader import parse_policy, policy_version
from authproxy.policy.model import Policy
from authproxy.runtime.file_watch import FileWatch

log = logging.getLogger("authproxy.policy")

#: Called after a new policy is in place: (old, new).
OnReload = Callable[[Policy, Policy], Awaitable[None]]


class PolicyReloader:
    def __init__(
        self,
        path: str,
        authorizer: Authorizer,
        keys: KeyRing,
        check_keys: Callable[[Policy, KeyRing], None],
        text: bytes,
        listeners: Iterable[OnReload] = (),
        gate: Callable[[Policy], Awaitable[object]] | None = None,
    ) -> None:
        """`listeners` run, in order, after each new version is put in place. `gate` (the
        policy's tests) must pass too: it raises, like an invalid file, when they fail."""
        self.path = path
        self.gate = gate
        self.authorizer = authorizer
        self.keys = keys
        self.check_keys = check_keys
        self.text = text  # the active policy's file content, for `/policy`
        self.loaded_at = time.time()
        self.last_error: str | None = None
        self.results = {"ok": 0, "error": 0, "unchanged": 0}
        self.listeners = tuple(listeners)
        self._lock = asyncio.Lock()
        self._watch = FileWatch([path], self.reload, "the policy")

    async def reload(self, why: str) -> bool:
        """Load the file again; True when a new version was put in place."""
        async with self._lock:  # one reload at a time, in order
            try:
                data = Path(self.path).read_bytes()
            except OSError as e:
                return self._failed(f"{self.path}: cannot read policy: {e.strerror}", why)
            old = self.authorizer.policy
            if policy_version(data) == old.version:
                self.results["unchanged"] += 1
                self.text = data
                self.last_error = None  # the file holds the active version again
                return False
            try:
                policy = parse_policy(data, self.path)
                self.check_keys(policy, self.keys)  # keys the policy names must exist
                if self.gate is not None:
                    await self.gate(policy)
            except Exception as e:  # PolicyError (a test failed too), or the key check's error
                return self._failed(str(e), why)
            self.authorizer.policy = policy
            self.text = data
            self.loaded_at = time.time()
            self.last_error = None
            self.results["ok"] += 1
            log.info(
                "policy reloaded (%s): version %s -> %s, %d rules",
                why,
                old.version,
                policy.version,
                policy.rule_count,
            )
            for listener in self.listeners:
                await listener(old, policy)
            return True

    def _failed(self, problem: str, why: str) -> bool:
        self.last_error = problem
        self.results["error"] += 1
        log.error(
            "policy reload (%s) refused; still serving version %s:\n%s",
            why,
            self.authorizer.policy.version,
            problem,
        )
        return False

    def start(self) -> None:
        self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()
