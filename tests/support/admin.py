"""The admin API from a test: `admin` (one request: status, headers, JSON body),
`revocations_url` (a proxy's revocation list), `admin_proxy` (the ext_authz front ends plus
the admin API on loopback) and a bearer secret for it (`ADMIN_SECRET`, read from
`ADMIN_ENV`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.ext_authz import running_ext_authz
from tests.support.keys import Keys
from tests.support.running_proxy import RunningProxy

ADMIN_ENV = "AUTHPROXY_TEST_ADMIN_TOKEN"
ADMIN_SECRET = "admin-secret-0123456789"


def revocations_url(node: RunningProxy) -> str:
    """The admin API's revocation list."""
    return f"{node.admin_base}/v1/revocations"


async def admin(
    url: str,
    method: str = "POST",
    body: Any = None,
    data: bytes | None = None,
    authorization: str | None = None,
) -> tuple[int, dict, Any]:
    """(status, headers, JSON body) of one admin API request."""
    headers = {"authorization": authorization} if authorization else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=body, data=data, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.json(content_type=None)


@asynccontextmanager
async def admin_proxy(tmp_path: Path, keys: Keys, **overrides: Any) -> AsyncIterator[RunningProxy]:
    async with running_ext_authz(tmp_path, keys, admin="127.0.0.1:0", **overrides) as running:
        yield running
