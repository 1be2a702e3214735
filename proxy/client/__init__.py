"""The Python client library: the right token for each method, automatic refresh, and
the 2FA flow, driven by the same policy file the proxy enforces.

    from authproxy.client import AsyncAuthSession, MethodLevels

    levels = MethodLevels.from_file("policy.yaml")     # or .from_admin("http://proxy:9901")
    async with AsyncAuthSession("proxy:8080", levels) as session:
        if (await session.login(email, password)).requires_2fa:
            await session.verify_2fa(input("code: "))
        users = UserServiceStub(session.channel)      # each call gets the token its level needs
        profile = await users.GetProfile(GetProfileRequest())
        await session.logout()

Levels are `Level.PUBLIC`, `Level.TWO_FA`, `Level.REFRESH`, `Level.ACCESS`, `Level.DENY`
(equal to the policy's strings). Errors: `ClientAuthError`, with `LoginRequiredError`
(and its `NoTokenError`) and `RefreshError` under it. See the README's "Python client"
section.
"""

from .channels import reconnect_options
from .errors import (
    ClientAuthError,
    LoginRequiredError,
    NoTokenError,
    RefreshError,
    denial_reason,
    is_token_expired,
)
from .interceptors import SyncInterceptor, TokenChooser, aio_interceptors
from .levels import TOKEN_KINDS, Level, MethodLevels
from .refresh import (
    DEFAULT_SKEW,
    FIRST_RETRY,
    MAX_RETRY,
    WINDOW_FRACTION,
    AsyncRefreshCall,
    Refresher,
    SyncRefreshCall,
)
from .session import DEFAULT_TIMEOUT, AsyncAuthSession, AuthMethods, AuthSession, LoginResult
from .tokens import StoredToken, TokenStore, expiry_of

__all__ = [
    "DEFAULT_SKEW",
    "DEFAULT_TIMEOUT",
    "FIRST_RETRY",
    "MAX_RETRY",
    "TOKEN_KINDS",
    "WINDOW_FRACTION",
    "AsyncAuthSession",
    "AsyncRefreshCall",
    "AuthMethods",
    "AuthSession",
    "ClientAuthError",
    "Level",
    "LoginRequiredError",
    "LoginResult",
    "MethodLevels",
    "NoTokenError",
    "RefreshError",
    "Refresher",
    "StoredToken",
    "SyncInterceptor",
    "SyncRefreshCall",
    "TokenChooser",
    "TokenStore",
    "aio_interceptors",
    "denial_reason",
    "expiry_of",
    "is_token_expired",
    "reconnect_options",
]
