"""AuthService: the token issuer. Accounts, passwords, TOTP, and the tokens the proxy checks.

Which token each method needs is the proxy's business (policy.yaml): Verify2FA and
ResendCode see only verified 2FA tokens, RefreshToken only verified refresh tokens,
Logout and ChangePassword only access tokens. This service reads who the caller is from
the proxy's identity headers and decides what only the issuer can know: is the TOTP code
right, has this refresh token been used, did the user log out since.

Logouts reach the proxy too (with `revocations`, the backend's `--proxy-admin`): Logout
revokes the access token in hand, Logout on all devices and ChangePassword every token of
the user, before the session ledger forgets anything. If the proxy does not confirm, the
call fails with UNAVAILABLE and nothing is changed here, so nobody is told they are logged
out while the proxy still accepts their token. Without `revocations`, access tokens stay
valid until they expire; the ledger still ends the refresh tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc
from google.protobuf import empty_pb2

from examples.backend import twofactor
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from examples.backend.identity import Caller, abort, require_caller
from examples.backend.passwords import Passwords
from examples.backend.revocations import ProxyRevocations, RevocationFailed
from examples.backend.sessions import LOGGED_OUT, SessionLedger
from examples.backend.store import AlreadyExists, Store, User, normalize_email
from examples.backend.tokens import REFRESH_TTL, Revoked, Tokens
from examples.backend.validation import email_problem, password_problem, username_problem

log = logging.getLogger("example.auth")

INVALID_LOGIN = "invalid email or password"
INVALID_CODE = "invalid 2FA code"
EMAIL_TAKEN = "an account with this email exists"
UNKNOWN_USER = "the account no longer exists"
SPENT_2FA_TOKEN = "this 2FA token cannot be used again; log in again"
REVOKED_2FA_TOKEN = "this 2FA token was revoked by a logout; log in again"
RESET_MESSAGE = "if an account exists for that email, password reset instructions are on their way"
NOT_LOGGED_OUT = "not logged out: the proxy could not be told to revoke the tokens; try again"
PASSWORD_UNCHANGED = (
    "the password is unchanged: the proxy could not be told to revoke your tokens; try again"
)
NO_JTI = "this access token has no 'jti' and 'exp', so it cannot be revoked on its own; log out of all devices"


class AuthService(api_pb2_grpc.AuthServiceServicer):
    def __init__(
        self,
        store: Store,
        tokens: Tokens,
        ledger: SessionLedger,
        passwords: Passwords | None = None,
        admin_emails: Iterable[str] = (),
        revocations: ProxyRevocations | None = None,
    ) -> None:
        """`revocations`: the proxy's admin API (None: access tokens live until they expire)."""
        self.store = store
        self.tokens = tokens
        self.ledger = ledger
        self.passwords = passwords or Passwords()
        self.admin_emails = frozenset(normalize_email(e) for e in admin_emails)
        self.revocations = revocations

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
        if self.passwords.needs_rehash(password_hash):
            rehashed = await self.passwords.hash(request.password)
            if user.password_hash == password_hash:
                user.password_hash = password_hash = rehashed
        if user.totp_secret:
            temp = await self.tokens.two_factor(user.user_id)
            await self._still_valid(context, user, password_hash)
            return api_pb2.LoginResponse(
                requires_2fa=True, temp_token=temp.token, expires_in=temp.expires_in
            )
        pair = await self._new_pair(context, user, self.ledger.new_session())
        await self._still_valid(context, user, password_hash)
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
        return await self._new_pair(
            context, user, self.ledger.new_session(), caller, REVOKED_2FA_TOKEN
        )

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
        session = sid if isinstance(sid, str) else self.ledger.new_session()
        return await self._new_pair(context, user, session, caller, LOGGED_OUT)

    # --- access token ------------------------------------------------------------------

    async def Logout(
        self, request: api_pb2.LogoutRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        """End this session, or with `all_devices` every session of the caller.

        The proxy verifies access tokens without asking the issuer, so it is told first:
        it revokes the access token in hand (by `jti`, until it would expire), or with
        `all_devices` every token of the caller issued so far. Then the ledger ends the
        session's refresh tokens (or all of them). Without `revocations` only the ledger
        is updated and the access token stays valid until it expires.
        """
        caller = await require_caller(context)
        if request.all_devices:
            try:
                await self._logout_everywhere(caller.subject)
            except RevocationFailed as e:
                log.error("logout of %s on all devices failed: %s", caller.subject, e)
                await abort(context, grpc.StatusCode.UNAVAILABLE, NOT_LOGGED_OUT)
            log.info("logged out %s on all devices", caller.subject)
        else:
            try:
                await self._revoke_access_token(context, caller)
            except RevocationFailed as e:
                log.error("logout of %s failed: %s", caller.subject, e)
                await abort(context, grpc.StatusCode.UNAVAILABLE, NOT_LOGGED_OUT)
            sid = caller.claims.get("sid")
            if isinstance(sid, str):
                self.ledger.end_session(sid, keep_for=REFRESH_TTL)
        return empty_pb2.Empty()

    async def ChangePassword(
        self, request: api_pb2.ChangePasswordRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ChangePasswordResponse:
        """Set a new password and log out everywhere: every token issued so far is revoked.

        The new password is in force before the proxy is told, so a login with the old one
        that is still in flight cannot mint a token that outlives the change (Login checks
        the password is unchanged once its tokens are minted). If the proxy cannot be told,
        the old password is put back and the call fails with UNAVAILABLE.
        """
        caller = await require_caller(context)
        user = await self._user(context, caller.subject)
        problem = password_problem(request.new_password)
        if problem:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        if not await self.passwords.verify(user.password_hash, request.old_password):
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "the current password is wrong")
        new_hash = await self.passwords.hash(request.new_password)
        old_hash, user.password_hash = user.password_hash, new_hash
        try:
            await self._logout_everywhere(caller.subject)
        except RevocationFailed as e:
            log.error("password change of %s failed: %s", caller.subject, e)
            if user.password_hash == new_hash:
                user.password_hash = old_hash
            await abort(context, grpc.StatusCode.UNAVAILABLE, PASSWORD_UNCHANGED)
        log.info("changed the password of %s and logged it out everywhere", caller.subject)
        return api_pb2.ChangePasswordResponse(
            message="password changed; every session is logged out, log in again"
        )

    # --- helpers -----------------------------------------------------------------------

    async def _still_valid(
        self, context: grpc.aio.ServicerContext, user: User, password_hash: str
    ) -> None:
        """After minting (which may wait, see `Tokens.revoking`): refuse the login if the
        account was deleted or its password changed meanwhile, so no token minted for the
        old password outlives a password change."""
        if self.store.user(user.user_id) is not user or user.password_hash != password_hash:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, INVALID_LOGIN)

    async def _user(self, context: grpc.aio.ServicerContext, subject: str) -> User:
        user = self.store.user(subject)
        if user is None:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, UNKNOWN_USER)
        return user

    async def _revoke_access_token(self, context: grpc.aio.ServicerContext, caller: Caller) -> None:
        """Have the proxy refuse the caller's access token (the proxy keeps the record past
        its `exp` for as long as any leeway accepts it); RevocationFailed if the proxy did
        not confirm."""
        if self.revocations is None:
            return
        exp = caller.claims.get("exp")
        if not caller.jti or isinstance(exp, bool) or not isinstance(exp, int | float):
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, NO_JTI)
        await self.revocations.revoke_token(caller.jti, exp)
        log.info("revoked access token %s of %s at the proxy", caller.jti, caller.subject)

    async def _logout_everywhere(self, subject: str) -> None:
        """End every token of `subject` minted so far: at the proxy, then in the ledger.

        The proxy revokes with a `before` from `Tokens.revoking`, which also makes sure no
        token minted afterwards falls under it — a login right after, even within the same
        second, keeps working. RevocationFailed if the proxy did not confirm; nothing has
        changed then.
        """
        if self.revocations is None:
            self.ledger.logout_all(subject)
            return
        async with self.tokens.revoking(subject) as before:
            await self.revocations.revoke_subject(subject, before)
            self.ledger.logout_all(subject, before)
        log.info("revoked every token of %s issued before %d at the proxy", subject, before)

    async def _new_pair(
        self,
        context: grpc.aio.ServicerContext,
        user: User,
        session_id: str,
        exchanged: Caller | None = None,
        revoked: str = "",
    ) -> api_pb2.TokenResponse:
        """A new pair for `user`; `exchanged`: the caller of a token exchange (refresh or
        2FA token), refused with `revoked` if a logout everywhere caught that token while
        this call was under way (see `Tokens.revoking`)."""
        exchanged_iat = None
        if exchanged is not None:  # like the proxy: a token without `iat` counts as older
            iat = exchanged.claims.get("iat")
            exchanged_iat = float(iat) if isinstance(iat, int | float) else 0.0
        try:
            pair = await self.tokens.pair(user.user_id, user.roles, session_id, exchanged_iat)
        except Revoked:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, revoked)
        self.ledger.minted_refresh(user.user_id, pair.refresh)
        return api_pb2.TokenResponse(
            access_token=pair.access.token,
            refresh_token=pair.refresh.token,
            expires_in=pair.access.expires_in,
        )
