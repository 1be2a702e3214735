"""The proxy's configuration (`ServeConfig`) and turning it into parts: keys, state, the
policy, TLS. Everything that can be wrong with the configuration is found here, before
anything listens, and reported as one clear `ConfigError`.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from authproxy.keys.keyset import KeyLoadError, split_kid
from authproxy.keys.ring import KeyRing
from authproxy.keys.sources import (
    FetchSettings,
    KeyFetcher,
    KeyFile,
    KeySource,
    OidcJwks,
    RemoteJwks,
    SecretKeys,
    ssl_context_for,
)
from authproxy.policy.loader import PolicyError, parse_policy, read_policy_file
from authproxy.policy.model import Policy
from authproxy.runtime.tls import ServerTls, ServerTlsFiles, TlsError, UpstreamTls, UpstreamTlsFiles
from authproxy.state.file import FileState, StateFileError
from authproxy.state.redis_store import DEFAULT_STALENESS, DEFAULT_TIMEOUT, RedisState
from authproxy.state.redis_target import RedisUrlError
from authproxy.state.store import DEFAULT_SUBJECT_TTL, MemoryState, StateStore

log = logging.getLogger("authproxy")

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_LISTEN = "0.0.0.0:8080"
#: Streams one client connection may have open on the sidecar (Envoy's and nghttp2's
#: default too); clients queue calls beyond it.
DEFAULT_MAX_CONCURRENT_STREAMS = 100


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
    #: In-memory state: keep revocations and single-use records in this file across restarts.
    state_file: str | None = None
    admin: str | None = None  # HOST:PORT of the admin API (revocations)
    admin_token_env: str | None = None  # env var holding the admin API's bearer secret
    admin_metrics_auth: bool = False  # /metrics needs the admin token too
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
    #: SETTINGS_MAX_CONCURRENT_STREAMS of the sidecar's listener, per client connection.
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    token_cache_size: int = 10_000
    shutdown_grace: float = 10.0
    #: Follow the policy file and reload it when it changes (SIGHUP reloads either way).
    watch_policy: bool = True
    #: After a reload, end open streams the new policy refuses (POLICY_CHANGED).
    reload_ends_streams: bool = True
    #: Share of allowed decisions written to the decision log (denies always are).
    log_allows: float = 0.0
    #: Worker processes (`runtime/workers.py`); above 1 every listener is opened with SO_REUSEPORT.
    workers: int = 1
    #: Seconds a sidecar client connection may take to send the HTTP/2 preface.
    preface_timeout: float = 10.0
    #: OpenTelemetry spans for decisions and relayed calls (`runtime/tracing.py`; the
    #: `otel` extra; `OTEL_*` variables configure the SDK).
    tracing: bool = False


def load_keys(cfg: ServeConfig) -> KeyRing:
    """The key sources the configuration names, merged in a `KeyRing` (not started: remote
    sets are fetched once it is). ConfigError for a bad file, URL or secret."""
    sources: list[KeySource] = []
    try:
        fetcher = KeyFetcher(ssl_context_for(cfg.jwks_ca))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--jwks-ca {cfg.jwks_ca}: cannot load CA certificates: {e}") from None

    def source(location: str, issuer: str | None) -> KeySource:
        if location.startswith(("https://", "http://")):
            check_url("--jwks", location)
            return RemoteJwks(location, issuer, cfg.jwks_fetch, fetcher)
        return KeyFile(location, issuer)

    try:
        sources.extend(source(location, None) for location in cfg.jwks)
        for spec in cfg.issuer_jwks:
            issuer, sep, location = spec.partition("=")
            if not sep or not issuer or not location:
                raise ConfigError(f"--issuer-jwks {spec!r}: expected ISSUER=FILE_OR_URL")
            sources.append(source(location, issuer))
        for issuer in cfg.oidc_issuers:
            check_url("--oidc-issuer", issuer)
            sources.append(OidcJwks(issuer, cfg.jwks_fetch, fetcher))
        for spec in cfg.public_keys:
            kid, path = split_kid(spec)
            sources.append(KeyFile(path, pem=True, pem_kid=kid))
        for spec in cfg.hmac_secret_envs:
            kid, env = split_kid(spec)
            sources.append(SecretKeys(env, kid))
        return KeyRing(sources, fetcher)
    except KeyLoadError as e:
        raise ConfigError(str(e)) from None


def check_url(flag: str, url: str) -> None:
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
    if cfg.redis is None and cfg.state_file is not None:
        try:
            return FileState(cfg.state_file, subject_ttl=cfg.subject_revocation_ttl)
        except StateFileError as e:
            raise ConfigError(str(e)) from None
    if cfg.redis is None:
        return MemoryState(subject_ttl=cfg.subject_revocation_ttl)
    if cfg.state_file is not None:
        raise ConfigError(
            "--state-file keeps in-memory state across restarts; with --redis the state"
            " lives in Redis: give one of them"
        )
    try:
        return RedisState(
            cfg.redis,
            namespace=cfg.state_namespace,
            subject_ttl=cfg.subject_revocation_ttl,
            staleness=cfg.state_staleness,
            timeout=cfg.state_timeout,
        )
    except RedisUrlError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(f"--redis: {e}") from None


def warn_volatile_state(cfg: ServeConfig, policy: Policy) -> None:
    """In memory without --state-file, a restart forgets every revocation and use: say so
    when they can matter (the policy has token levels, or the admin API can revoke)."""
    if cfg.workers > 1:  # refused without --redis anyway, with its own error
        return
    if cfg.redis is None and cfg.state_file is None and (policy.tokens or cfg.admin):
        log.warning(
            "revocations and single-use records are kept in memory only: a restart forgets"
            " them (a revoked token is accepted again, a used refresh token can be used"
            " again, until they expire); give --state-file PATH (one proxy) or --redis URL"
        )


def read_policy(cfg: ServeConfig) -> tuple[Policy, bytes]:
    """The policy and the file content it was parsed from (read once, so the two always
    agree); ConfigError naming file and line."""
    try:
        data = read_policy_file(cfg.policy)
        return parse_policy(data, cfg.policy), data
    except PolicyError as e:
        raise ConfigError(str(e)) from None


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


def check_address(flag: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag} {value!r} is not HOST:PORT")
