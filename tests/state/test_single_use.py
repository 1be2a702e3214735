"""A single-use token is spent only by a call the proxy lets through.

The use is recorded by the pipeline's last step, so a refresh refused for any other
reason — its rate limit, a missing role, a peer not allowed — leaves the token usable for
the client's retry (and a refused call never triggers `revoke_on_reuse`). Replays are still
refused before the rate limit counts them. In memory and in a real Redis, through the
real sidecar.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from authproxy.keys.issuer import TokenIssuer
from tests.support.echo_backend import EchoBackend
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.redis_modes import MODES, url_for
from tests.support.running_proxy import OK, REUSED, running_node

RATE_LIMITED = (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
NO_ROLE = (grpc.StatusCode.PERMISSION_DENIED, "INSUFFICIENT_ROLE")
NO_PEER = (grpc.StatusCode.PERMISSION_DENIED, "PEER_NOT_ALLOWED")

POLICY = TEST_POLICY + (
    "  /test.SpendLimited/Echo:\n"
    "    {level: refresh, single_use: true, rate_limit: {limit: 1/hour, key: subject}}\n"
    "  /test.SpendAdmin/Echo: {level: refresh, single_use: true, roles: [admin]}\n"
    '  /test.SpendPeer/Echo: {level: refresh, single_use: true, peers: ["spiffe://x/ns/a"]}\n'
    "  /test.SpendPlain/Echo: {level: refresh, single_use: true}\n"
    "  /test.SpendQuiet/Echo:\n"
    "    level: refresh\n"
    "    single_use: true\n"
    "    revoke_on_reuse: false\n"
    "    rate_limit: {limit: 2/hour, key: subject}\n"
)


@pytest.fixture(params=["memory", *MODES])
def state_url(request: pytest.FixtureRequest) -> str | None:
    return url_for(request, request.param) if request.param != "memory" else None


@pytest.mark.parametrize(
    ("method", "refused"),
    [
        ("/test.SpendLimited/Echo", RATE_LIMITED),
        ("/test.SpendAdmin/Echo", NO_ROLE),
        ("/test.SpendPeer/Echo", NO_PEER),
    ],
    ids=["rate-limited", "insufficient-role", "peer-not-allowed"],
)
async def test_a_refused_call_does_not_spend_a_single_use_token(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    state_url: str | None,
    method: str,
    refused: tuple[grpc.StatusCode, str],
):
    async with running_node(tmp_path, keys, backend, "a", POLICY, redis=state_url) as node:
        if refused == RATE_LIMITED:  # use up the subject's one call an hour
            assert await node.call(method, issuer.mint("refresh", "ivan", ttl=300).token) == OK
        retried = issuer.mint("refresh", "ivan", ttl=300)
        assert await node.call(method, retried.token) == refused
        assert await node.call(method, retried.token) == refused  # not REFRESH_REUSED
        assert not await node.proxy.state.used(retried.claims["jti"])
        # The retry that passes every step spends it, once; nothing was revoked meanwhile.
        assert await node.call("/test.SpendPlain/Echo", retried.token) == OK
        assert await node.call("/test.SpendPlain/Echo", retried.token) == REUSED
        assert await node.proxy.state.used(retried.claims["jti"])


async def test_a_replay_is_refused_before_the_rate_limit_counts_it(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend, state_url: str | None
):
    """Rate limits count only calls that would otherwise be allowed: two replays of a spent
    token leave the second of the subject's two calls an hour to a fresh token."""
    async with running_node(tmp_path, keys, backend, "a", POLICY, redis=state_url) as node:
        first = issuer.mint("refresh", "judy", ttl=300).token
        assert await node.call("/test.SpendQuiet/Echo", first) == OK
        assert await node.call("/test.SpendQuiet/Echo", first) == REUSED
        assert await node.call("/test.SpendQuiet/Echo", first) == REUSED
        assert (
            await node.call("/test.SpendQuiet/Echo", issuer.mint("refresh", "judy", ttl=300).token)
            == OK
        )
        third = issuer.mint("refresh", "judy", ttl=300).token
        assert await node.call("/test.SpendQuiet/Echo", third) == RATE_LIMITED
