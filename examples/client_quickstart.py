"""Log in through authproxy with `authproxy.client`, read your profile, log out.

Run from the repository root: `python -m examples.client_quickstart --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import pyotp

from authproxy.client import AsyncAuthSession, MethodLevels
from examples.backend.api.v1 import api_pb2, api_pb2_grpc

#: Seconds a call may take, waiting for a restarting proxy included.
TIMEOUT = 10.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.client_quickstart")
    parser.add_argument("--proxy", default="127.0.0.1:8080", help="the proxy's gRPC address")
    parser.add_argument("--admin", default="http://127.0.0.1:9901", help="its admin API's URL")
    parser.add_argument("--admin-token-env", metavar="NAME", help="variable with its token")
    parser.add_argument("--email", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--sign-up", action="store_true", help="create the account first")
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    token = os.environ[args.admin_token_env] if args.admin_token_env else None
    # The policy the proxy enforces (or MethodLevels.from_file): which token each method needs.
    levels = await MethodLevels.from_admin_async(args.admin, admin_token=token)
    # Across a proxy restart: the session's channel retries UNAVAILABLE and reconnects
    # within seconds (its default options), and wait_for_ready=True makes a call sent
    # while the proxy is down wait for it, until its timeout. Each call gets the token
    # its level needs (GetProfile: the access token).
    async with AsyncAuthSession(args.proxy, levels, wait_for_ready=True) as session:
        auth = api_pb2_grpc.AuthServiceStub(session.channel)  # plain stubs, no metadata
        users = api_pb2_grpc.UserServiceStub(session.channel)
        totp = None
        if args.sign_up:  # SignUp is public: no token is sent
            request = api_pb2.SignUpRequest(
                email=args.email, password=args.password, enable_2fa=True
            )
            created = await auth.SignUp(request, timeout=TIMEOUT)
            totp = pyotp.parse_uri(created.otpauth_uri)
        if (await session.login(args.email, args.password)).requires_2fa:
            code = totp.now() if totp else input("code: ")  # from your authenticator app
            await session.verify_2fa(code)  # keeps the access + refresh tokens
        profile = await users.GetProfile(api_pb2.GetProfileRequest(), timeout=TIMEOUT)
        print(f"GetProfile: {profile.email} (user id {profile.user_id})")
        await session.logout()  # Logout, then forget every token
        print("logged out")


if __name__ == "__main__":
    asyncio.run(main())
