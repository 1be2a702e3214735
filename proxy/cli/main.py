"""The `authproxy` command: serve, policy check, keygen, token mint.

Every `serve` flag has an environment variable `AUTHPROXY_<FLAG>` (dashes become
underscores); repeatable flags take a comma-separated list there. Flags win over the
environment. Configuration problems print `authproxy: error: ...` and exit 2 before
anything listens.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import re
import sys
from pathlib import Path
from typing import NoReturn

from authproxy import __version__
from authproxy.cli.policy import add_policy_commands
from authproxy.cli.serve import KEY_SETTINGS, add_serve
from authproxy.cli.settings import ENV_PREFIX as ENV_PREFIX  # the environment variables' prefix
from authproxy.cli.settings import add_flags, duration, values
from authproxy.keys import keygen as keygen_mod
from authproxy.keys.issuer import SigningKey, TokenIssuer, hmac_signing_key, load_signing_key
from authproxy.keys.keyset import KeyLoadError, secret_from_env, split_kid
from authproxy.policy.loader import PolicyError, load_policy
from authproxy.policy.values import parse_duration
from authproxy.runtime.serve import ConfigError, ServeConfig


class _Probe(Exception):
    """A usage error met while looking for unrecognized options (`_Parser.unknown`)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one `authproxy: error: ...` line naming the `--help` to read: that
    of the (sub-)command the mistake was made in. A sub-command group given no command
    lists its commands; an unrecognized option names the closest one the command has."""

    _given: list[str] = []  # the arguments of the last parse_known_args
    _probing = False

    def parse_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        chosen = self
        while (commands := _commands(chosen)) is not None:
            name = getattr(parsed, commands.dest, None)
            if name is None:
                chosen.error(chosen.choose(commands))
            chosen = commands.choices[name]
        if extras:
            chosen.error(chosen.unrecognized(extras))
        return parsed

    def parse_known_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if self._probing:
            raise _Probe(message)
        commands = _commands(self)
        typed = re.search(r"invalid choice: '([^']*)'", message)
        if commands is not None and typed and message.startswith(f"argument {commands.dest}:"):
            message = self.choose(commands, typed[1])
        elif message.startswith("the following arguments are required"):
            extras = self.unknown(self._given)  # a mistyped flag explains a missing one
            if extras:
                message = self.unrecognized(extras)
        self.exit(2, f"authproxy: error: {message} (see '{self.prog} --help')\n")

    def choose(self, commands: argparse._SubParsersAction, typed: str | None = None) -> str:
        """`choose a command: A, B`, after the unknown command `typed` and its closest one."""
        where = f"{self.prog}: " if " " in self.prog else ""  # a sub-command group's name
        listed = f"choose a command: {', '.join(commands.choices)}"
        if typed is None:
            return where + listed
        close = difflib.get_close_matches(typed, commands.choices, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{where}unknown command {typed!r}{hint}; {listed}"

    def unrecognized(self, extras: list[str]) -> str:
        """`unrecognized arguments: ...`, with the closest option to the first mistyped one."""
        message = f"unrecognized arguments: {' '.join(extras)}"
        options = [
            option
            for action in self._actions
            if action.help != argparse.SUPPRESS
            for option in action.option_strings
        ]
        names = {option.lstrip("-"): option for option in options}  # the dashes match anyway
        for extra in extras:
            if extra.startswith("-"):
                word = extra.partition("=")[0].lstrip("-")
                close = difflib.get_close_matches(word, names, n=1, cutoff=0.75)
                if close:
                    return f"{message}; did you mean {names[close[0]]}?"
        return message

    def unknown(self, args: list[str]) -> list[str]:
        """The arguments this command does not know, parsing `args` with nothing required."""
        if _commands(self) is not None:
            return []
        required = [(a, a.required) for a in [*self._actions, *self._mutually_exclusive_groups]]
        self._probing = True
        try:
            for item, _ in required:
                item.required = False
            return super().parse_known_args(args, None)[1]
        except _Probe:
            return []
        finally:
            for item, was in required:
                item.required = was
            self._probing = False


def _commands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    """The parser's sub-commands, if it has any."""
    found = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next(found, None)


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="explain what the proxy would do with one call")
    p.add_argument("method", nargs="?", help="gRPC method path, /package.Service/Method")
    p.add_argument(
        "--http", metavar="'METHOD /path'", help="an HTTP request seen through Envoy ext_authz"
    )
    given = p.add_mutually_exclusive_group()
    given.add_argument(
        "--token", help="the JWT, or a whole 'Bearer ...' value (visible in the process list)"
    )
    given.add_argument("--token-file", help="file holding the token; - reads standard input")
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="a request header the call carries (repeatable); for 'when' conditions",
    )
    p.add_argument(
        "--request",
        metavar="JSON",
        help="the request message's fields as JSON, e.g. '{\"user_id\": \"bob\"}' (for 'request')",
    )
    add_flags(p, KEY_SETTINGS)  # the policy and keys, as `serve` takes them
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=_explain)


def _explain(args: argparse.Namespace) -> int:
    import json

    from authproxy.cli.explain import explain_offline
    from authproxy.cli.explain_report import json_report, text_report

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
    headers = []
    for given in args.header:
        name, sep, value = given.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"--header {given!r}: expected NAME:VALUE")
        headers.append((name.strip().lower(), value.strip()))
    request = None
    if args.request is not None:
        try:
            request = json.loads(args.request)
        except ValueError as e:
            raise ConfigError(f"--request: not JSON ({e})") from None
        if not isinstance(request, dict):
            raise ConfigError("--request: a JSON object of the message's fields")
    cfg = ServeConfig(**values(args, KEY_SETTINGS))
    explained = asyncio.run(
        explain_offline(cfg, target, token, http_method, headers=tuple(headers), request=request)
    )
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
    parser.add_argument("--version", action="version", version=f"authproxy {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    add_serve(sub)

    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", parser_class=_Parser)
    add_policy_commands(policy_sub)
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
        type=duration,
        default=None,
        metavar="DURATION",
        help="with --rotate: how long the old public key(s) stay published (default 24h); "
        "set it to at least the longest lifetime of tokens signed with the old key",
    )
    kg.set_defaults(func=_keygen)

    token = sub.add_parser("token", help="token tools")
    token_sub = token.add_subparsers(dest="token_command", parser_class=_Parser)
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
