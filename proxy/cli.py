"""The `authproxy` command: serve, policy check, keygen, token mint.

Every `serve` flag has an environment variable `AUTHPROXY_<FLAG>` (dashes become
underscores); repeatable flags take a comma-separated list there. Flags win over the
environment. Configuration problems print `authproxy: error: ...` and exit 2 before
anything listens.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from . import decision_log
from . import keygen as keygen_mod
from .issuer import SigningKey, TokenIssuer, hmac_signing_key, load_signing_key
from .key_sources import FetchSettings
from .keys import KeyLoadError, secret_from_env, split_kid
from .policy_file import PolicyError, load_policy
from .policy_values import parse_duration
from .serve import DEFAULT_LISTEN, DEFAULT_MAX_MESSAGE_BYTES, ConfigError, ServeConfig, run

ENV_PREFIX = "AUTHPROXY_"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line instead of usage + error
        self.exit(2, f"authproxy: error: {message} (see '{self.prog} --help')\n")


def _env(flag: str) -> str | None:
    return os.environ.get(ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()) or None


def _env_list(flag: str) -> list[str]:
    value = _env(flag)
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value!r}")
    return number


def _env_bool(flag: str, default: bool) -> bool:
    value = _env(flag)
    return default if value is None else value.lower() in ("1", "true", "yes", "on")


def _duration(value: str) -> float:
    """A positive duration (`500ms`, `1s`, `30d`, ...); argparse turns ValueError into a usage error."""
    seconds = parse_duration(value)
    if seconds is None or seconds <= 0:
        raise ValueError(value)
    return seconds


_duration.__name__ = "duration"  # argparse names the type in its error message


def _admin_address(value: str) -> str:
    return f"127.0.0.1:{value}" if value.isdigit() else value


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC auth sidecar")
    p.add_argument("--policy", default=_env("--policy") or "policy.yaml", help="policy file")
    p.add_argument(
        "--listen", default=_env("--listen"), help=f"sidecar HOST:PORT (default {DEFAULT_LISTEN})"
    )
    p.add_argument(
        "--upstream", default=_env("--upstream"), help="backend HOST:PORT: runs the gRPC sidecar"
    )
    p.add_argument(
        "--ext-authz-grpc",
        default=_env("--ext-authz-grpc"),
        help="HOST:PORT: serve Envoy ext_authz gRPC (envoy.service.auth.v3.Authorization)",
    )
    p.add_argument(
        "--ext-authz-http",
        default=_env("--ext-authz-http"),
        help="HOST:PORT: serve Envoy ext_authz HTTP mode (http_service)",
    )
    p.add_argument(
        "--ext-authz-http-path-prefix",
        default=_env("--ext-authz-http-path-prefix") or "",
        help="the path_prefix Envoy's http_service puts before each path (like /check)",
    )
    p.add_argument(
        "--redis",
        default=_env("--redis"),
        help="redis:// or rediss:// URL for shared state (default: in memory, this process)",
    )
    p.add_argument("--state-namespace", default=_env("--state-namespace") or "authproxy")
    p.add_argument(
        "--subject-revocation-ttl",
        type=_duration,
        default=_env("--subject-revocation-ttl") or "30d",
        help="how long 'revoke every token of a subject' lasts (>= your longest token life)",
    )
    p.add_argument(
        "--state-staleness",
        type=_duration,
        default=_env("--state-staleness") or "1s",
        help="Redis: oldest revocation view trusted before checks fail closed",
    )
    p.add_argument(
        "--state-timeout",
        type=_duration,
        default=_env("--state-timeout") or "500ms",
        help="Redis: timeout of each state operation",
    )
    p.add_argument(
        "--admin",
        type=_admin_address,
        default=_env("--admin"),
        help="[HOST:]PORT of the admin API (revocations); a bare PORT binds 127.0.0.1",
    )
    p.add_argument(
        "--admin-token-env",
        default=_env("--admin-token-env"),
        help="ENV holding a bearer secret the admin API requires",
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=None,
        help="CIDR or address of a proxy whose x-forwarded-for is believed, for rate limits"
        " keyed by client address (repeatable)",
    )
    _add_key_flags(p)
    p.add_argument(
        "--jwks-timeout",
        type=_duration,
        default=_env("--jwks-timeout") or "5s",
        help="timeout of one key fetch (and how long start waits for the first)",
    )
    p.add_argument(
        "--jwks-cache-min",
        type=_duration,
        default=_env("--jwks-cache-min") or "1m",
        help="shortest time a fetched key set is kept, whatever its Cache-Control says",
    )
    p.add_argument(
        "--jwks-cache-max",
        type=_duration,
        default=_env("--jwks-cache-max") or "24h",
        help="longest time a fetched key set is kept (default without max-age: 5m)",
    )
    p.add_argument(
        "--jwks-refetch-interval",
        type=_duration,
        default=_env("--jwks-refetch-interval") or "30s",
        help="a token with an unknown kid fetches its key set at most once per this",
    )
    p.add_argument(
        "--no-keys-wait",
        action="store_true",
        default=not _env_bool("--keys-wait", True),
        help="do not hold /readyz until every remote key set has loaded once",
    )
    _add_tls_flags(p)
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
        default=not _env_bool("--upstream-reflection", True),
        help="do not ask the backend's server reflection for method kinds",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=_env("--max-message-bytes") or str(DEFAULT_MAX_MESSAGE_BYTES),
    )
    # String defaults go through `type` like flags do, so a bad AUTHPROXY_* value is a
    # one-line usage error (exit 2), and only for the command that reads it.
    p.add_argument("--token-cache-size", type=int, default=_env("--token-cache-size") or "10000")
    p.add_argument("--shutdown-grace", type=float, default=_env("--shutdown-grace") or "10")
    p.add_argument("--log-level", default=_env("--log-level") or "info")
    p.add_argument(
        "--decision-log",
        choices=("stdout", "stderr", "off"),
        default=_env("--decision-log") or "stdout",
        help="where the JSON decision lines go (denies always, allows sampled)",
    )
    p.add_argument(
        "--log-allows",
        type=_fraction,
        default=_env("--log-allows") or "0",
        help="share of allowed decisions logged, 0 to 1 (default 0: denies only)",
    )
    p.add_argument(
        "--no-policy-watch",
        action="store_true",
        default=not _env_bool("--policy-watch", True),
        help="do not reload the policy when its file changes (SIGHUP still reloads)",
    )
    p.add_argument(
        "--no-reload-ends-streams",
        action="store_true",
        default=not _env_bool("--reload-ends-streams", True),
        help="keep open streams that a reloaded policy would refuse",
    )
    p.set_defaults(func=_serve)


def _add_key_flags(p: argparse.ArgumentParser) -> None:
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
        default=_env("--jwks-ca"),
        help="CA file trusted for https key fetches (default: the system roots)",
    )
    p.add_argument(
        "--public-key", action="append", default=None, help="[KID=]PEM public key file (repeatable)"
    )


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-cert", default=_env("--tls-cert"), help="PEM certificate chain: serve TLS"
    )
    p.add_argument("--tls-key", default=_env("--tls-key"), help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        default=_env("--tls-client-ca"),
        help="PEM CA certificates: require client certificates they sign (mTLS)",
    )
    p.add_argument(
        "--upstream-tls",
        action="store_true",
        default=_env_bool("--upstream-tls", False),
        help="connect to the backend with TLS (implied by the other --upstream-* TLS flags)",
    )
    p.add_argument("--upstream-ca", default=_env("--upstream-ca"), help="CA file for the backend")
    p.add_argument(
        "--upstream-cert", default=_env("--upstream-cert"), help="client certificate (mTLS)"
    )
    p.add_argument("--upstream-key", default=_env("--upstream-key"), help="its private key")
    p.add_argument(
        "--upstream-server-name",
        default=_env("--upstream-server-name"),
        help="name the backend's certificate must carry (when --upstream is an address)",
    )


def _fetch_settings(args: argparse.Namespace) -> FetchSettings:
    if args.jwks_cache_min > args.jwks_cache_max:
        raise ConfigError("--jwks-cache-min is longer than --jwks-cache-max")
    return FetchSettings(
        timeout=args.jwks_timeout,
        cache_min=args.jwks_cache_min,
        cache_max=args.jwks_cache_max,
        cache_default=min(max(300.0, args.jwks_cache_min), args.jwks_cache_max),
        refetch_interval=args.jwks_refetch_interval,
    )


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    decision_log.log_to(args.decision_log)
    if args.listen and not args.upstream:
        raise ConfigError("--listen is the sidecar's listener: it needs --upstream HOST:PORT")
    cfg = ServeConfig(
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
        admin=args.admin,
        admin_token_env=args.admin_token_env,
        trusted_proxies=args.trusted_proxy or _env_list("--trusted-proxy"),
        jwks=args.jwks or _env_list("--jwks"),
        issuer_jwks=args.issuer_jwks or _env_list("--issuer-jwks"),
        oidc_issuers=args.oidc_issuer or _env_list("--oidc-issuer"),
        public_keys=args.public_key or _env_list("--public-key"),
        hmac_secret_envs=args.hmac_secret_env or _env_list("--hmac-secret-env"),
        jwks_fetch=_fetch_settings(args),
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
        descriptor_sets=args.descriptor_set or _env_list("--descriptor-set"),
        upstream_reflection=not args.no_upstream_reflection,
        max_message_bytes=args.max_message_bytes,
        token_cache_size=args.token_cache_size,
        shutdown_grace=args.shutdown_grace,
        watch_policy=not args.no_policy_watch,
        reload_ends_streams=not args.no_reload_ends_streams,
        log_allows=args.log_allows,
    )
    asyncio.run(run(cfg))
    return 0


def _add_policy_check(policy_sub: argparse._SubParsersAction) -> None:
    check = policy_sub.add_parser(
        "check", help="validate a policy file; lint it against the methods a backend serves"
    )
    check.add_argument("file")
    check.add_argument(
        "--backend", help="HOST:PORT: lint against the methods its gRPC server reflection lists"
    )
    check.add_argument(
        "--descriptor-set",
        action="append",
        default=[],
        help="lint against the methods of a FileDescriptorSet (protoset) (repeatable)",
    )
    check.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 if a served method has no rule or a rule matches no served method",
    )
    check.add_argument("--format", choices=("text", "json"), default="text")
    check.add_argument(
        "--timeout", type=_duration, default="5s", help="how long to wait for --backend"
    )
    check.set_defaults(func=_policy_check)


def _policy_check(args: argparse.Namespace) -> int:
    import json

    from . import lint
    from .catalog import CatalogError, MethodCatalog, reflect_backend

    as_json = args.format == "json"
    try:
        policy = load_policy(args.file)
    except PolicyError as e:
        print(e, file=sys.stderr)
        if as_json:
            print(json.dumps(lint.json_report(args.file, errors=e.errors, strict=args.strict)))
        return 1
    if not (args.backend or args.descriptor_set):
        if as_json:
            print(json.dumps(lint.json_report(args.file, policy=policy, strict=args.strict)))
        else:
            print(f"{args.file}: OK (version {policy.version}, {policy.rule_count} rules)")
        return 0
    catalog, sources = MethodCatalog(), list(args.descriptor_set)
    try:
        for path in args.descriptor_set:
            catalog.add_descriptor_set(path)
        if args.backend:
            catalog.kinds.update(asyncio.run(reflect_backend(args.backend, args.timeout)).kinds)
            sources.append(f"reflection at {args.backend}")
    except CatalogError as e:
        raise ConfigError(str(e)) from None
    result = lint.lint(policy, catalog.kinds)
    if as_json:
        report = lint.json_report(
            args.file, policy=policy, result=result, sources=sources, strict=args.strict
        )
        print(json.dumps(report, indent=2))
    else:
        print(lint.text_report(result, sources, args.strict))
    return 1 if args.strict and result.findings else 0


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="explain what the proxy would do with one call")
    p.add_argument("method", nargs="?", help="gRPC method path, /package.Service/Method")
    p.add_argument(
        "--http", metavar="'METHOD /path'", help="an HTTP request seen through Envoy ext_authz"
    )
    p.add_argument("--policy", default=_env("--policy") or "policy.yaml", help="policy file")
    given = p.add_mutually_exclusive_group()
    given.add_argument(
        "--token", help="the JWT, or a whole 'Bearer ...' value (visible in the process list)"
    )
    given.add_argument("--token-file", help="file holding the token; - reads standard input")
    _add_key_flags(p)
    p.add_argument("--hmac-secret-env", action="append", default=None, help="as for serve")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=_explain)


def _explain(args: argparse.Namespace) -> int:
    import json

    from .explain import explain_offline
    from .explain_report import json_report, text_report

    if bool(args.method) == bool(args.http):
        raise ConfigError("give a gRPC method path or --http 'METHOD /path' (one of them)")
    http_method, target = None, args.method
    if args.http:
        http_method, _, target = args.http.strip().partition(" ")
        target = target.strip()
        if not target.startswith("/"):
            raise ConfigError(f"--http {args.http!r}: expected 'METHOD /path'")
    token = args.token
    if args.token_file:
        try:
            text = sys.stdin.read() if args.token_file == "-" else Path(args.token_file).read_text()
        except OSError as e:
            raise ConfigError(f"--token-file {args.token_file}: {e.strerror}") from None
        token = text.strip()
    cfg = ServeConfig(
        policy=args.policy,
        jwks=args.jwks or _env_list("--jwks"),
        issuer_jwks=args.issuer_jwks or _env_list("--issuer-jwks"),
        oidc_issuers=args.oidc_issuer or _env_list("--oidc-issuer"),
        jwks_ca=args.jwks_ca,
        public_keys=args.public_key or _env_list("--public-key"),
        hmac_secret_envs=args.hmac_secret_env or _env_list("--hmac-secret-env"),
    )
    explained = asyncio.run(explain_offline(cfg, target, token, http_method))
    out = json.dumps(json_report(explained), indent=2) if args.format == "json" else None
    print(out or text_report(explained))
    return 0 if explained.allowed else 1


def _keygen(args: argparse.Namespace) -> int:
    import datetime

    def when(t: int) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    private, jwks = Path(args.private_key), Path(args.jwks)
    if not args.rotate and args.retire_after is not None:
        raise ConfigError("--retire-after applies only with --rotate")
    if not (args.rotate or args.force) and private.exists():
        raise ConfigError(
            f"{private} exists; use --rotate to replace it with a new key while the old "
            "one stays published, or --force to overwrite it"
        )
    try:
        if args.rotate:
            retire_after = 24 * 3600.0 if args.retire_after is None else args.retire_after
            result = keygen_mod.rotate(args.alg, private, jwks, retire_after, args.kid)
        else:
            result = keygen_mod.keygen_run(args.alg, private, jwks, args.kid)
    except OSError as e:
        raise ConfigError(f"{e.filename or private}: {e.strerror}") from None
    key = result.key
    for kid, at in result.pruned:
        print(f"pruned {kid} from {jwks} (retired at {when(at)}, {at})")
    for kid, at in result.retiring:
        print(f"retiring {kid} at {when(at)} ({at}); published in {jwks} until then")
    for kid, at in result.still_retiring:
        print(f"still retiring {kid} at {when(at)} ({at})")
    if result.unpublished_old_kid is not None:
        print(
            f"warning: the key {private} held until now ({result.unpublished_old_kid}) is not "
            f"in {jwks}; tokens it signed are not verified by this JWKS"
        )
    print(f"wrote {private} (private, 0600) and {jwks}; kid {key.kid} ({key.alg})")
    return 0


def _signing_key(args: argparse.Namespace) -> SigningKey:
    if bool(args.key) == bool(args.hmac_secret_env):
        raise ConfigError("give exactly one of --key PEM or --hmac-secret-env [KID=]ENV")
    if args.key:
        return load_signing_key(args.key, args.kid)
    kid, env = split_kid(args.hmac_secret_env)
    return hmac_signing_key(secret_from_env(env), args.kid or kid or env)


def _token_mint(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        raise ConfigError(str(e)) from None
    level = next(
        (lvl for lvl, spec in policy.tokens.items() if args.type in (lvl, spec.type)), None
    )
    if level is None:
        known = ", ".join(f"{lvl} ({s.type})" for lvl, s in policy.tokens.items())
        raise ConfigError(f"--type {args.type!r} is not a token level of the policy: {known}")
    ttl = parse_duration(args.ttl)
    if ttl is None or ttl <= 0:
        raise ConfigError(f"--ttl {args.ttl!r} is not a positive duration (like 15m, 1h, 3600)")
    issuer = TokenIssuer(policy, {level: _signing_key(args)})
    minted = issuer.mint(
        level,
        args.sub,
        ttl=ttl,
        roles=_csv(args.roles),
        permissions=_csv(args.permissions),
        scopes=_csv(args.scopes),
    )
    print(minted.token)
    return 0


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="authproxy", description="gRPC auth sidecar")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_serve(sub)

    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, parser_class=_Parser)
    _add_policy_check(policy_sub)
    _add_explain(sub)

    kg = sub.add_parser("keygen", help="generate a signing key and its public JWKS")
    kg.add_argument("--alg", choices=keygen_mod.ALGORITHMS, default="ES256")
    kg.add_argument("--private-key", default="keys/signing.pem", help="private PEM to write (0600)")
    kg.add_argument("--jwks", default="keys/jwks.json", help="JWKS file to create or add to")
    kg.add_argument("--kid", help="key id (default: RFC 7638 thumbprint)")
    replace = kg.add_mutually_exclusive_group()
    replace.add_argument(
        "--rotate",
        action="store_true",
        help="replace the existing --private-key with a new key; the other keys in --jwks "
        "stay published until --retire-after from now (keys past their retire time are "
        "removed on every run)",
    )
    replace.add_argument(
        "--force", action="store_true", help="overwrite an existing --private-key (no rotation)"
    )
    kg.add_argument(
        "--retire-after",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="with --rotate: how long the old public key(s) stay published (default 24h); "
        "set it to at least the longest lifetime of tokens signed with the old key",
    )
    kg.set_defaults(func=_keygen)

    token = sub.add_parser("token", help="token tools")
    token_sub = token.add_subparsers(dest="token_command", required=True, parser_class=_Parser)
    mint = token_sub.add_parser("mint", help="issue a signed token for a policy level")
    mint.add_argument("--policy", default="policy.yaml")
    mint.add_argument("--type", required=True, help="level (2fa, refresh, access) or token type")
    mint.add_argument("--sub", required=True, help="subject")
    mint.add_argument("--roles", help="comma-separated roles")
    mint.add_argument("--permissions", help="comma-separated permissions")
    mint.add_argument("--scopes", help="comma-separated scopes")
    mint.add_argument("--ttl", default="15m", help="lifetime, like 15m, 1h, 3600")
    mint.add_argument("--key", help="PEM private key to sign with")
    mint.add_argument("--hmac-secret-env", help="[KID=]ENV: sign with the HMAC secret in ENV")
    mint.add_argument("--kid", help="key id to put in the header (default: from the key)")
    mint.set_defaults(func=_token_mint)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, KeyLoadError, ValueError) as e:
        print(f"authproxy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
