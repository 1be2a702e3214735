"""AuthService: the token issuer. Accounts, passwords, TOTP, and the tokens the proxy checks.

Which token each method needs is the proxy's business (policy.yaml): Verify2FA and
ResendCode see only verified 2FA tokens, RefreshToken only verified refresh tokens,
Logout and ChangePassword only access tokens. This service reads who the caller is from
the proxy's identity headers and decides what only the issuer can know: is the TOTP code
right, has this refresh token been used, did the user log out since.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc
from google.protobuf import empty_pb2

from examples.backend import twofactor
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from examples.backend.identity import abort, require_caller
from examples.backend.passwords import Passwords
from examples.backend.sessions import SessionLedger
from examples.backend.store import AlreadyExists, Store, User, normalize_email
from examples.backend.tokens import REFRESH_TTL, Tokens
from examples.backend.validation import email_problem, password_problem, username_problem

log = logging.getLogger("example.auth")

INVALID_LOGIN = "invalid email or password"
INVALID_CODE = "invalid 2FA code"
EMAIL_TAKEN = "an account with this email exists"
UNKNOWN_USER = "the account no longer exists"
SPENT_2FA_TOKEN = "this 2FA token cannot be used again; log in again"
RESET_MESSAGE = "if an account exists for that email, password reset instructions are on their way"


class AuthService(api_pb2_grpc.AuthServiceServicer):
    def __init__(
        self,
        store: Store,
        tokens: Tokens,
        ledger: SessionLedger,
        passwords: Passwords | None = None,
        admin_emails: Iterable[str] = (),
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.ledger = ledger
        self.passwords = passwords or Passwords()
        self.admin_emails = frozenset(normalize_email(e) for e in admin_emails)

    # --- public ------------------------------------------------------------------------

    async def SignUp(
        self, request: api_pb2.SignUpRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.SignUpResponse:
        email = normalize_email(request.email)
        username = request.username.strip() or email.partition("@")[0]
        problem = (
            email_problem(email) or password_problem(request.password) or username_problem(username)
        )
        if problem:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.store.user_by_email(email) is not None:
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, EMAIL_TAKEN)
        password_hash = await self.passwords.hash(request.password)
        secret = twofactor.new_secret() if request.enable_2fa else None
        roles = ("user", "admin") if email in self.admin_emails else ("user",)
        try:
            user = self.store.add_user(email, username, password_hash, roles, secret)
        except AlreadyExists:  # signed up by a concurrent call while we hashed
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, EMAIL_TAKEN)
        log.info("signed up %s (2FA %s)", user.user_id, "on" if secret else "off")
        if secret is None:
            return api_pb2.SignUpResponse(user_id=user.user_id, message="account created")
        return api_pb2.SignUpResponse(
            user_id=user.user_id,
            message="account created; add the otpauth URI to an authenticator app",
            otpauth_uri=twofactor.provisioning_uri(secret, email),
        )

    async def InitiatePasswordReset(
        self, request: api_pb2.PasswordResetRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PasswordResetResponse:
        # The example sends no mail. The answer never tells whether the email has an account.
        return api_pb2.PasswordResetResponse(message=RESET_MESSAGE)

    async def HealthCheck(
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> api_pb2.HealthCheckResponse:
        return api_pb2.HealthCheckResponse(status="SERVING")

    async def Login(
        self, request: api_pb2.LoginRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.LoginResponse:
        user = self.store.user_by_email(request.email)
        if user is None:
            await self.passwords.verify_nobody(request.password)
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, INVALID_LOGIN)
        password_hash = user.password_hash
        if not await self.passwords.verify(password_hash, request.password):
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, INVALID_LOGIN)
        if self.store.user(user.user_id) is not user:  # deleted while we checked
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, INVALID_LOGIN)
        if self.passwords.needs_rehash(password_hash) and user.password_hash == password_hash:
            user.password_hash = await self.passwords.hash(request.password)
        if user.totp_secret:
            temp = self.tokens.two_factor(user.user_id)
            return api_pb2.LoginResponse(
                requires_2fa=True, temp_token=temp.token, expires_in=temp.expires_in
            )
        pair = self._new_pair(user, self.ledger.new_session())
        return api_pb2.LoginResponse(
            access_token=pair.access_token,
            refresh_token=pair.refresh_token,
            expires_in=pair.expires_in,
        )

    # --- 2FA token ---------------------------------------------------------------------

    async def Verify2FA(
        self, request: api_pb2.Verify2FARequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.TokenResponse:
        caller = await require_caller(context)
        user = await self._user(context, caller.subject)
        if not user.totp_secret:
            await abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, "this account has no 2FA enrolled"
            )
        exp = float(caller.claims.get("exp", 0))
        if not self.ledger.two_factor_open(caller.jti):
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, SPENT_2FA_TOKEN)
        step = twofactor.accepted_step(user.totp_secret, request.code, user.totp_last_step)
        if step is None:
            self.ledger.two_factor_failed(caller.jti, exp)
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, INVALID_CODE)
        user.totp_last_step = step
        self.ledger.two_factor_spent(caller.jti, exp)
        return self._new_pair(user, self.ledger.new_session())

    async def ResendCode(
        self, request: api_pb2.ResendCodeRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ResendCodeResponse:
        await require_caller(context)
        return api_pb2.ResendCodeResponse(
            message="this account uses an authenticator app (TOTP): there is no code to send; "
            "enter the code the app shows now"
        )

    # --- refresh token -----------------------------------------------------------------

    async def RefreshToken(
        self, request: api_pb2.RefreshTokenRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.TokenResponse:
        """Rotation: the refresh token is spent and a new access + refresh pair issued."""
        caller = await require_caller(context)
        user = await self._user(context, caller.subject)
        problem = self.ledger.use_refresh(caller.subject, caller.jti, caller.claims)
        if problem:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, problem)
        sid = caller.claims.get("sid")
        return self._new_pair(user, sid if isinstance(sid, str) else self.ledger.new_session())

    # --- access token ------------------------------------------------------------------

    async def Logout(
        self, request: api_pb2.LogoutRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        """End this session's refresh tokens, or with `all_devices` every session's.

        The access token in hand stays valid until it expires: the proxy verifies access
        tokens without asking the issuer. Revoking them is the proxy's shared-state job.
        """
        caller = await require_caller(context)
        if request.all_devices:
            self.ledger.logout_all(caller.subject)
        else:
            sid = caller.claims.get("sid")
            if isinstance(sid, str):
                self.ledger.end_session(sid, keep_for=REFRESH_TTL)
        return empty_pb2.Empty()

    async def ChangePassword(
        self, request: api_pb2.ChangePasswordRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ChangePasswordResponse:
        caller = await require_caller(context)
        user = await self._user(context, caller.subject)
        problem = password_problem(request.new_password)
        if problem:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        if not await self.passwords.verify(user.password_hash, request.old_password):
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "the current password is wrong")
        user.password_hash = await self.passwords.hash(request.new_password)
        self.ledger.logout_all(caller.subject)
        return api_pb2.ChangePasswordResponse(
            message="password changed; every session is logged out, log in again"
        )

    # --- helpers -----------------------------------------------------------------------

    async def _user(self, context: grpc.aio.ServicerContext, subject: str) -> User:
        user = self.store.user(subject)
        if user is None:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, UNKNOWN_USER)
        return user

    def _new_pair(self, user: User, session_id: str) -> api_pb2.TokenResponse:
        pair = self.tokens.pair(user.user_id, user.roles, session_id)
        self.ledger.minted_refresh(user.user_id, pair.refresh)
        return api_pb2.TokenResponse(
            access_token=pair.access.token,
            refresh_token=pair.refresh.token,
            expires_in=pair.access.expires_in,
        )
