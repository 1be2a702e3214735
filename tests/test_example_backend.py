"""The example AuthService called directly, with the identity headers the proxy would set:
sign up, log in with and without TOTP, refresh rotation, logouts, and calls that arrive
without an identity. Every token it mints must verify with the product's verifier.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import grpc
import pyotp
import pytest
from google.protobuf import empty_pb2

from authproxy.decide.reasons import Denied, Reason
from authproxy.keys.issuer import MintedToken
from examples.backend.api.v1 import api_pb2
from examples.backend.sessions import LOGGED_OUT, MAX_2FA_FAILURES, SessionLedger
from tests.support.example_backend import (
    ADMIN_EMAIL,
    PASSWORD,
    UNAUTH,
    Example,
    decoded,
    rpc_error,
)

# --- sign up and log in ----------------------------------------------------------------


async def test_login_without_2fa_issues_access_and_refresh_tokens_the_proxy_accepts(example):
    user_id, login = await example.account("alice@example.com")
    assert not login.requires_2fa and not login.temp_token
    assert login.expires_in == 3600

    access = example.verify(login.access_token, "access").claims
    assert access["sub"] == user_id
    assert access["type"] == "access"
    assert access["aud"] == "api-access"
    assert access["iss"] == "auth-service"
    assert access["roles"] == ["user"]
    assert access["permissions"] == ["user:read", "user:write"]
    assert access["scope"] == ["read", "write"]
    assert access["exp"] - access["iat"] == 3600

    refresh = example.verify(login.refresh_token, "refresh")
    assert refresh.kid == "refresh-hmac"
    assert refresh.alg == "HS256"
    assert refresh.claims["type"] == "refresh"
    assert refresh.claims["scope"] == ["refresh_token"]
    assert refresh.claims["exp"] - refresh.claims["iat"] == 7 * 24 * 3600
    assert refresh.claims["sid"] == access["sid"]

    with pytest.raises(Denied) as wrong:
        example.verify(login.access_token, "refresh")
    assert wrong.value.reason == Reason.WRONG_TOKEN_TYPE


async def test_admin_email_gets_role_and_permission_admin(example):
    _, login = await example.account(ADMIN_EMAIL.upper())
    claims = example.verify(login.access_token, "access").claims
    assert claims["roles"] == ["user", "admin"]
    assert "admin:read" in claims["permissions"]


async def test_signup_rejects_an_email_already_registered_in_any_case(example):
    await example.signup("bob@example.com")
    error = await rpc_error(example.signup(" BOB@Example.com "))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("email", "password", "problem"),
    [("not-an-email", PASSWORD, "email"), ("carol@example.com", "short", "8 characters")],
)
async def test_signup_rejects_bad_input(example, email, password, problem):
    request = api_pb2.SignUpRequest(email=email, password=password)
    error = await rpc_error(example.auth.SignUp(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in error.details()


async def test_login_failures_do_not_tell_whether_the_email_exists(example):
    await example.signup("dave@example.com")
    wrong_password = await rpc_error(example.login("dave@example.com", "wrong password"))
    unknown_email = await rpc_error(example.login("nobody@example.com", PASSWORD))
    for error in (wrong_password, unknown_email):
        assert error.code() == UNAUTH
        assert error.details() == "invalid email or password"


# --- TOTP second factor ----------------------------------------------------------------


async def test_2fa_login_issues_a_2fa_token_and_a_totp_code_turns_it_into_tokens(example):
    created = await example.signup("erin@example.com", enable_2fa=True)
    assert created.otpauth_uri.startswith("otpauth://totp/")
    totp = pyotp.parse_uri(created.otpauth_uri)

    login = await example.login("erin@example.com")
    assert login.requires_2fa
    assert not login.access_token and not login.refresh_token
    assert login.expires_in == 600
    temp = example.verify(login.temp_token, "2fa").claims
    assert temp["sub"] == created.user_id
    assert temp["type"] == "2fa_pending"
    assert temp["aud"] == "2fa-verification"
    assert temp["scope"] == ["verify_2fa"]
    assert temp["2fa_method"] == "totp"
    assert temp["exp"] - temp["iat"] == 600

    md = example.md(login.temp_token, "2fa")
    wrong = "000000" if totp.now() != "000000" else "111111"
    error = await rpc_error(
        example.auth.Verify2FA(api_pb2.Verify2FARequest(code=wrong), metadata=md)
    )
    assert error.code() == UNAUTH
    assert error.details() == "invalid 2FA code"

    tokens = await example.auth.Verify2FA(api_pb2.Verify2FARequest(code=totp.now()), metadata=md)
    assert example.verify(tokens.access_token, "access").claims["sub"] == created.user_id
    assert example.verify(tokens.refresh_token, "refresh").claims["sub"] == created.user_id
    assert tokens.expires_in == 3600


async def test_a_totp_code_and_a_2fa_token_work_only_once(example):
    created = await example.signup("frank@example.com", enable_2fa=True)
    totp = pyotp.parse_uri(created.otpauth_uri)
    code = totp.now()
    first = example.md((await example.login("frank@example.com")).temp_token, "2fa")
    await example.auth.Verify2FA(api_pb2.Verify2FARequest(code=code), metadata=first)

    # The same code with a new 2FA token: refused, a TOTP code is single use.
    second = example.md((await example.login("frank@example.com")).temp_token, "2fa")
    error = await rpc_error(
        example.auth.Verify2FA(api_pb2.Verify2FARequest(code=code), metadata=second)
    )
    assert error.details() == "invalid 2FA code"

    # The spent 2FA token with the next (still acceptable) code: refused too.
    next_code = totp.at(time.time() + totp.interval)
    error = await rpc_error(
        example.auth.Verify2FA(api_pb2.Verify2FARequest(code=next_code), metadata=first)
    )
    assert error.code() == UNAUTH
    assert "cannot be used again" in error.details()


async def test_a_2fa_token_is_spent_after_too_many_wrong_codes(example):
    created = await example.signup("grace@example.com", enable_2fa=True)
    totp = pyotp.parse_uri(created.otpauth_uri)
    md = example.md((await example.login("grace@example.com")).temp_token, "2fa")
    wrong = "000000" if totp.now() != "000000" else "111111"
    for _ in range(MAX_2FA_FAILURES):
        error = await rpc_error(
            example.auth.Verify2FA(api_pb2.Verify2FARequest(code=wrong), metadata=md)
        )
        assert error.details() == "invalid 2FA code"
    error = await rpc_error(
        example.auth.Verify2FA(api_pb2.Verify2FARequest(code=totp.now()), metadata=md)
    )
    assert "cannot be used again" in error.details()


async def test_resend_code_explains_there_is_nothing_to_send_for_totp(example):
    await example.signup("heidi@example.com", enable_2fa=True)
    md = example.md((await example.login("heidi@example.com")).temp_token, "2fa")
    answer = await example.auth.ResendCode(api_pb2.ResendCodeRequest(), metadata=md)
    assert "no code to send" in answer.message


# --- refresh rotation and logout -------------------------------------------------------


async def test_refresh_rotates_the_pair_and_a_reused_refresh_token_ends_every_session(example):
    user_id, login = await example.account("ivan@example.com")
    rotated = await example.refresh(login.refresh_token)
    old, new = decoded(login.refresh_token), example.verify(rotated.refresh_token, "refresh")
    assert new.claims["jti"] != old["jti"]
    assert new.claims["sid"] == old["sid"]
    assert example.verify(rotated.access_token, "access").claims["sub"] == user_id

    reused = await rpc_error(example.refresh(login.refresh_token))
    assert reused.code() == UNAUTH
    assert reused.details() == "refresh token already used"
    # A replayed refresh token means it leaked: the rotated one is revoked as well.
    after = await rpc_error(example.refresh(rotated.refresh_token))
    assert after.details() == "refresh token was revoked by a logout"


async def test_logout_on_all_devices_revokes_every_older_refresh_token(example):
    await example.signup("judy@example.com")
    laptop = await example.login("judy@example.com")
    phone = await example.login("judy@example.com")
    md = example.md(laptop.access_token)
    await example.auth.Logout(api_pb2.LogoutRequest(all_devices=True), metadata=md)

    for device in (laptop, phone):
        error = await rpc_error(example.refresh(device.refresh_token))
        assert error.code() == UNAUTH
        assert error.details() == "refresh token was revoked by a logout"
    # Logging in again right away (likely within the same second) works.
    again = await example.login("judy@example.com")
    assert (await example.refresh(again.refresh_token)).access_token


def test_logout_cutoff_is_exact_within_its_own_second():
    """`iat` counts whole seconds: tokens from the logout's own second are told apart."""
    now = [1000.2]
    ledger = SessionLedger(clock=lambda: now[0])

    def minted(jti: str, iat: int) -> MintedToken:
        token = MintedToken("token", jti, iat + 60, 60, {"iat": iat, "exp": iat + 60})
        ledger.minted_refresh("sub", token)
        return token

    earlier, before = minted("earlier", 999), minted("before", 1000)
    now[0] = 1000.5
    ledger.logout_all("sub")
    now[0] = 1000.7
    after = minted("after", 1000)
    now[0] = 1001.1
    later = minted("later", 1001)

    assert ledger.use_refresh("sub", "earlier", earlier.claims) == LOGGED_OUT
    assert ledger.use_refresh("sub", "before", before.claims) == LOGGED_OUT
    assert ledger.use_refresh("sub", "after", after.claims) is None
    assert ledger.use_refresh("sub", "later", later.claims) is None


def test_logout_cutoff_from_a_revocation_second_is_exact():
    """With the second from which new tokens are minted (`Tokens.revoking`), every token
    before it is ended and every token from it on lives, minted in whatever order."""
    now = [1000.2]
    ledger = SessionLedger(clock=lambda: now[0])

    def claims(iat: int) -> dict[str, int]:
        return {"iat": iat, "exp": iat + 60}

    ledger.logout_all("sub", before=1001)
    now[0] = 1000.5
    ledger.logout_all("sub")  # an earlier, inexact cutoff (a reused refresh token) keeps it
    now[0] = 1001.3
    ledger.minted_refresh("sub", MintedToken("token", "next", 1061, 60, claims(1001)))
    assert ledger.use_refresh("sub", "late-1000", claims(1000)) == LOGGED_OUT
    assert ledger.use_refresh("sub", "next", claims(1001)) is None
    assert ledger.use_refresh("sub", "unrecorded", claims(1001)) is None


async def test_logout_of_one_session_leaves_the_other_sessions_alone(example):
    await example.signup("ken@example.com")
    laptop = await example.login("ken@example.com")
    phone = await example.login("ken@example.com")
    answer = await example.auth.Logout(
        api_pb2.LogoutRequest(), metadata=example.md(laptop.access_token)
    )
    assert answer == empty_pb2.Empty()
    error = await rpc_error(example.refresh(laptop.refresh_token))
    assert error.details() == "this session has been logged out"
    assert (await example.refresh(phone.refresh_token)).refresh_token


async def test_change_password_checks_the_old_one_and_logs_out_everywhere(example):
    _, login = await example.account("leo@example.com")
    md = example.md(login.access_token)
    wrong = api_pb2.ChangePasswordRequest(old_password="not it!!", new_password="new password 1")
    error = await rpc_error(example.auth.ChangePassword(wrong, metadata=md))
    assert error.code() == UNAUTH

    right = api_pb2.ChangePasswordRequest(old_password=PASSWORD, new_password="new password 1")
    await example.auth.ChangePassword(right, metadata=md)
    error = await rpc_error(example.refresh(login.refresh_token))
    assert error.details() == "refresh token was revoked by a logout"
    assert (await rpc_error(example.login("leo@example.com"))).code() == UNAUTH
    assert (await example.login("leo@example.com", "new password 1")).access_token


# --- identity from the proxy -----------------------------------------------------------


def _calls_needing_identity(example: Example) -> list[Awaitable[Any]]:
    return [
        example.auth.Verify2FA(api_pb2.Verify2FARequest(code="123456")),
        example.auth.ResendCode(api_pb2.ResendCodeRequest()),
        example.auth.RefreshToken(api_pb2.RefreshTokenRequest()),
        example.auth.Logout(api_pb2.LogoutRequest()),
        example.auth.ChangePassword(api_pb2.ChangePasswordRequest()),
        example.users.GetProfile(api_pb2.GetProfileRequest()),
        example.users.UpdateProfile(api_pb2.UpdateProfileRequest(username="x")),
        example.users.DeleteAccount(api_pb2.DeleteAccountRequest()),
        example.users.ListUsers(api_pb2.ListUsersRequest()),
        example.data.CreateRecord(api_pb2.CreateRecordRequest(data="x")),
        example.data.GetRecord(api_pb2.GetRecordRequest(id="x")),
        example.data.UpdateRecord(api_pb2.UpdateRecordRequest(id="x")),
        example.data.DeleteRecord(api_pb2.DeleteRecordRequest(id="x")),
        example.data.ListRecords(api_pb2.ListRecordsRequest()),
    ]


async def test_methods_that_need_a_caller_refuse_calls_without_proxy_identity(example):
    calls = _calls_needing_identity(example)
    errors = await asyncio.gather(*(rpc_error(c) for c in calls))
    assert len(errors) == 14
    for error in errors:
        assert error.code() == UNAUTH
        assert error.details() == "no identity from the proxy"
