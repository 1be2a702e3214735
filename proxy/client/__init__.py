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

See the README's "Python client" section.
"""

from .errors import (
    ClientAuthError,
    LoginRequiredError,
    NoTokenError,
    RefreshError,
    denial_reason,
)
from .interceptors import SyncInterceptor, TokenChooser, aio_interceptors
from .levels import MethodLevels
from .refresh import DEFAULT_SKEW, Refresher
from .session import AsyncAuthSession, AuthMethods, AuthSession, LoginResult
from .tokens import StoredToken, TokenStore

__all__ = [
    "DEFAULT_SKEW",
    "AsyncAuthSession",
    "AuthMethods",
    "AuthSession",
    "ClientAuthError",
    "LoginRequiredError",
    "LoginResult",
    "MethodLevels",
    "NoTokenError",
    "RefreshError",
    "Refresher",
    "StoredToken",
    "SyncInterceptor",
    "TokenChooser",
    "TokenStore",
    "aio_interceptors",
    "denial_reason",
]
