"""Telling the proxy to refuse tokens: a client of its admin revocation API.

The proxy verifies access tokens on its own, without asking the issuer, so a logout in
the backend's session ledger alone leaves the access token in hand valid until it
expires. With `--proxy-admin URL` the backend posts each logout to the proxy's admin API
(`POST /v1/revocations`, see the proxy's `--admin`):

* `{"jti": ..., "exp": ...}` revokes one token (Logout);
* `{"sub": ..., "before": ...}` revokes every token of a subject issued before a time
  (Logout on all devices, ChangePassword).

The proxy answers 201 once the revocation is in force. Anything else — no connection,
no answer within the timeout, another status — is a `RevocationFailed`: the caller must
not report a logout the proxy does not know about.

Without `--proxy-admin` nothing is posted, and access tokens stay valid until they expire.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from yarl import URL

#: The whole request (connect, send, answer) must finish within this many seconds.
DEFAULT_TIMEOUT = 2.0
PATH = "v1/revocations"


class RevocationFailed(Exception):
    """The proxy did not confirm the revocation; the message says why."""


def admin_base_url(value: str) -> URL:
    """`--proxy-admin`: an http(s) URL with a host and no query; raises ValueError."""
    try:
        url = URL(value)
        url.port  # noqa: B018 - a bad port shows when it is read
    except ValueError as e:
        raise ValueError(f"--proxy-admin {value!r}: {e}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"--proxy-admin must be an http:// or https:// URL, got {value!r}")
    if url.query_string or url.fragment:
        raise ValueError(f"--proxy-admin must not have a query or fragment: {value!r}")
    return url


class ProxyRevocations:
    """Posts revocations to one proxy admin API (`base`, e.g. `http://127.0.0.1:9901`)."""

    def __init__(
        self, base: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        base_url = admin_base_url(base)
        self.url = base_url.with_path(base_url.path.rstrip("/") + "/" + PATH)
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def revoke_token(self, jti: str, exp: float) -> None:
        """Refuse the token `jti` until `exp` (unix seconds)."""
        await self._post({"jti": jti, "exp": exp})

    async def revoke_subject(self, sub: str, before: float) -> None:
        """Refuse every token of `sub` whose `iat` is before `before` (unix seconds)."""
        await self._post({"sub": sub, "before": before})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, body: dict[str, Any]) -> None:
        if self._session is None:  # created on first use, inside the running loop
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(
                self.url, json=body, headers=self._headers, allow_redirects=False
            ) as response:
                if response.status == 201:
                    return
                text = await response.text(errors="replace")
                raise RevocationFailed(
                    f"the proxy admin API answered {response.status}: {_problem(text)}"
                )
        except TimeoutError:  # asyncio's timeout is the builtin one since 3.11
            raise RevocationFailed(
                f"the proxy admin API at {self.url} did not answer within {self._timeout.total:g}s"
            ) from None
        except aiohttp.ClientError as e:
            raise RevocationFailed(f"cannot reach the proxy admin API at {self.url}: {e}") from None


def _problem(text: str) -> str:
    """The reason and message of the proxy's JSON error, else the start of the body."""
    try:
        error = json.loads(text)
    except ValueError:
        error = None
    if isinstance(error, dict) and "reason" in error:
        return f"{error.get('reason')}: {error.get('message', '')}"
    return text[:200] or "(no body)"
