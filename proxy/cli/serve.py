"""The `authproxy serve` command: its settings (`SERVE`, one declaration each: flag,
`AUTHPROXY_*` variable, default, help; see `cli/settings.py`) and the `ServeConfig` they
make.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys

from authproxy.cli.settings import (
    LIST,
    OFF,
    ON,
    Setting,
    add_flags,
    admin_address,
    count,
    duration,
    fraction,
    values,
)
from authproxy.keys.sources import FetchSettings
from authproxy.runtime import decision_log, workers
from authproxy.runtime.config import ConfigError, ServeConfig
from authproxy.runtime.serve import run

#: Every `serve` setting, in the order `--help` and the README list them.
SERVE: tuple[Setting, ...] = (
    Setting("--policy", "policy", "the policy file", "FILE", default="policy.yaml"),
    Setting("--upstream", "upstream", "the backend; runs the gRPC sidecar", "HOST:PORT"),
    Setting(
        "--listen", "listen", "the sidecar's listener, where clients connect (gRPC, h2c or"
        " TLS); needs --upstream", "HOST:PORT",
    ),
    Setting(
        "--ext-authz-grpc", "ext_authz_grpc", "serve Envoy ext_authz gRPC"
        " (envoy.service.auth.v3.Authorization/Check, and gRPC health)", "HOST:PORT",
    ),
    Setting(
        "--ext-authz-http", "ext_authz_http", "serve Envoy ext_authz HTTP mode (http_service)",
        "HOST:PORT",
    ),
    Setting(
        "--ext-authz-http-path-prefix", "ext_authz_http_path_prefix",
        "the path_prefix Envoy's http_service puts before each path (like /check)", "/P",
    ),
    Setting(
        "--jwks", "jwks", "JWKS file, or https:// URL fetched and kept fresh", "FILE|URL", LIST,
        more="[Keys from identity providers](#keys-from-identity-providers)",
    ),
    Setting(
        "--issuer-jwks", "issuer_jwks", "a JWKS whose keys verify only tokens whose iss is"
        " ISSUER", "ISSUER=FILE|URL", LIST,
    ),
    Setting(
        "--oidc-issuer", "oidc_issuers", "OpenID Connect issuer: keys from its discovery"
        " document's jwks_uri, verifying only its tokens", "URL", LIST,
    ),
    Setting(
        "--jwks-ca", "jwks_ca", "CA certificates trusted for https:// key fetches", "FILE",
        shown="system roots",
    ),
    Setting(
        "--jwks-timeout", "jwks_fetch.timeout", "timeout of one key fetch (start waits this"
        " long for the first)", "D", parse=duration,
    ),
    Setting(
        "--jwks-cache-min", "jwks_fetch.cache_min", "shortest time a fetched key set is kept,"
        " whatever its Cache-Control says", "D", parse=duration,
    ),
    Setting(
        "--jwks-cache-max", "jwks_fetch.cache_max", "longest time a fetched key set is kept"
        " (without max-age: 5m); also the longest retry backoff", "D", parse=duration,
    ),
    Setting(
        "--jwks-refetch-interval", "jwks_fetch.refetch_interval", "a token with an unknown"
        " kid fetches its key set again at most once per this", "D", parse=duration,
    ),
    Setting(
        "--no-keys-wait", "keys_wait", "/readyz does not wait for every remote key set's first"
        " load", kind=OFF,
    ),
    Setting(
        "--public-key", "public_keys", "PEM public key; kid defaults to its RFC 7638"
        " thumbprint", "[KID=]FILE", LIST,
    ),
    Setting(
        "--hmac-secret-env", "hmac_secret_envs", "HMAC secret (raw bytes, at least 32) in"
        " environment variable ENV; kid defaults to ENV", "[KID=]ENV", LIST,
    ),
    Setting(
        "--redis", "redis", "shared state for several replicas: redis://[:password@]host:6379/0"
        " (rediss:// for TLS), redis+sentinel://host:26379[,...]/SERVICE or"
        " redis+cluster://host:port[,...]; Redis 7 or newer", "URL", shown="— (in memory)",
    ),
    Setting(
        "--state-file", "state_file", "without --redis: keep revocations and single-use"
        " records in this file across restarts", "PATH", shown="— (lost on restart)",
        more="[State across restarts](#state-across-restarts)",
    ),
    Setting(
        "--state-namespace", "state_namespace", "prefix of every Redis key and the pub/sub"
        " channel", "NS",
    ),
    Setting(
        "--state-staleness", "state_staleness", "Redis: the oldest revocation view trusted;"
        " older, token levels fail closed", "D", parse=duration,
    ),
    Setting(
        "--state-timeout", "state_timeout", "Redis: timeout of each state operation (and of the"
        " wait for a pooled connection)", "D", parse=duration,
    ),
    Setting(
        "--subject-revocation-ttl", "subject_revocation_ttl", "how long 'revoke every token of"
        " a subject' lasts; make it at least your longest token lifetime", "D", parse=duration,
    ),
    Setting(
        "--admin", "admin", "the admin listener: health, readiness, metrics, policy,"
        " revocations; a bare PORT binds 127.0.0.1", "[HOST:]PORT", parse=admin_address,
        shown="off (image: 0.0.0.0:9901)",
    ),
    Setting(
        "--admin-token-env", "admin_token_env", "ENV holding a bearer secret (16 characters or"
        " more) that every admin route but /healthz, /readyz, /metrics and the published"
        " public keys requires", "ENV", more="see [Metrics and logs](#metrics-and-logs)",
    ),
    Setting(
        "--admin-metrics-auth", "admin_metrics_auth", "/metrics requires the admin token too"
        " (needs --admin-token-env)", kind=ON,
    ),
    Setting(
        "--tls-cert", "tls_cert", "PEM certificate chain: serve the sidecar over TLS (h2 by"
        " ALPN); reloaded when the files change", "FILE", shown="— (h2c)",
        more="[TLS and mTLS](#tls-and-mtls)",
    ),
    Setting("--tls-key", "tls_key", "PEM private key of --tls-cert", "FILE"),
    Setting(
        "--tls-client-ca", "tls_client_ca", "require client certificates these CAs sign"
        " (mTLS); their identity feeds peers: and x-auth-peer", "FILE",
    ),
    Setting(
        "--upstream-tls", "upstream_tls", "connect to the backend with TLS (implied by the"
        " other --upstream-* TLS flags)", kind=ON,
    ),
    Setting(
        "--upstream-ca", "upstream_ca", "CAs trusted for the backend's certificate", "FILE",
        shown="the system trust store",
    ),
    Setting("--upstream-cert", "upstream_cert", "client certificate for upstream mTLS", "FILE"),
    Setting("--upstream-key", "upstream_key", "private key of --upstream-cert", "FILE"),
    Setting(
        "--upstream-server-name", "upstream_server_name", "the name the backend's certificate"
        " must carry (when --upstream is an address)", "NAME", shown="the --upstream host",
    ),
    Setting(
        "--trusted-proxy", "trusted_proxies", "a proxy (or load balancer) whose"
        " x-forwarded-for is believed for rate limits keyed by client address", "CIDR", LIST,
    ),
    Setting(
        "--descriptor-set", "descriptor_sets", "protoset telling which methods are unary",
        "FILE", LIST,
    ),
    Setting(
        "--no-upstream-reflection", "upstream_reflection", "do not ask the backend's server"
        " reflection for method kinds", kind=OFF,
    ),
    Setting(
        "--max-message-bytes", "max_message_bytes", "largest message in either direction",
        "N", parse=int, shown="16 MiB",
    ),
    Setting(
        "--max-concurrent-streams", "max_concurrent_streams", "streams one client connection"
        " may have open on the sidecar (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); gRPC clients"
        " queue calls beyond it", "N", parse=count,
        more="[Overload and shutdown](#overload-and-shutdown-what-clients-see)",
    ),
    Setting(
        "--token-cache-size", "token_cache_size", "verified tokens kept (0 disables the cache)",
        "N", parse=int,
    ),
    Setting(
        "--shutdown-grace", "shutdown_grace", "seconds in-flight calls may finish after"
        " SIGTERM", "SECONDS", parse=float,
    ),
    Setting(
        "--workers", "workers", "worker processes sharing the listeners (SO_REUSEPORT), to use"
        " more than one CPU; above 1 needs --redis and fixed ports", "N", parse=count,
        more="[Several workers](#several-workers)",
    ),
    Setting(
        "--log-level", None, "debug, info, warning or error", "LEVEL", default="info",
        parse=str.lower, choices=("debug", "info", "warning", "error"),
    ),
    Setting(
        "--decision-log", None, "where the JSON decision lines go (denies always, allows"
        " sampled)", "DEST", default="stdout", choices=("stdout", "stderr", "off"),
    ),
    Setting(
        "--log-allows", "log_allows", "share of allowed decisions logged, 0 to 1 (denies always"
        " are)", "RATE", parse=fraction,
    ),
    Setting(
        "--tracing", "tracing", "OpenTelemetry spans for decisions and relayed calls, sent as"
        " the OTEL_* variables say (needs the otel extra)", kind=ON,
        more="[Tracing (OpenTelemetry)](#tracing-opentelemetry)",
    ),
    Setting(
        "--no-policy-watch", "watch_policy", "do not reload the policy when its file changes"
        " (SIGHUP still reloads)", kind=OFF,
    ),
    Setting(
        "--no-reload-ends-streams", "reload_ends_streams", "keep open streams that a reloaded"
        " policy would refuse", kind=OFF,
    ),
)  # fmt: skip
#: The key settings `authproxy explain` shares with `serve`.
KEY_SETTINGS = tuple(
    s for s in SERVE if s.flag in (
        "--policy", "--jwks", "--issuer-jwks", "--oidc-issuer", "--jwks-ca", "--public-key",
        "--hmac-secret-env",
    )
)  # fmt: skip


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC auth sidecar")
    add_flags(p, SERVE)
    # Internal: how the supervisor starts worker I (`runtime/workers.py`); no variable.
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=serve, serve_parser=p)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The file watcher's own messages (`watchfiles`) only at debug, and then only its INFO
    # lines (one per change to a followed file): its DEBUG lines would report every write
    # in the watched directories, the proxy's own log file included.
    quiet = args.log_level != "debug"
    logging.getLogger("watchfiles").setLevel(logging.WARNING if quiet else logging.INFO)
    decision_log.log_to(args.decision_log)
    cfg = serve_config(args)
    if cfg.workers > 1 or args.worker_index is not None:
        parser: argparse.ArgumentParser = args.serve_parser
        return workers.main(
            cfg, args.worker_index, lambda argv: serve_config(parser.parse_args(argv))
        )
    asyncio.run(run(cfg))
    return 0


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The configuration `serve`'s arguments make (unset fields keep their defaults)."""
    if args.listen and not args.upstream:
        raise ConfigError("--listen is the sidecar's listener: it needs --upstream HOST:PORT")
    fields = values(args, SERVE)
    fetch = {
        k.partition(".")[2]: fields.pop(k) for k in list(fields) if k.startswith("jwks_fetch.")
    }
    return ServeConfig(**fields, jwks_fetch=fetch_settings(FetchSettings(**fetch)))


def fetch_settings(given: FetchSettings) -> FetchSettings:
    """The `--jwks-*` settings, checked, with the cache time used without `max-age`."""
    if given.cache_min > given.cache_max:
        raise ConfigError("--jwks-cache-min is longer than --jwks-cache-max")
    default = min(max(300.0, given.cache_min), given.cache_max)
    return dataclasses.replace(given, cache_default=default)
