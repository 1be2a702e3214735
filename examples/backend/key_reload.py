"""Following the signing key file: after `authproxy keygen --rotate` replaces the PEM, new
access and 2FA tokens are signed with the new key (its kid in the header).

The file is watched with the proxy's `FileWatch` (its directory, so editors' renames and
Kubernetes Secret updates count). A file whose bytes changed is loaded; if it is not a
usable private key (half-written, wrong format, gone), the backend keeps signing with the
key it has and logs one error line for that content. The issuer's key table is replaced
in one assignment, so a token is signed with the old key or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from authproxy.keys.issuer import SigningKey, TokenIssuer, load_signing_key
from authproxy.keys.keyset import KeyLoadError
from authproxy.runtime.file_watch import FileWatch

log = logging.getLogger("examples.backend.keys")


class SigningKeyReload:
    """Swaps the key `issuer` signs with wherever it uses `current` (access and 2FA)."""

    def __init__(self, issuer: TokenIssuer, path: str | Path, current: SigningKey) -> None:
        self.issuer = issuer
        self.path = Path(path)
        self.current = current
        self.reloads = 0  # keys swapped in
        self.errors = 0  # contents refused
        self._seen: bytes | None = None  # digest of the content last looked at
        self._watch = FileWatch([self.path], self._changed, "the signing key")

    def start(self) -> None:
        self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()

    async def _changed(self, why: str) -> None:
        self.check()

    def check(self) -> SigningKey:
        """Load the file if its content changed; returns the key now signing."""
        try:
            data = self.path.read_bytes()
        except OSError as e:
            self._refuse(f"missing:{e.strerror}".encode(), f"cannot read it: {e.strerror}")
            return self.current
        digest = hashlib.sha256(data).digest()
        if digest == self._seen:
            return self.current
        try:
            key = load_signing_key(self.path)
        except KeyLoadError as e:
            self._refuse(digest, str(e))
            return self.current
        self._seen = digest
        if (key.kid, key.alg) == (self.current.kid, self.current.alg):
            return self.current  # the same key (the file was rewritten, or this is startup)
        old = self.current
        keys = {level: key if k is old else k for level, k in self.issuer.keys.items()}
        self.issuer.keys = keys  # one assignment: mint() reads the table once per token
        self.current = key
        self.reloads += 1
        log.info("signing key %s reloaded: now kid %s (was %s)", self.path, key.kid, old.kid)
        return key

    def _refuse(self, digest: bytes, problem: str) -> None:
        if digest == self._seen:
            return  # reported already
        self._seen = digest
        self.errors += 1
        log.error(
            "signing key %s not reloaded: %s; still signing with kid %s",
            self.path,
            problem,
            self.current.kid,
        )
