"""Run the example backend: `python -m examples.backend --listen HOST:PORT ...`.

Put the proxy in front of it; the backend trusts the identity headers the proxy sets and
must not be reachable any other way. With `--proxy-admin` logouts and password changes
revoke tokens at the proxy's admin API; without it access tokens stay valid until they
expire.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
from typing import NoReturn

from authproxy.keys.issuer import TokenIssuer, hmac_signing_key, load_signing_key
from authproxy.keys.keyset import KeyLoadError, secret_from_env
from authproxy.policy.loader import PolicyError, load_policy
from examples.backend.revocations import admin_base_url
from examples.backend.server import BackendConfig, admin_set, hostport, start_backend
from examples.backend.tokens import ACCESS_TTL

PROG = "examples.backend"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog=f"python -m {PROG}",
        description="Example gRPC backend (AuthService, UserService, DataService) for authproxy.",
    )
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--policy", required=True, help="the proxy's policy.yaml")
    parser.add_argument(
        "--signing-key",
        required=True,
        metavar="PEM",
        help="private key for access/2FA tokens; reloaded when the file changes (authproxy "
        "keygen --rotate)",
    )
    parser.add_argument(
        "--refresh-secret-env",
        required=True,
        metavar="NAME",
        help="environment variable holding the refresh-token HMAC secret (32+ bytes)",
    )
    parser.add_argument("--refresh-kid", default="refresh-hmac", help="default: %(default)s")
    parser.add_argument(
        "--admin-email",
        action="append",
        default=[],
        metavar="EMAIL",
        help="accounts signed up with this email get role admin (repeatable)",
    )
    parser.add_argument(
        "--access-ttl",
        type=float,
        default=ACCESS_TTL,
        metavar="SECONDS",
        help="access token lifetime (default: %(default)s)",
    )
    parser.add_argument(
        "--proxy-admin",
        metavar="URL",
        help="the proxy's admin API (its --admin), e.g. http://127.0.0.1:9901: Logout revokes "
        "the access token there, Logout on all devices and ChangePassword every token of the "
        "user; without it access tokens stay valid until they expire",
    )
    parser.add_argument(
        "--proxy-admin-token-env",
        metavar="NAME",
        help="environment variable holding the admin API's bearer secret (its --admin-token-env)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every signup")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> BackendConfig:
    """The configuration the flags describe; raises ValueError with a one-line message."""
    hostport(args.listen)
    if not math.isfinite(args.access_ttl) or args.access_ttl <= 0:
        raise ValueError("--access-ttl must be a positive number of seconds")
    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        problems = str(e).splitlines()
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"policy: {problems[0]}{more}") from None
    try:
        signing_key = load_signing_key(args.signing_key)
        refresh_key = hmac_signing_key(secret_from_env(args.refresh_secret_env), args.refresh_kid)
        TokenIssuer(policy, {"access": signing_key, "2fa": signing_key, "refresh": refresh_key})
    except (KeyLoadError, ValueError) as e:
        raise ValueError(str(e)) from None
    allowed = policy.tokens["refresh"].key_ids if "refresh" in policy.tokens else None
    if allowed is not None and args.refresh_kid not in allowed:
        raise ValueError(
            f"the policy accepts refresh tokens only from key(s) {', '.join(sorted(allowed))}; "
            f"--refresh-kid is {args.refresh_kid!r}"
        )
    proxy_admin_token = None
    if args.proxy_admin_token_env is not None:
        if args.proxy_admin is None:
            raise ValueError("--proxy-admin-token-env needs --proxy-admin")
        proxy_admin_token = os.environ.get(args.proxy_admin_token_env)
        if not proxy_admin_token:
            raise ValueError(
                f"environment variable {args.proxy_admin_token_env} is not set or empty"
                " (it holds the proxy admin API's bearer secret)"
            )
    if args.proxy_admin is not None:
        admin_base_url(args.proxy_admin)
    return BackendConfig(
        policy=policy,
        signing_key=signing_key,
        refresh_key=refresh_key,
        admin_emails=admin_set(args.admin_email),
        access_ttl=args.access_ttl,
        proxy_admin=args.proxy_admin,
        proxy_admin_token=proxy_admin_token,
        signing_key_path=args.signing_key,
    )


async def serve(config: BackendConfig, listen: str) -> None:
    backend = await start_backend(config, listen)
    host, _ = hostport(listen)
    print(f"backend listening on {host}:{backend.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await backend.stop(grace=2.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = build_config(args)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, args.listen))
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
