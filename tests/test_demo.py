"""`python -m examples.demo` end to end: the example backend behind the real proxy CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_every_step_through_the_proxy_and_exits_zero():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=REPO,
        env={**env, "PYTHONIOENCODING": "utf-8"},
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=100,
    )
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{done.stderr}"
    assert "✘" not in out
    assert "every step behaved as expected" in out

    signup = re.search(r"SignUp with 2FA \(TOTP\) → OK: user_id=(\S+)", out)
    assert signup, out
    subject = signup.group(1)
    lines = out.splitlines()

    def line(title: str) -> str:
        found = [x for x in lines if f". {title} → " in x]
        assert len(found) == 1, (title, out)
        return found[0]

    # The client library (proxy.client) sends nothing for a method it holds no token for.
    local = line("GetProfile through the client library before logging in")
    assert "NoTokenError before sending" in local
    assert "needs a token of level 'access'" in local
    assert "UNAUTHENTICATED [TOKEN_MISSING]" in line("GetProfile without a token")
    assert "requires_2fa=true" in line("Login with the password")
    wrong_type = line("GetProfile with the 2FA token")
    assert "UNAUTHENTICATED [WRONG_TOKEN_TYPE]" in wrong_type
    assert "needs an access token" in wrong_type
    assert f"backend saw x-auth-subject={subject}" in line("GetProfile with the access token")
    forged = line("GetProfile with forged x-auth-subject/x-auth-roles headers")
    assert f"backend saw x-auth-subject={subject}" in forged
    assert "PERMISSION_DENIED [INSUFFICIENT_ROLE]" in line(
        "ListUsers as a non-admin (policy: role admin)"
    )
    assert "UNAUTHENTICATED [WRONG_TOKEN_TYPE]" in line("RefreshToken with the access token")
    assert "rotated" in line("RefreshToken with the refresh token (session.refresh)")
    assert f"x-auth-subject={subject}" in line("GetProfile with the new access token")
    assert f"owned by {subject}" in line("CreateRecord")
    assert "refresh token already used" in line(
        "RefreshToken with the first, already used refresh token"
    )
    assert "PERMISSION_DENIED [METHOD_DENIED]" in line(
        "/admin.v1.Ops/Shutdown (policy: deny; the session sends no token)"
    )

    def number(title: str) -> int:
        found = re.search(r"(\d+)\. ", line(title))
        assert found, title
        return int(found.group(1))

    logout = "Logout (the backend revokes the access token at the proxy's admin API)"
    revoked = "GetProfile with the logged-out access token"
    assert line(logout).endswith("→ OK: the session is empty")
    assert "UNAUTHENTICATED [TOKEN_REVOKED]" in line(revoked)
    assert number(revoked) == number(logout) + 1
    assert "2 users" in line("ListUsers as the admin")
    logout_all = "Logout on all devices (every token of the admin is revoked at the proxy)"
    second_device = "ListUsers with the second device's access token"
    assert line(logout_all).endswith("→ OK")
    assert "UNAUTHENTICATED [TOKEN_REVOKED]" in line(second_device)
    assert number(second_device) == number(logout_all) + 1
    assert "2 users" in line("ListUsers with the new access token")
    limited = [x for x in lines if ". Login with a wrong password, attempt " in x]
    assert len(limited) == 1, out
    assert "RESOURCE_EXHAUSTED [RATE_LIMITED]" in limited[0]
    # Ten logins a minute per client address: the four successful ones plus six wrong ones.
    assert "attempt 7 " in limited[0]
