"""Assembling and running the proxy from its configuration: one `Authorizer` shared by
up to three front ends — the gRPC sidecar (`--upstream`), the Envoy ext_authz gRPC
server (`--ext-authz-grpc`) and the Envoy ext_authz HTTP server (`--ext-authz-http`).

Everything that can be wrong with the configuration (policy, keys, addresses) is found
here, before the proxy listens, and reported as one clear `ConfigError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import Histogram

from .admin import AdminServer
from .catalog import CatalogError, MethodCatalog
from .client_address import TrustedProxies
from .ext_authz_grpc import CheckServer
from .ext_authz_http import CheckHttpServer
from .key_ring import KeyRing, attach, ssl_context_for
from .key_sources import FetchSettings, KeyFile, KeySource, OidcJwks, RemoteJwks, SecretKeys
from .keys import KeyLoadError, split_kid
from .lint import uncovered
from .operations import Operations
from .pipeline import Authorizer
from .policy import Policy
from .policy_file import PolicyError, parse_policy, read_policy_file
from .policy_reload import PolicyReloader
from .rate_limits import RateLimiter
from .sidecar import SidecarHandler, build_server
from .state import DEFAULT_SUBJECT_TTL, MemoryState, StateStore
from .state_checks import revocation_check, single_use_check
from .state_redis import DEFAULT_STALENESS, DEFAULT_TIMEOUT, RedisState
from .stream_guard import StreamGuard
from .tls import ServerTls, ServerTlsFiles, TlsError, UpstreamTls, UpstreamTlsFiles
from .upstream import Upstream
from .verify import TokenVerifier

log = logging.getLogger("authproxy")

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_LISTEN = "0.0.0.0:8080"


class ConfigError(Exception):
    """The proxy cannot start; the message says why (one or more lines)."""


@dataclass
class ServeConfig:
    policy: str
    listen: str = DEFAULT_LISTEN  # the sidecar's listener; used only with `upstream`
    upstream: str | None = None  # the backend; None runs no sidecar
    ext_authz_grpc: str | None = None  # HOST:PORT of the ext_authz gRPC server
    ext_authz_http: str | None = None  # HOST:PORT of the ext_authz HTTP server
    ext_authz_http_path_prefix: str = ""
    redis: str | None = None  # redis://... for shared state; None keeps it in memory
    state_namespace: str = "authproxy"
    subject_revocation_ttl: float = DEFAULT_SUBJECT_TTL
    state_staleness: float = DEFAULT_STALENESS
    state_timeout: float = DEFAULT_TIMEOUT
    admin: str | None = None  # HOST:PORT of the admin API (revocations)
    admin_token_env: str | None = None  # env var holding the admin API's bearer secret
    #: CIDRs whose x-forwarded-for is believed, for rate limits keyed by client address
    trusted_proxies: list[str] = field(default_factory=list)
    jwks: list[str] = field(default_factory=list)  # JWKS files or https:// URLs
    #: ISSUER=FILE_OR_URL: a JWKS whose keys verify only tokens of ISSUER
    issuer_jwks: list[str] = field(default_factory=list)
    #: OpenID Connect issuers: keys from discovery, verifying only that issuer's tokens
    oidc_issuers: list[str] = field(default_factory=list)
    public_keys: list[str] = field(default_factory=list)  # [KID=]PEM
    hmac_secret_envs: list[str] = field(default_factory=list)  # [KID=]ENV
    jwks_fetch: FetchSettings = field(default_factory=FetchSettings)
    jwks_ca: str | None = None  # CA file for https key fetches (default: system roots)
    #: `/readyz` waits for every remote key set's first load.
    keys_wait: bool = True
    tls_cert: str | None = None  # serve TLS with this PEM chain ...
    tls_key: str | None = None  # ... and its key
    tls_client_ca: str | None = None  # require client certificates these CAs sign (mTLS)
    upstream_tls: bool = False  # TLS to the backend (implied by the upstream_* files)
    upstream_ca: str | None = None
    upstream_cert: str | None = None  # client certificate for upstream mTLS ...
    upstream_key: str | None = None  # ... and its key
    upstream_server_name: str | None = None  # name to verify in the backend's certificate
    descriptor_sets: list[str] = field(default_factory=list)
    upstream_reflection: bool = True
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    token_cache_size: int = 10_000
    shutdown_grace: float = 10.0
    #: Follow the policy file and reload it when it changes (SIGHUP reloads either way).
    watch_policy: bool = True
    #: After a reload, end open streams the new policy refuses (POLICY_CHANGED).
    reload_ends_streams: bool = True
    #: Share of allowed decisions written to the decision log (denies always are).
    log_allows: float = 0.0


def load_keys(cfg: ServeConfig) -> KeyRing:
    """The key sources the configuration names, merged in a `KeyRing` (not started: remote
    sets are fetched once it is). ConfigError for a bad file, URL or secret."""
    sources: list[KeySource] = []
    try:
        context = ssl_context_for(cfg.jwks_ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--jwks-ca {cfg.jwks_ca}: cannot load CA certificates: {e}") from None
    ring: KeyRing | None = None

    def session() -> aiohttp.ClientSession:
        assert ring is not None
        return ring.session()

    def source(location: str, issuer: str | None) -> KeySource:
        if location.startswith(("https://", "http://")):
            _check_url("--jwks", location)
            return RemoteJwks(location, issuer, cfg.jwks_fetch, session)
        return KeyFile(location, issuer)

    try:
        sources.extend(source(location, None) for location in cfg.jwks)
        for spec in cfg.issuer_jwks:
            issuer, sep, location = spec.partition("=")
            if not sep or not issuer or not location:
                raise ConfigError(f"--issuer-jwks {spec!r}: expected ISSUER=FILE_OR_URL")
            sources.append(source(location, issuer))
        for issuer in cfg.oidc_issuers:
            _check_url("--oidc-issuer", issuer)
            sources.append(OidcJwks(issuer, cfg.jwks_fetch, session))
        for spec in cfg.public_keys:
            kid, path = split_kid(spec)
            sources.append(KeyFile(path, pem=True, pem_kid=kid))
        for spec in cfg.hmac_secret_envs:
            kid, env = split_kid(spec)
            sources.append(SecretKeys(env, kid))
        ring = KeyRing(sources, context)
    except KeyLoadError as e:
        raise ConfigError(str(e)) from None
    return ring


def _check_url(flag: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{flag} {url!r}: expected an https:// URL")
    if parts.scheme == "http":
        log.warning(
            "%s %s: keys fetched over plain HTTP can be replaced by anyone on the path; use https",
            flag,
            url,
        )


def check_policy_keys(policy: Policy, keys: KeyRing) -> None:
    """The keys a policy names must exist (unless remote key sets may bring them), and
    token levels need at least one key source."""
    problems = []
    for spec in policy.tokens.values():
        missing = keys.current.missing(spec.key_ids or ())
        if missing and not keys.remote:
            problems.append(
                f"{policy.source}:{spec.line}: tokens.{spec.level} names key id(s)"
                f" {', '.join(missing)}, "
                "which no configured key has"
            )
    if policy.tokens and not keys.sources:
        problems.append(
            "no verification keys configured: use --jwks, --oidc-issuer, --public-key"
            " or --hmac-secret-env"
        )
    if problems:
        raise ConfigError("\n".join(problems))


def build_state(cfg: ServeConfig) -> StateStore:
    if cfg.redis is None:
        return MemoryState(subject_ttl=cfg.subject_revocation_ttl)
    if not cfg.redis.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"--redis {cfg.redis!r}: expected redis://, rediss:// or unix:// URL")
    try:
        return RedisState(
            cfg.redis,
            namespace=cfg.state_namespace,
            subject_ttl=cfg.subject_revocation_ttl,
            staleness=cfg.state_staleness,
            timeout=cfg.state_timeout,
        )
    except ValueError as e:
        raise ConfigError(f"--redis: {e}") from None


def read_policy(cfg: ServeConfig) -> tuple[Policy, bytes]:
    """The policy and the file content it was parsed from (read once, so the two always
    agree); ConfigError naming file and line."""
    try:
        data = read_policy_file(cfg.policy)
        return parse_policy(data, cfg.policy), data
    except PolicyError as e:
        raise ConfigError(str(e)) from None


def build_authorizer(
    cfg: ServeConfig,
    state: StateStore,
    policy: Policy | None = None,
    keys: KeyRing | None = None,
) -> Authorizer:
    """`policy`: already read with `read_policy` (default: read it now); `keys`: from
    `load_keys` (default: load them now; remote sets are fetched once the ring starts)."""
    if policy is None:
        policy, _ = read_policy(cfg)
    if keys is None:
        keys = load_keys(cfg)
    check_policy_keys(policy, keys)
    try:
        trusted = TrustedProxies(cfg.trusted_proxies)
    except ValueError as e:
        raise ConfigError(f"--trusted-proxy: {e}") from None
    verifier = TokenVerifier(keys.current, cache_size=cfg.token_cache_size)
    attach(keys, verifier)
    return assemble_authorizer(policy, verifier, state, trusted)


def assemble_authorizer(
    policy: Policy,
    verifier: TokenVerifier,
    state: StateStore,
    trusted: TrustedProxies | None = None,
) -> Authorizer:
    """The pipeline's steps on a state store: revocation and single use, then rate limits.
    `serve` and `explain` both build theirs here."""
    return Authorizer(
        policy,
        verifier,
        (revocation_check(state), single_use_check(state)),
        RateLimiter(state.rate_limit_storage(), trusted),
    )


def tls_from(cfg: ServeConfig) -> tuple[ServerTls | None, UpstreamTls | None]:
    """The sidecar's TLS (inbound, upstream) from the configuration; ConfigError naming
    the flag and file when a certificate or key cannot be used."""
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS)")
    if bool(cfg.upstream_cert) != bool(cfg.upstream_key):
        raise ConfigError("--upstream-cert and --upstream-key go together")
    upstream_files = (cfg.upstream_ca, cfg.upstream_cert, cfg.upstream_server_name)
    try:
        server = None
        if cfg.tls_cert and cfg.tls_key:
            server = ServerTls(ServerTlsFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca))
        upstream = None
        if cfg.upstream_tls or any(upstream_files):
            upstream = UpstreamTls(
                UpstreamTlsFiles(
                    cfg.upstream_ca, cfg.upstream_cert, cfg.upstream_key, cfg.upstream_server_name
                )
            )
    except TlsError as e:
        raise ConfigError(str(e)) from None
    return server, upstream


def _check_address(flag: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag} {value!r} is not HOST:PORT")


class Sidecar:
    """A running sidecar: listener, authorizer, backend connection."""

    def __init__(
        self,
        cfg: ServeConfig,
        authorizer: Authorizer | None = None,
        state: StateStore | None = None,
        upstream_seconds: Histogram | None = None,
    ) -> None:
        """With no `authorizer`, one is built on `state` (default: in memory); the
        `StreamGuard` watches streams against `state`."""
        if cfg.upstream is None:
            raise ConfigError("the sidecar needs --upstream HOST:PORT")
        _check_address("--listen", cfg.listen)
        _check_address("--upstream", cfg.upstream)
        self.cfg = cfg
        if authorizer is None:
            state = state or MemoryState(subject_ttl=cfg.subject_revocation_ttl)
            authorizer = build_authorizer(cfg, state)
        self.authorizer = authorizer
        self.guard = None
        if state is not None:
            self.guard = StreamGuard(state, authorizer, reload_ends_streams=cfg.reload_ends_streams)
        self.catalog = MethodCatalog()
        try:
            for path in cfg.descriptor_sets:
                self.catalog.add_descriptor_set(path)
        except CatalogError as e:
            raise ConfigError(str(e)) from None
        self.tls, upstream_tls = tls_from(cfg)
        self.upstream = Upstream(cfg.upstream, cfg.max_message_bytes, upstream_tls)
        handler = SidecarHandler(
            self.authorizer,
            self.upstream,
            self.catalog,
            self.guard,
            upstream_seconds,
            peer_identity=bool(cfg.tls_client_ca),
        )
        try:
            self.server, self.port = build_server(
                handler, cfg.listen, cfg.max_message_bytes, self.tls
            )
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"--listen {cfg.listen}: {e}") from None
        self._learning: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        if self.tls is not None:
            self.tls.start()
        self.upstream.start()
        if self.cfg.upstream_reflection:
            self._learning = asyncio.create_task(self._learn_methods())
        policy = self.authorizer.policy
        log.info(
            "authproxy listening on port %d, upstream %s, policy %s (version %s, %d rules)",
            self.port,
            self.cfg.upstream,
            policy.source,
            policy.version,
            policy.rule_count,
        )

    async def _learn_methods(self) -> None:
        """Learn method kinds by reflection; retry with backoff while the backend is down."""
        delay = 0.5
        while True:
            try:
                count = await self.catalog.add_from_reflection(self.upstream.channel)
                log.info("learned %d method kinds from upstream reflection", count)
                policy = self.authorizer.policy
                missing = uncovered(policy, self.catalog.kinds)
                if missing:
                    log.warning(
                        "%d served methods have no rule; policy %s's default (%s) decides them: %s",
                        len(missing),
                        policy.version,
                        policy.default.level,
                        ", ".join(missing),
                    )
                return
            except Exception as e:  # any failure: keep the generic stream path, retry later
                log.info("upstream reflection not available yet (%s); retrying", e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def stop(self, grace: float | None = None) -> None:
        if self._learning is not None:
            self._learning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._learning
        await self.server.stop(self.cfg.shutdown_grace if grace is None else grace)
        if self.tls is not None:
            await self.tls.stop()
        await self.upstream.close()
        if self.guard is not None:
            await self.guard.close()


class AuthProxy:
    """The whole process: one authorizer, and each front end the configuration asks for."""

    def __init__(self, cfg: ServeConfig) -> None:
        if not (cfg.upstream or cfg.ext_authz_grpc or cfg.ext_authz_http):
            raise ConfigError(
                "nothing to serve: give --upstream (the sidecar) and/or --ext-authz-grpc"
                " / --ext-authz-http (Envoy ext_authz)"
            )
        for flag, value in (
            ("--ext-authz-grpc", cfg.ext_authz_grpc),
            ("--ext-authz-http", cfg.ext_authz_http),
        ):
            if value is not None:
                _check_address(flag, value)
        self.state = build_state(cfg)
        policy, policy_text = read_policy(cfg)
        self.keys = load_keys(cfg)
        self.authorizer = build_authorizer(cfg, self.state, policy, self.keys)
        self.ops = Operations(
            self.authorizer,
            self.state,
            self.keys,
            cfg.policy,
            policy_text,
            check_policy_keys,
            cfg.log_allows,
            cfg.keys_wait,
        )
        self.sidecar = None
        if cfg.upstream:
            self.sidecar = Sidecar(
                cfg, self.authorizer, self.state, self.ops.metrics_registry.upstream_seconds
            )
            self.ops.watch_sidecar(self.sidecar.upstream, self.sidecar.guard, self.sidecar.tls)
        self.admin: AdminServer | None = None
        if cfg.admin:
            _check_address("--admin", cfg.admin)
            token = None
            if cfg.admin_token_env:
                token = os.environ.get(cfg.admin_token_env)
                if not token or len(token) < 16:
                    raise ConfigError(
                        f"--admin-token-env {cfg.admin_token_env}: the variable must hold a"
                        " secret of at least 16 characters"
                    )
            self.admin = AdminServer(self.state, cfg.admin, token, self.ops)
        self.check_grpc: CheckServer | None = None
        self.check_http: CheckHttpServer | None = None
        try:
            if cfg.ext_authz_grpc:
                self.check_grpc = CheckServer(self.authorizer, cfg.ext_authz_grpc)
            if cfg.ext_authz_http:
                self.check_http = CheckHttpServer(
                    self.authorizer, cfg.ext_authz_http, cfg.ext_authz_http_path_prefix
                )
        except (OSError, RuntimeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        for mode, server in (("grpc", self.check_grpc), ("http", self.check_http)):
            if server is not None:
                self.ops.watch_ext_authz(mode, server)
        self.cfg = cfg

    @property
    def reloader(self) -> PolicyReloader:
        return self.ops.reloader

    async def start(self) -> None:
        await self.state.start()
        await self.keys.start()
        if self.keys.remote:  # a moment for the first fetches; readiness waits for them anyway
            await self.keys.wait_loaded(self.cfg.jwks_fetch.timeout)
        if self.admin is not None:
            try:
                await self.admin.start()
            except OSError as e:
                await self.state.close()
                await self.keys.close()
                raise ConfigError(f"--admin {self.cfg.admin}: {e}") from None
            log.info("admin API listening on port %d", self.admin.port)
        if self.sidecar is not None:
            await self.sidecar.start()
        if self.check_grpc is not None:
            await self.check_grpc.start()
            log.info("ext_authz gRPC (Check) listening on port %d", self.check_grpc.port)
        if self.check_http is not None:
            try:
                await self.check_http.start()
            except OSError as e:
                await self.stop(0)
                raise ConfigError(f"--ext-authz-http {self.cfg.ext_authz_http}: {e}") from None
            log.info("ext_authz HTTP listening on port %d", self.check_http.port)
        if self.cfg.watch_policy:
            self.reloader.start()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: readiness goes false, the front ends stop taking calls and let the ones
        in flight (streams too) finish for up to `grace` seconds; the admin listener
        answers (`/readyz` 503) until they are done."""
        grace = self.cfg.shutdown_grace if grace is None else grace
        self.ops.draining = True
        await self.reloader.stop()
        fronts = (self.sidecar, self.check_grpc, self.check_http)
        await asyncio.gather(*(front.stop(grace) for front in fronts if front is not None))
        if self.admin is not None:
            await self.admin.stop()
        await self.keys.close()
        await self.state.close()


async def run(cfg: ServeConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight calls for up to the grace period."""
    proxy = AuthProxy(cfg)
    await proxy.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    reloads: set[asyncio.Task] = set()

    def reload() -> None:
        task = loop.create_task(proxy.reloader.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await stopping.wait()
    log.info("shutting down (grace %.0fs)", cfg.shutdown_grace)
    await proxy.stop()
