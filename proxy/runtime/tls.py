"""TLS for the sidecar: the listener's certificate (and client certificates for mTLS), the
backend connections' trust roots and client certificate, and reloads when the files
change (the client certificate's identity: `sidecar/peer_identity.py`).

Every file is read and checked before it is used (`runtime/tls_files.py`); the `ssl.SSLContext`s
(`runtime/tls_context.py`) are then built from the certificates and key re-encoded as plain PEM,
exactly what was checked.

Reloads. The files are watched (`FileWatch`: Secret `..data` symlink swaps, cert-manager
rewrites); a new set is used only when it is complete and consistent — a key that does
not (yet) match its certificate is logged and counted, and the previous set keeps
serving. The listener then hands each new TLS handshake the new context, while
established connections keep theirs (nothing is dropped). On the backend side
(`UpstreamTls`) new connections use the new set; `UpstreamPool` retires the open ones,
whose calls finish on them.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from authproxy.runtime.file_watch import FileWatch, OnChange
from authproxy.runtime.tls_context import client_context, server_context
from authproxy.runtime.tls_files import (
    KeyPair,
    TlsError,
    describe,
    files_digest,
    key_pair,
    read_pem,
    roots_pem,
    warn_validity,
)

log = logging.getLogger("authproxy.tls")


class _Reloading:
    """What both sides share: the files as flag -> path, reading them all, and the
    bookkeeping that makes a reload happen once per distinct content."""

    what = "TLS files"

    def __init__(self, files: dict[str, str | None]) -> None:
        self._files = {flag: path for flag, path in files.items() if path is not None}
        self.reloads = {"ok": 0, "error": 0}
        self._loaded_digest = b""
        self._rejected: bytes | None = None
        self._lock = threading.Lock()
        self._watch: FileWatch | None = None

    @property
    def paths(self) -> list[str]:
        return list(self._files.values())

    def _read_all(self) -> dict[str, bytes]:
        return {flag: read_pem(flag, path) for flag, path in self._files.items()}

    def _load(self, raw: dict[str, bytes]) -> None:  # checks raw, installs it or raises
        raise NotImplementedError

    def _first_load(self) -> None:
        raw = self._read_all()
        self._load(raw)
        self._loaded_digest = files_digest(raw.values())

    def _reload(self) -> bool:
        """Read the files; load them when they differ from the loaded set. A bad set is
        logged and counted once (per content), and the loaded set stays."""
        with self._lock:  # a watch callback and a direct call never interleave
            try:
                raw = self._read_all()
                digest = files_digest(raw.values())
            except TlsError as e:
                raw, digest = None, files_digest((str(e).encode(),))
                problem: TlsError | None = e
            else:
                if digest == self._loaded_digest:
                    self._rejected = None  # back to the loaded set: a later bad set is news
                    return False
                problem = None
            if digest == self._rejected:
                return False  # already reported
            if raw is not None:
                try:
                    self._load(raw)
                except TlsError as e:
                    problem = e
            if problem is not None:
                self._rejected = digest
                self.reloads["error"] += 1
                log.error("%s; still using the previously loaded %s", problem, self.what)
                return False
            self._loaded_digest = digest
            self._rejected = None
            self.reloads["ok"] += 1
            return True

    def watch(self, on_change: OnChange) -> None:
        """Follow the files (needs a running event loop): `on_change` runs when they may
        have changed; `stop` ends it."""
        if self._watch is None and self._files:
            self._watch = FileWatch(self.paths, on_change, self.what)
            self._watch.start()

    async def stop(self) -> None:
        if self._watch is not None:
            await self._watch.stop()
            self._watch = None


def _ssl_context(build) -> ssl.SSLContext:
    try:
        return build()
    except ssl.SSLError as e:
        raise TlsError(f"the TLS files cannot be used: {e}") from None


# -- the listener -----------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTlsFiles:
    cert: str  # --tls-cert, PEM chain (leaf first)
    key: str  # --tls-key, PEM private key (unencrypted)
    client_ca: str | None = None  # --tls-client-ca: require and verify client certs (mTLS)


class ServerTls(_Reloading):
    """The listener's TLS: certificate, key and (mTLS) the client CA, reloaded on change."""

    what = "server certificate"

    def __init__(self, files: ServerTlsFiles) -> None:
        super().__init__(
            {"--tls-cert": files.cert, "--tls-key": files.key, "--tls-client-ca": files.client_ca}
        )
        self.files = files
        self.requires_client_cert = files.client_ca is not None
        self._pair: KeyPair | None = None
        self._first_load()
        log.info("TLS listener: %s", describe(self.leaf))

    def _load(self, raw: dict[str, bytes]) -> None:
        f = self.files
        pair = key_pair(
            "--tls-cert", f.cert, raw["--tls-cert"], "--tls-key", f.key, raw["--tls-key"]
        )
        roots = None
        if f.client_ca is not None:
            roots = roots_pem("--tls-client-ca", f.client_ca, raw["--tls-client-ca"])
        warn_validity("--tls-cert", f.cert, pair.leaf)
        context = _ssl_context(lambda: server_context(pair.chain_pem, pair.key_pem, roots))
        context.sni_callback = self._switch
        self._pair = pair
        #: The listener's context; a reload replaces it for new handshakes.
        self.context = context

    def _switch(self, connection: ssl.SSLObject, _name: str | None, context: ssl.SSLContext):
        """Every handshake starts on the listener's first context; hand it the current one
        (so a reloaded certificate and client CA apply to new connections)."""
        if context is not self.context:
            connection.context = self.context

    @property
    def leaf(self) -> x509.Certificate:
        assert self._pair is not None
        return self._pair.leaf

    @property
    def not_after(self) -> float:
        """The serving leaf certificate's notAfter, as unix time."""
        return self.leaf.not_valid_after_utc.timestamp()

    def check(self) -> bool:
        """Re-read the files; True when a new (valid) set was loaded and is now used for
        new connections."""
        if not self._reload():
            return False
        log.info(
            "TLS listener: reloaded the certificate; new connections get %s",
            describe(self.leaf),
        )
        return True

    def start(self) -> None:
        """Follow the files (needs a running event loop)."""

        async def on_change(_why: str) -> None:
            self.check()

        self.watch(on_change)


# -- the backend connection --------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamTlsFiles:
    #: --upstream-ca. None: the system's trust store (`_system_roots`).
    ca: str | None = None
    cert: str | None = None  # --upstream-cert: client certificate for upstream mTLS
    key: str | None = None  # --upstream-key
    server_name: str | None = None  # --upstream-server-name: the name the backend's cert has


class UpstreamTls(_Reloading):
    """TLS to the backend: trust roots, optional client certificate, the name to verify."""

    what = "upstream TLS files"

    def __init__(self, files: UpstreamTlsFiles) -> None:
        if (files.cert is None) != (files.key is None):
            given, missing = (
                ("--upstream-cert", "--upstream-key")
                if files.key is None
                else ("--upstream-key", "--upstream-cert")
            )
            path = files.cert if files.key is None else files.key
            raise TlsError(
                f"{given} {path}: needs {missing} too (a client certificate and its key)"
            )
        name = files.server_name
        if name is not None and (not name or any(c.isspace() or c in "/:@" for c in name)):
            raise TlsError(f"--upstream-server-name {name!r}: not a host name")
        super().__init__(
            {"--upstream-ca": files.ca, "--upstream-cert": files.cert, "--upstream-key": files.key}
        )
        self.files = files
        self._credentials: grpc.ChannelCredentials | None = None
        self._pair: KeyPair | None = None
        self._first_load()

    def _load(self, raw: dict[str, bytes]) -> None:
        f = self.files
        roots = None
        if f.ca is not None:
            roots = roots_pem("--upstream-ca", f.ca, raw["--upstream-ca"])
        pair = None
        if f.cert is not None and f.key is not None:
            pair = key_pair(
                "--upstream-cert",
                f.cert,
                raw["--upstream-cert"],
                "--upstream-key",
                f.key,
                raw["--upstream-key"],
            )
            warn_validity("--upstream-cert", f.cert, pair.leaf)
        #: The same trust and client certificate for gRPC channels (server reflection).
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=roots if roots is not None else _system_roots(),
            private_key=pair.key_pem if pair else None,
            certificate_chain=pair.chain_pem if pair else None,
        )
        #: The context for new backend connections of the relay.
        self.context = _ssl_context(
            lambda: client_context(
                roots, pair.chain_pem if pair else None, pair.key_pem if pair else None
            )
        )
        self._pair = pair

    @property
    def client_cert(self) -> x509.Certificate | None:
        return self._pair.leaf if self._pair else None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials for the current set of files."""
        assert self._credentials is not None
        return self._credentials

    def channel_options(self) -> list[tuple[str, str]]:
        """gRPC channel options. With a server name: verify it in the backend's
        certificate, send it as SNI and as the `:authority` (the dial address may be an IP
        or a Service's name), as the relay's connections do."""
        name = self.files.server_name
        if name is None:
            return []
        return [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)]

    def changed(self) -> bool:
        """Re-read the files; True when a new valid set was loaded (new connections use it)."""
        if not self._reload():
            return False
        log.info(
            "upstream TLS: reloaded %s",
            ", ".join(f"{flag} {path}" for flag, path in self._files.items()),
        )
        return True


def _system_roots() -> bytes | None:
    """The system trust store's CA file, the one `ssl.create_default_context` loads for
    the relay's connections (`SSL_CERT_FILE` overrides it), for gRPC channels, which would
    otherwise trust the bundle shipped in grpcio. None when there is no such file (a
    store that is only a directory of hashed certificates): grpcio's bundle then."""
    cafile = ssl.get_default_verify_paths().cafile
    if cafile is None:
        return None
    try:
        return Path(cafile).read_bytes()
    except OSError:
        return None
