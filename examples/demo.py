"""A scripted tour of authproxy in front of the example backend: `python -m examples.demo`.

It generates a signing key, a refresh secret and an admin API secret in a temporary
directory, starts the example backend and the proxy (`python -m authproxy serve`, with its
admin API, which the backend's logouts call) on free loopback ports, and then
talks to the PROXY only, printing one line per step with the status and, for denials, the
machine-readable reason the proxy puts in `grpc-status-details-bin`. Every step checks
its expected outcome; the demo exits 1 naming the first step that went differently.
`--keep-running` leaves both processes up afterwards for your own calls (Ctrl-C stops).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pyotp

from authproxy.client import AuthSession, ClientAuthError, MethodLevels, denial_reason
from authproxy.keys.keygen import keygen
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from examples.demo_children import (
    REPO,
    STARTUP_SECONDS,
    Children,
    DemoError,
    free_port,
    wait_for_backend,
    wait_for_proxy,
)

POLICY = REPO / "policy.yaml"
#: A second shipped policy whose tests show claim conditions (a tenant header bound to the
#: token's tenant) and claim mapping (Keycloak roles).
MULTI_TENANT = REPO / "policies" / "multi-tenant.yaml"
#: policy.yaml's rate limit on Login (per client address, per minute).
LOGIN_LIMIT = 10
SECRET_ENV = "DEMO_REFRESH_SECRET"
ADMIN_TOKEN_ENV = "DEMO_PROXY_ADMIN_TOKEN"
ADMIN_EMAIL = "admin@example.com"
CALL_TIMEOUT = 10.0
OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
#: The client library refused a call locally (no token for the method's level).
LOCAL = "LOCAL"


def _markers() -> tuple[str, str]:
    try:
        "✔✘→".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "[ok]", "[FAIL]"
    return "✔", "✘"


PASS, FAIL = _markers()


# --- calls and expectations ------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode | str  # or LOCAL: the client library raised
    details: str
    #: `ErrorInfo.reason` from the proxy's status details; None when the backend answered.
    reason: str | None
    response: Any = None

    def describe(self) -> str:
        if self.code == OK:
            return "OK"
        if self.code == LOCAL:
            return f"{self.reason} before sending: {self.details}"
        if not self.reason:
            return f"{self.code.name}: {self.details}"
        message = self.details.removeprefix(f"{self.reason}: ")
        return f"{self.code.name} [{self.reason}]: {message}"


def call(
    method: Callable[..., Any],
    request: Any,
    token: str | None = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> Outcome:
    """One call; `token`: sent as it is (the session leaves a call that carries its own
    `authorization` alone), to show what the proxy does with the wrong token."""
    md = [*metadata, *([("authorization", f"Bearer {token}")] if token else [])]
    try:
        response, _ = method.with_call(request, metadata=md, timeout=CALL_TIMEOUT)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", denial_reason(e))
    except ClientAuthError as e:  # the client library refused before sending anything
        return Outcome(LOCAL, str(e), type(e).__name__)
    return Outcome(OK, "", None, response)


def done(action: Callable[[], Any]) -> Outcome:
    """A session operation (login, verify_2fa, refresh, logout) as an outcome."""
    try:
        return Outcome(OK, "", None, action())
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", denial_reason(e))
    except ClientAuthError as e:
        return Outcome(LOCAL, str(e), type(e).__name__)


class StepFailed(Exception):
    pass


class Steps:
    def __init__(self) -> None:
        self.number = 0

    def expect(
        self,
        title: str,
        outcome: Outcome,
        code: grpc.StatusCode | str = OK,
        reason: str | None = None,
        details: str | None = None,
        show: Callable[[Any], str] | None = None,
    ) -> Any:
        """Print the step; raise StepFailed unless the outcome is the expected one."""
        self.number += 1
        problem = None
        if outcome.code != code:
            problem = f"expected {getattr(code, 'name', code)}, got {outcome.describe()}"
        elif reason is not None and outcome.reason != reason:
            problem = f"expected reason {reason}, got {outcome.reason or 'none'}"
        elif details is not None and details not in outcome.details:
            problem = f"expected the message to say {details!r}, got {outcome.details!r}"
        if problem is None and outcome.code == OK and show is not None:
            try:
                text = show(outcome.response)
            except AssertionError as e:
                problem = f"unexpected answer: {e}"
            else:
                print(f"{PASS} {self.number:2}. {title} → OK: {text}", flush=True)
                return outcome.response
        if problem is not None:
            print(f"{FAIL} {self.number:2}. {title} → {problem}", flush=True)
            raise StepFailed(f"step {self.number} ({title}): {problem}")
        print(f"{PASS} {self.number:2}. {title} → {outcome.describe()}", flush=True)
        return outcome.response


# --- the tour --------------------------------------------------------------------------


def tour(target: str, admin: str, admin_token: str) -> None:
    """The tour. Good clients use the client library (`proxy.client`): an `AuthSession`
    whose channel attaches, for each method, the token the proxy's own policy asks for
    (fetched from the proxy's admin API, with its admin secret). Calls with a hand-picked
    token show what the proxy does with the wrong one."""
    levels = MethodLevels.from_admin(f"http://{admin}", admin_token=admin_token)
    with AuthSession(target, levels, timeout=CALL_TIMEOUT) as session:
        channel = session.channel
        auth = api_pb2_grpc.AuthServiceStub(channel)
        users = api_pb2_grpc.UserServiceStub(channel)
        data = api_pb2_grpc.DataServiceStub(channel)
        tokens = session.store
        step = Steps().expect
        email, password = "alice@example.com", secrets.token_urlsafe(12)

        step(
            "SearchPublicUsers without a token (public)",
            call(users.SearchPublicUsers, api_pb2.SearchRequest(query="")),
            show=lambda r: f"{r.total_count} users",
        )
        step(
            "GetProfile through the client library before logging in",
            call(users.GetProfile, api_pb2.GetProfileRequest()),
            LOCAL,
            "NoTokenError",
        )
        with grpc.insecure_channel(target) as plain:  # a client without the library
            step(
                "GetProfile without a token",
                call(api_pb2_grpc.UserServiceStub(plain).GetProfile, api_pb2.GetProfileRequest()),
                UNAUTH,
                "TOKEN_MISSING",
            )
        signup = api_pb2.SignUpRequest(
            email=email, password=password, username="alice", enable_2fa=True
        )
        created = step(
            "SignUp with 2FA (TOTP)",
            call(auth.SignUp, signup),
            show=lambda r: _need(r.otpauth_uri, "no otpauth URI") or f"user_id={r.user_id}",
        )
        step(
            "Login with the password",
            done(lambda: session.login(email, password)),
            show=lambda r: (
                _need(r.requires_2fa and tokens.get("2fa"), "no 2FA token")
                or f"requires_2fa=true, the session keeps the 2FA token ({r.expires_in}s)"
            ),
        )
        two_fa = tokens.get("2fa").value
        step(
            "GetProfile with the 2FA token",
            call(users.GetProfile, api_pb2.GetProfileRequest(), two_fa),
            UNAUTH,
            "WRONG_TOKEN_TYPE",
        )
        code = pyotp.parse_uri(created.otpauth_uri).now()
        step(
            f"Verify2FA with TOTP code {code} (the session sends the 2FA token)",
            done(lambda: session.verify_2fa(code)),
            show=lambda _: (
                _need(tokens.get("access") and not tokens.get("2fa"), "no access token")
                or "the session now holds an access token + a refresh token"
            ),
        )
        saw = f"backend saw x-auth-subject={created.user_id}"
        step(
            "GetProfile with the access token",
            call(users.GetProfile, api_pb2.GetProfileRequest()),
            show=lambda r: _need(r.user_id == created.user_id, "wrong profile") or saw,
        )
        step(
            "GetProfile naming another user (policy: request user_id = the caller's sub,"
            " unless admin)",
            call(users.GetProfile, api_pb2.GetProfileRequest(user_id="someone-else")),
            DENIED,
            "FIELD_MISMATCH",
        )
        forged = [("x-auth-subject", "root"), ("x-auth-roles", "admin")]
        step(
            "GetProfile with forged x-auth-subject/x-auth-roles headers",
            call(users.GetProfile, api_pb2.GetProfileRequest(), metadata=forged),
            show=lambda r: (
                _need(r.user_id == created.user_id, "forged identity got through")
                or f"stripped by the proxy; {saw}"
            ),
        )
        step(
            "ListUsers as a non-admin (policy: role admin)",
            call(users.ListUsers, api_pb2.ListUsersRequest()),
            DENIED,
            "INSUFFICIENT_ROLE",
        )
        first_access, first_refresh = tokens.get("access").value, tokens.get("refresh").value
        step(
            "RefreshToken with the access token",
            call(auth.RefreshToken, api_pb2.RefreshTokenRequest(), first_access),
            UNAUTH,
            "WRONG_TOKEN_TYPE",
        )
        step(
            "RefreshToken with the refresh token (session.refresh)",
            done(session.refresh),
            show=lambda _: (
                _need(tokens.get("refresh").value != first_refresh, "not rotated")
                or "new access token + new refresh token (rotated), kept by the session"
            ),
        )
        step(
            "GetProfile with the new access token",
            call(users.GetProfile, api_pb2.GetProfileRequest()),
            show=lambda r: _need(r.user_id == created.user_id, "wrong profile") or saw,
        )
        record = step(
            "CreateRecord",
            call(data.CreateRecord, api_pb2.CreateRecordRequest(data="hello")),
            show=lambda r: (
                _need(r.owner == created.user_id, "wrong owner")
                or f"record {r.id} owned by {r.owner}"
            ),
        )
        step(
            "ListRecords",
            call(data.ListRecords, api_pb2.ListRecordsRequest()),
            show=lambda r: (
                _need([x.id for x in r.records] == [record.id], "wrong records")
                or f"{r.total_count} record(s), all owned by the caller"
            ),
        )
        step(
            "RefreshToken with the first, already used refresh token",
            call(auth.RefreshToken, api_pb2.RefreshTokenRequest(), first_refresh),
            UNAUTH,
            details="refresh token already used",
        )
        step(
            "/admin.v1.Ops/Shutdown (policy: deny; the session sends no token)",
            call(channel.unary_unary("/admin.v1.Ops/Shutdown"), b""),
            DENIED,
            "METHOD_DENIED",
        )
        last_access = tokens.get("access").value
        step(
            "Logout (the backend revokes the access token at the proxy's admin API)",
            done(session.logout),
            show=lambda _: _need(not session.logged_in, "tokens kept") or "the session is empty",
        )
        step(
            "GetProfile with the logged-out access token",
            call(users.GetProfile, api_pb2.GetProfileRequest(), last_access),
            UNAUTH,
            "TOKEN_REVOKED",
        )
        _admin_steps(target, levels, step)

        # Login is rate limited per client address (policy: 10/minute). Wrong passwords
        # count too: the proxy counts calls it lets through, whatever the backend answers.
        wrong = api_pb2.LoginRequest(email=email, password="not-the-password")
        attempts = 0
        outcome = call(auth.Login, wrong)
        while outcome.code == grpc.StatusCode.UNAUTHENTICATED and attempts < LOGIN_LIMIT:
            attempts += 1
            outcome = call(auth.Login, wrong)
        step(
            f"Login with a wrong password, attempt {attempts + 1} (policy: 10 logins a minute"
            " per client address, the ones above included)",
            outcome,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
        )


def _admin_steps(target: str, levels: MethodLevels, step: Callable[..., Any]) -> None:
    """An admin on two devices (two sessions), and logging out on all of them."""
    admin_password = secrets.token_urlsafe(12)
    with (
        AuthSession(target, levels, timeout=CALL_TIMEOUT) as admin,
        AuthSession(target, levels, timeout=CALL_TIMEOUT) as second,
    ):
        auth = api_pb2_grpc.AuthServiceStub(admin.channel)
        users = api_pb2_grpc.UserServiceStub(admin.channel)
        second_users = api_pb2_grpc.UserServiceStub(second.channel)
        signup = api_pb2.SignUpRequest(email=ADMIN_EMAIL, password=admin_password)
        step(
            f"SignUp {ADMIN_EMAIL} without 2FA (an --admin-email)",
            call(auth.SignUp, signup),
            show=lambda r: f"user_id={r.user_id}",
        )
        step(
            "Login as the admin",
            done(lambda: admin.login(ADMIN_EMAIL, admin_password)),
            show=lambda r: (
                _need(not r.requires_2fa and admin.store.get("access"), "no access token")
                or "access token + refresh token right away (no 2FA)"
            ),
        )
        step(
            "ListUsers as the admin",
            call(users.ListUsers, api_pb2.ListUsersRequest()),
            show=lambda r: f"{r.total_count} users, requested_by={r.requested_by}",
        )
        step(
            "Login as the admin on a second device",
            done(lambda: second.login(ADMIN_EMAIL, admin_password)),
            show=lambda _: _need(second.logged_in, "no access token") or "another access token",
        )
        step(
            "Logout on all devices (every token of the admin is revoked at the proxy)",
            done(lambda: admin.logout(all_devices=True)),
        )
        step(
            "ListUsers with the second device's access token",
            call(second_users.ListUsers, api_pb2.ListUsersRequest()),
            UNAUTH,
            "TOKEN_REVOKED",
        )
        step(
            "Login as the admin again, right away",
            done(lambda: admin.login(ADMIN_EMAIL, admin_password)),
            show=lambda _: _need(admin.logged_in, "no access token") or "a new access token",
        )
        step(
            "ListUsers with the new access token",
            call(users.ListUsers, api_pb2.ListUsersRequest()),
            show=lambda r: f"{r.total_count} users (issued after the logout: accepted)",
        )


def _need(condition: Any, message: str) -> str:
    """Fail the step with `message` unless `condition`; else "" (so `_need(...) or text`)."""
    if not condition:
        raise AssertionError(message)
    return ""


# --- running it ------------------------------------------------------------------------


def run(keep_running: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="authproxy-demo-") as tmp:
        workdir = Path(tmp)
        print(f"demo: keys and logs in {workdir}", flush=True)
        keygen("ES256", workdir / "signing.pem", workdir / "jwks.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
        env[SECRET_ENV] = secrets.token_urlsafe(48)
        env[ADMIN_TOKEN_ENV] = secrets.token_urlsafe(32)
        children = Children(workdir, env)
        try:
            return _run(children, workdir, keep_running)
        except DemoError as e:
            print(f"demo: error: {e}", file=sys.stderr)
            report = children.report()
            if report:
                print(report, file=sys.stderr)
            return 1
        finally:
            children.stop()


def _policy_tests() -> None:
    """Each policy's own tests, as the proxy runs them before it loads the policy."""
    for policy in (POLICY, MULTI_TENANT):
        done = subprocess.run(
            [sys.executable, "-m", "authproxy", "policy", "test", str(policy.relative_to(REPO))],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip
        if done.returncode != 0:
            raise DemoError(f"the tests of {policy.name} failed:\n{done.stdout}{done.stderr}")
        print(f"demo: authproxy policy test {policy.relative_to(REPO)}", flush=True)
        for line in done.stdout.splitlines():
            print(f"  {line}", flush=True)
    print(flush=True)


def _run(children: Children, workdir: Path, keep_running: bool) -> int:
    _policy_tests()
    deadline = time.monotonic() + STARTUP_SECONDS
    admin = f"127.0.0.1:{free_port()}"  # the proxy's admin API, which the backend calls
    # fmt: off
    children.start("backend", [
        "-m", "examples.backend", "--listen", "127.0.0.1:0", "--policy", str(POLICY),
        "--signing-key", str(workdir / "signing.pem"), "--refresh-secret-env", SECRET_ENV,
        "--admin-email", ADMIN_EMAIL,
        "--proxy-admin", f"http://{admin}", "--proxy-admin-token-env", ADMIN_TOKEN_ENV,
    ])
    backend_port = wait_for_backend(children, deadline)
    proxy_port = free_port()
    children.start("proxy", [
        "-m", "authproxy", "serve", "--policy", str(POLICY),
        "--listen", f"127.0.0.1:{proxy_port}", "--upstream", f"127.0.0.1:{backend_port}",
        "--jwks", str(workdir / "jwks.json"), "--hmac-secret-env", f"refresh-hmac={SECRET_ENV}",
        "--admin", admin, "--admin-token-env", ADMIN_TOKEN_ENV,
    ])
    # fmt: on
    target = f"127.0.0.1:{proxy_port}"
    wait_for_proxy(children, target, deadline)
    print(
        f"demo: backend on 127.0.0.1:{backend_port}, proxy on {target}, "
        f"proxy admin API on {admin}\n",
        flush=True,
    )
    try:
        tour(target, admin, children.env[ADMIN_TOKEN_ENV])
    except StepFailed as e:
        print(f"\ndemo: FAILED at {e}", file=sys.stderr)
        report = children.report()
        if report:
            print(report, file=sys.stderr)
        return 1
    print(f"\ndemo: every step behaved as expected {PASS}", flush=True)
    if keep_running:
        print(f"demo: still running; call the proxy at {target}. Ctrl-C stops.", flush=True)
        while True:
            children.check_alive()
            time.sleep(0.5)
    return 0


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__)
    parser.add_argument(
        "--keep-running", action="store_true", help="leave the backend and proxy up afterwards"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args.keep_running)
    except KeyboardInterrupt:
        print("\ndemo: interrupted; stopped the backend and the proxy", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
