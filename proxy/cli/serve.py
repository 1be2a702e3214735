"""The `authproxy serve` command: its flags, their `AUTHPROXY_<FLAG>` environment
variables, and the `ServeConfig` they make.

Every `serve` flag has an environment variable `AUTHPROXY_<FLAG>` (dashes become
underscores); repeatable flags take a comma-separated list there. Flags win over the
environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from authproxy.keys.sources import FetchSettings
from authproxy.policy.values import parse_duration
from authproxy.runtime import decision_log, workers
from authproxy.runtime.config import DEFAULT_MAX_CONCURRENT_STREAMS
from authproxy.runtime.serve import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_MESSAGE_BYTES,
    ConfigError,
    ServeConfig,
    run,
)

ENV_PREFIX = "AUTHPROXY_"


def env(flag: str) -> str | None:
    return os.environ.get(ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()) or None


def env_list(flag: str) -> list[str]:
    value = env(flag)
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value!r}")
    return number


def env_bool(flag: str, default: bool) -> bool:
    value = env(flag)
    return default if value is None else value.lower() in ("1", "true", "yes", "on")


def duration(value: str) -> float:
    """A positive duration (`500ms`, `1s`, `30d`, ...); argparse turns ValueError into a usage error."""
    seconds = parse_duration(value)
    if seconds is None or seconds <= 0:
        raise ValueError(value)
    return seconds


duration.__name__ = "duration"  # argparse names the type in its error message


def count(value: str) -> int:
    """A whole number >= 1 (argparse turns ValueError into a usage error)."""
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def admin_address(value: str) -> str:
    return f"127.0.0.1:{value}" if value.isdigit() else value


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC auth sidecar")
    p.add_argument("--policy", default=env("--policy") or "policy.yaml", help="policy file")
    p.add_argument(
        "--listen", default=env("--listen"), help=f"sidecar HOST:PORT (default {DEFAULT_LISTEN})"
    )
    p.add_argument(
        "--upstream", default=env("--upstream"), help="backend HOST:PORT: runs the gRPC sidecar"
    )
    p.add_argument(
        "--ext-authz-grpc",
        default=env("--ext-authz-grpc"),
        help="HOST:PORT: serve Envoy ext_authz gRPC (envoy.service.auth.v3.Authorization)",
    )
    p.add_argument(
        "--ext-authz-http",
        default=env("--ext-authz-http"),
        help="HOST:PORT: serve Envoy ext_authz HTTP mode (http_service)",
    )
    p.add_argument(
        "--ext-authz-http-path-prefix",
        default=env("--ext-authz-http-path-prefix") or "",
        help="the path_prefix Envoy's http_service puts before each path (like /check)",
    )
    p.add_argument(
        "--redis",
        default=env("--redis"),
        help="redis:// or rediss:// URL for shared state (default: in memory, this process)",
    )
    p.add_argument(
        "--state-file",
        default=env("--state-file"),
        help="without --redis: keep revocations and single-use records in this file, so a"
        " restart does not forget them",
    )
    p.add_argument("--state-namespace", default=env("--state-namespace") or "authproxy")
    p.add_argument(
        "--subject-revocation-ttl",
        type=duration,
        default=env("--subject-revocation-ttl") or "30d",
        help="how long 'revoke every token of a subject' lasts (>= your longest token life)",
    )
    p.add_argument(
        "--state-staleness",
        type=duration,
        default=env("--state-staleness") or "1s",
        help="Redis: oldest revocation view trusted before checks fail closed",
    )
    p.add_argument(
        "--state-timeout",
        type=duration,
        default=env("--state-timeout") or "1s",
        help="Redis: timeout of each state operation",
    )
    p.add_argument(
        "--admin",
        type=admin_address,
        default=env("--admin"),
        help="[HOST:]PORT of the admin API (revocations); a bare PORT binds 127.0.0.1",
    )
    p.add_argument(
        "--admin-token-env",
        default=env("--admin-token-env"),
        help="ENV holding a bearer secret every admin route but the probes, /metrics and"
        " the public keys requires",
    )
    p.add_argument(
        "--admin-metrics-auth",
        action="store_true",
        default=env_bool("--admin-metrics-auth", False),
        help="/metrics needs the admin token too (with --admin-token-env)",
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=None,
        help="CIDR or address of a proxy whose x-forwarded-for is believed, for rate limits"
        " keyed by client address (repeatable)",
    )
    add_key_flags(p)
    p.add_argument(
        "--jwks-timeout",
        type=duration,
        default=env("--jwks-timeout") or "5s",
        help="timeout of one key fetch (and how long start waits for the first)",
    )
    p.add_argument(
        "--jwks-cache-min",
        type=duration,
        default=env("--jwks-cache-min") or "1m",
        help="shortest time a fetched key set is kept, whatever its Cache-Control says",
    )
    p.add_argument(
        "--jwks-cache-max",
        type=duration,
        default=env("--jwks-cache-max") or "24h",
        help="longest time a fetched key set is kept (default without max-age: 5m)",
    )
    p.add_argument(
        "--jwks-refetch-interval",
        type=duration,
        default=env("--jwks-refetch-interval") or "30s",
        help="a token with an unknown kid fetches its key set at most once per this",
    )
    p.add_argument(
        "--no-keys-wait",
        action="store_true",
        default=not env_bool("--keys-wait", True),
        help="do not hold /readyz until every remote key set has loaded once",
    )
    add_tls_flags(p)
    p.add_argument(
        "--hmac-secret-env",
        action="append",
        default=None,
        help="[KID=]ENV: HMAC secret in environment variable ENV; kid defaults to ENV (repeatable)",
    )
    p.add_argument(
        "--descriptor-set",
        action="append",
        default=None,
        help="FileDescriptorSet (protoset) telling which methods are unary (repeatable)",
    )
    p.add_argument(
        "--no-upstream-reflection",
        action="store_true",
        default=not env_bool("--upstream-reflection", True),
        help="do not ask the backend's server reflection for method kinds",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=env("--max-message-bytes") or str(DEFAULT_MAX_MESSAGE_BYTES),
    )
    p.add_argument(
        "--max-concurrent-streams",
        type=count,
        default=env("--max-concurrent-streams") or str(DEFAULT_MAX_CONCURRENT_STREAMS),
        help="streams one client connection may have open on the sidecar (HTTP/2"
        f" SETTINGS_MAX_CONCURRENT_STREAMS; default {DEFAULT_MAX_CONCURRENT_STREAMS}); clients"
        " queue calls beyond it",
    )
    # String defaults go through `type` like flags do, so a bad AUTHPROXY_* value is a
    # one-line usage error (exit 2), and only for the command that reads it.
    p.add_argument("--token-cache-size", type=int, default=env("--token-cache-size") or "10000")
    p.add_argument("--shutdown-grace", type=float, default=env("--shutdown-grace") or "10")
    p.add_argument(
        "--workers",
        type=count,
        default=env("--workers") or "1",
        help="worker processes sharing the listeners (SO_REUSEPORT); above 1 needs --redis",
    )
    # Internal: how the supervisor starts worker I (`runtime/workers.py`); no environment variable.
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default=env("--log-level") or "info")
    p.add_argument(
        "--decision-log",
        choices=("stdout", "stderr", "off"),
        default=env("--decision-log") or "stdout",
        help="where the JSON decision lines go (denies always, allows sampled)",
    )
    p.add_argument(
        "--log-allows",
        type=fraction,
        default=env("--log-allows") or "0",
        help="share of allowed decisions logged, 0 to 1 (default 0: denies only)",
    )
    p.add_argument(
        "--no-policy-watch",
        action="store_true",
        default=not env_bool("--policy-watch", True),
        help="do not reload the policy when its file changes (SIGHUP still reloads)",
    )
    p.add_argument(
        "--no-reload-ends-streams",
        action="store_true",
        default=not env_bool("--reload-ends-streams", True),
        help="keep open streams that a reloaded policy would refuse",
    )
    p.set_defaults(func=serve, serve_parser=p)


def add_key_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--jwks",
        action="append",
        default=None,
        help="JWKS file or https:// URL with verification keys (repeatable)",
    )
    p.add_argument(
        "--issuer-jwks",
        action="append",
        default=None,
        metavar="ISSUER=FILE_OR_URL",
        help="a JWKS whose keys verify only tokens with that iss (repeatable)",
    )
    p.add_argument(
        "--oidc-issuer",
        action="append",
        default=None,
        metavar="URL",
        help="OpenID Connect issuer: keys from its discovery document's jwks_uri; they"
        " verify only its tokens (repeatable)",
    )
    p.add_argument(
        "--jwks-ca",
        default=env("--jwks-ca"),
        help="CA file trusted for https key fetches (default: the system roots)",
    )
    p.add_argument(
        "--public-key", action="append", default=None, help="[KID=]PEM public key file (repeatable)"
    )


def add_tls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", default=env("--tls-cert"), help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", default=env("--tls-key"), help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        default=env("--tls-client-ca"),
        help="PEM CA certificates: require client certificates they sign (mTLS)",
    )
    p.add_argument(
        "--upstream-tls",
        action="store_true",
        default=env_bool("--upstream-tls", False),
        help="connect to the backend with TLS (implied by the other --upstream-* TLS flags)",
    )
    p.add_argument("--upstream-ca", default=env("--upstream-ca"), help="CA file for the backend")
    p.add_argument(
        "--upstream-cert", default=env("--upstream-cert"), help="client certificate (mTLS)"
    )
    p.add_argument("--upstream-key", default=env("--upstream-key"), help="its private key")
    p.add_argument(
        "--upstream-server-name",
        default=env("--upstream-server-name"),
        help="name the backend's certificate must carry (when --upstream is an address)",
    )


def fetch_settings(args: argparse.Namespace) -> FetchSettings:
    if args.jwks_cache_min > args.jwks_cache_max:
        raise ConfigError("--jwks-cache-min is longer than --jwks-cache-max")
    return FetchSettings(
        timeout=args.jwks_timeout,
        cache_min=args.jwks_cache_min,
        cache_max=args.jwks_cache_max,
        cache_default=min(max(300.0, args.jwks_cache_min), args.jwks_cache_max),
        refetch_interval=args.jwks_refetch_interval,
    )


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
    if args.listen and not args.upstream:
        raise ConfigError("--listen is the sidecar's listener: it needs --upstream HOST:PORT")
    return ServeConfig(
        policy=args.policy,
        listen=args.listen or DEFAULT_LISTEN,
        upstream=args.upstream,
        ext_authz_grpc=args.ext_authz_grpc,
        ext_authz_http=args.ext_authz_http,
        ext_authz_http_path_prefix=args.ext_authz_http_path_prefix,
        redis=args.redis,
        state_namespace=args.state_namespace,
        subject_revocation_ttl=args.subject_revocation_ttl,
        state_staleness=args.state_staleness,
        state_timeout=args.state_timeout,
        state_file=args.state_file,
        admin=args.admin,
        admin_token_env=args.admin_token_env,
        admin_metrics_auth=args.admin_metrics_auth,
        trusted_proxies=args.trusted_proxy or env_list("--trusted-proxy"),
        jwks=args.jwks or env_list("--jwks"),
        issuer_jwks=args.issuer_jwks or env_list("--issuer-jwks"),
        oidc_issuers=args.oidc_issuer or env_list("--oidc-issuer"),
        public_keys=args.public_key or env_list("--public-key"),
        hmac_secret_envs=args.hmac_secret_env or env_list("--hmac-secret-env"),
        jwks_fetch=fetch_settings(args),
        jwks_ca=args.jwks_ca,
        keys_wait=not args.no_keys_wait,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        upstream_tls=args.upstream_tls,
        upstream_ca=args.upstream_ca,
        upstream_cert=args.upstream_cert,
        upstream_key=args.upstream_key,
        upstream_server_name=args.upstream_server_name,
        descriptor_sets=args.descriptor_set or env_list("--descriptor-set"),
        upstream_reflection=not args.no_upstream_reflection,
        max_message_bytes=args.max_message_bytes,
        max_concurrent_streams=args.max_concurrent_streams,
        token_cache_size=args.token_cache_size,
        shutdown_grace=args.shutdown_grace,
        watch_policy=not args.no_policy_watch,
        reload_ends_streams=not args.no_reload_ends_streams,
        log_allows=args.log_allows,
        workers=args.workers,
    )
