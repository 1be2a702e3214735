"""Per-rule rate limits (`rate_limit:` in the policy, `proxy/decide/rate_limits.py`).

Policy validation; the pipeline's last step against both state backends (memory, and a
real `redis-server`): exact counting under concurrency, what the key is, which calls are
counted, counters per rule and per limit, the retry delay; Redis keys; two sidecars
sharing one Redis; the deny on the wire (gRPC status details, ext_authz HTTP 429 with
`retry-after`); the client address behind trusted proxies; storage outages.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import tomllib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from authproxy.decide.decision import Decision
from authproxy.decide.pipeline import Authorizer
from authproxy.decide.rate_limits import RateLimiter
from authproxy.keys.issuer import TokenIssuer
from authproxy.policy.loader import PolicyError, parse_policy
from authproxy.runtime.serve import ConfigError, build_authorizer
from authproxy.state.store import MemoryState, StateStore
from tests.support.echo_backend import EchoBackend
from tests.support.ext_authz import (
    check,
    check_request,
    denied_headers,
    metadata,
    outcome,
    running_ext_authz,
    unpadded_b64decode,
)
from tests.support.keys import Keys
from tests.support.redis_modes import MODES, raw_client, url_for
from tests.support.redis_server import PATIENT, PATIENT_CONFIG, RedisServer, running_state
from tests.support.running_proxy import (
    OK,
    STATE_DOWN,
    config_for,
    error_info,
    running_node,
    running_proxy,
    start_sidecar,
    status_detail,
    with_token,
)
from tests.support.tokens import minted
from tests.support.waits import poll

FIVE = "/rl.Five/Echo"  # public, 5/minute, key peer (the default)
OTHER = "/rl.Other/Echo"  # public, 5/minute, key peer (written out)
SECOND = "/rl.Second/Echo"  # public, 1/second
OPEN = "/rl.Open/Echo"  # public, 5/minute, fail_open
SUBJECT = "/rl.Subject/Echo"  # access, 5/minute per subject
TOKEN_PEER = "/rl.TokenPeer/Echo"  # access, 5/minute per client address
DEVICE = "/rl.Device/Echo"  # access, 3/minute per `device_id` claim
ADMIN = "/rl.Admin/Echo"  # access with role admin, 5/minute per subject
BOTH = "/rl.Both/Echo"  # access, 4/minute per client address, then 2/minute per subject
TWICE = "/rl.Twice/Echo"  # public, the same 3/minute per client address listed twice

POLICY = """\
version: 1
default: deny
issuer: test-issuer
leeway: 5s
tokens:
  2fa:     {type: 2fa_pending, audience: 2fa-verification}
  refresh: {type: refresh, audience: token-refresh, keys: [refresh-hmac]}
  access:  {type: access, audience: api-access}
methods:
  /rl.Five/*: {level: public, rate_limit: {limit: 5/minute}}
  /rl.Other/*: {level: public, rate_limit: {limit: 5/minute, key: peer}}
  /rl.Second/*: {level: public, rate_limit: {limit: 1/second}}
  /rl.Open/*: {level: public, rate_limit: {limit: 5/minute, fail_open: true}}
  /rl.Subject/*: {level: access, rate_limit: {limit: 5/minute, key: subject}}
  /rl.TokenPeer/*: {level: access, rate_limit: {limit: 5/minute}}
  /rl.Device/*: {level: access, rate_limit: {limit: 3/minute, key: device_id}}
  /rl.Admin/*: {level: access, roles: [admin], rate_limit: {limit: 5/minute, key: subject}}
  /rl.Both/*:
    level: access
    rate_limit:
      - {limit: 4/minute, key: peer}
      - {limit: 2/minute, key: subject}
  /rl.Twice/*: {level: public, rate_limit: [{limit: 3/minute}, {limit: 3/minute, key: peer}]}
"""

REPO = Path(__file__).resolve().parents[2]
PEER_A = "ipv4:198.51.100.1:40001"
PEER_B = "ipv4:198.51.100.2:40001"
LIMITED = "RATE_LIMITED"
RESOURCE_EXHAUSTED = (grpc.StatusCode.RESOURCE_EXHAUSTED, LIMITED)
#: Timestamps go through Lua's `tostring` (14 significant digits) in the Redis storage.
ROUNDING = 1e-3


def verdict(decision: Decision) -> str:
    """OK, or the deny reason."""
    if decision.allowed:
        return "OK"
    assert decision.reason is not None
    return decision.reason.value


async def decide(
    authorizer: Authorizer,
    method: str,
    bearer: str | None = None,
    peer: str | None = PEER_A,
    headers: tuple[tuple[str, str], ...] = (),
) -> Decision:
    md = with_token(headers, bearer)
    return await authorizer.decide(method, md, peer)


async def verdicts(authorizer: Authorizer, method: str, n: int, **kwargs: Any) -> list[str]:
    """The verdicts of `n` calls made one after another."""
    return [verdict(await decide(authorizer, method, **kwargs)) for _ in range(n)]


def limiter_of(authorizer: Authorizer) -> RateLimiter:
    assert isinstance(authorizer.limiter, RateLimiter)
    return authorizer.limiter


# --- policy validation ----------------------------------------------------------------------

FILE = "rate-policy.yaml"
BASE = "version: 1\ntokens:\n  access: {type: access, audience: api}\nmethods:\n"  # 4 lines


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, FILE)
    return [str(e) for e in info.value.errors]


ERROR_CASES = [
    (
        "deny-level",
        "  /a.B/C: {level: deny, rate_limit: {limit: 5/minute}}\n",
        5,
        "a rate limit needs a level that allows calls, not 'deny'",
    ),
    (
        "public-with-subject",
        "  /a.B/C: {level: public, rate_limit: {limit: 5/minute, key: subject}}\n",
        5,
        "a public method has no token, so its rate limit key must be 'peer', not 'subject'",
    ),
    (
        "public-with-claim-in-a-list",
        "  /a.B/C:\n    level: public\n    rate_limit:\n      - {limit: 5/minute}\n"
        "      - {limit: 9/hour, key: device_id}\n",
        9,
        "must be 'peer', not 'device_id'",
    ),
    (
        "malformed-rate",
        "  /a.B/C: {level: access, rate_limit: {limit: five a minute}}\n",
        5,
        "malformed rate 'five a minute'",
    ),
    (
        "unknown-unit",
        "  /a.B/C: {level: access, rate_limit: {limit: 5/fortnight}}\n",
        5,
        "malformed rate '5/fortnight'",
    ),
    (
        "two-rates-in-one-string",
        "  /a.B/C: {level: access, rate_limit: {limit: 5/minute;10/hour}}\n",
        5,
        "list several entries for several limits",
    ),
    (
        "two-rates-with-a-comma",
        '  /a.B/C: {level: access, rate_limit: {limit: "5/minute, 10/hour"}}\n',
        5,
        "malformed rate '5/minute, 10/hour'",
    ),
    (
        "count-zero",
        "  /a.B/C: {level: access, rate_limit: {limit: 0/minute}}\n",
        5,
        "the count must be between 1 and 10000",
    ),
    (
        "count-too-large",
        "  /a.B/C: {level: access, rate_limit: {limit: 10001/minute}}\n",
        5,
        "rate '10001/minute': the count must be between 1 and 10000",
    ),
    (
        "unknown-key",
        "  /a.B/C: {level: access, rate_limit: {limit: 5/minute, per: peer}}\n",
        5,
        "unknown key in the rate limit of /a.B/C 'per' (allowed: limit, key, fail_open)",
    ),
    (
        "bad-key-name",
        '  /a.B/C: {level: access, rate_limit: {limit: 5/minute, key: "device id"}}\n',
        5,
        "rate limit key 'device id' must be 'peer', 'subject' or a claim name",
    ),
    (
        "empty-list",
        "  /a.B/C: {level: access, rate_limit: []}\n",
        5,
        "'rate_limit' must be a mapping like {limit: 5/minute, key: peer} or a non-empty list",
    ),
    (
        "a-bare-string",
        "  /a.B/C: {level: access, rate_limit: 5/minute}\n",
        5,
        "'rate_limit' must be a mapping",
    ),
    (
        "no-limit",
        "  /a.B/C: {level: access, rate_limit: {key: peer}}\n",
        5,
        "the rate limit of /a.B/C has no 'limit'",
    ),
    (
        "fail-open-not-boolean",
        "  /a.B/C: {level: access, rate_limit: {limit: 5/minute, fail_open: maybe}}\n",
        5,
        "'fail_open' must be true or false",
    ),
    (
        "block-style-entry-line",
        "  /a.B/C:\n    level: access\n    rate_limit:\n      - limit: 5/minute\n"
        "      - limit: 10/hour\n        key: subject\n      - limit: 0/hour\n",
        11,
        "rate '0/hour': the count must be between 1 and 10000",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "words"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_policy_errors_name_file_and_line(text: str, line: int, words: str) -> None:
    found = errors(BASE + text)
    assert any(e.startswith(f"{FILE}:{line}: ") and words in e for e in found), found


def test_valid_rate_limit_forms() -> None:
    policy = parse_policy(
        BASE
        + "  /a.Map/*: {level: public, rate_limit: {limit: 5/minute}}\n"
        + "  /a.List/C:\n"
        + "    level: access\n"
        + "    rate_limit:\n"
        + "      - {limit: 10/hour, key: device_id}\n"
        + "      - {limit: 100 per 2 hours, key: subject, fail_open: true}\n"
        + "  /a.Max/C: {level: access, rate_limit: {limit: 10000/second, key: tenant.id}}\n"
        + "  /a.Plain/C: access\n",
        FILE,
    )
    (mapping,) = policy.match("/a.Map/Anything").rate_limits
    assert (mapping.item.amount, mapping.item.get_expiry()) == (5, 60)
    assert (mapping.key, mapping.fail_open) == ("peer", False)
    first, second = policy.match("/a.List/C").rate_limits
    assert (first.item.amount, first.item.get_expiry(), first.key, first.fail_open) == (
        10,
        3600,
        "device_id",
        False,
    )
    assert (second.item.amount, second.item.get_expiry(), second.key, second.fail_open) == (
        100,
        7200,
        "subject",
        True,
    )
    (largest,) = policy.match("/a.Max/C").rate_limits
    assert (largest.item.amount, largest.item.get_expiry(), largest.key) == (10000, 1, "tenant.id")
    assert policy.match("/a.Plain/C").rate_limits == ()


def test_the_default_rule_and_http_routes_take_rate_limits() -> None:
    policy = parse_policy(
        "version: 1\n"
        "default: {level: access, rate_limit: {limit: 7/minute, key: subject}}\n"
        "tokens:\n  access: {type: access, audience: api}\n"
        "methods:\n  /a.B/C: public\n"
        'http:\n  "GET /status/**": {level: public, rate_limit: {limit: 3/second}}\n',
        FILE,
    )
    (limit,) = policy.default.rate_limits
    assert (limit.item.amount, limit.key) == (7, "subject")
    route = policy.http.match("GET", ["status", "x"])
    assert route is not None
    (limit,) = route.rate_limits
    assert (limit.item.amount, limit.item.get_expiry()) == (3, 1)


# --- the pipeline step, against both backends -----------------------------------------------


@pytest.fixture(params=["memory", *MODES])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    """A started state store of each kind; Redis in each of its modes."""
    if request.param == "memory":
        store = MemoryState()
        await store.start()
        try:
            yield store
        finally:
            await store.close()
    else:
        url = url_for(request, request.param)
        async with running_state(url, namespace="rl-test", **PATIENT) as store:
            yield store


@pytest.fixture
def authorizer(tmp_path: Path, keys: Keys, state: StateStore) -> Authorizer:
    return build_authorizer(config_for(tmp_path, keys, POLICY), state)


@pytest.mark.parametrize("method", [FIVE, SUBJECT], ids=["peer-key", "subject-key"])
async def test_exactly_5_of_100_concurrent_calls_pass(
    authorizer: Authorizer, issuer: TokenIssuer, method: str
):
    bearer = minted(issuer) if method == SUBJECT else None
    start = time.time()
    decisions = await asyncio.gather(*(decide(authorizer, method, bearer) for _ in range(100)))
    elapsed = time.time() - start
    assert Counter(verdict(d) for d in decisions) == {"OK": 5, LIMITED: 95}
    for d in decisions:
        if d.allowed:
            assert d.retry_after is None
            continue
        assert d.status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert d.retry_after is not None
        # The window frees a slot one minute after the first counted call, which came
        # after `start`; the refusal came before `start + elapsed`.
        assert 0 < d.retry_after <= 60 + ROUNDING
        assert d.retry_after >= 60 - elapsed - ROUNDING, (d.retry_after, elapsed)
        assert "rate limit of 5 per 1 minute" in d.message


async def test_each_client_address_has_its_own_bucket(authorizer: Authorizer):
    assert await verdicts(authorizer, FIVE, 6, peer=PEER_A) == ["OK"] * 5 + [LIMITED]
    assert await verdicts(authorizer, FIVE, 6, peer=PEER_B) == ["OK"] * 5 + [LIMITED]
    # Another port of the same address, or the same address IPv4-mapped, is the same client.
    assert await verdicts(authorizer, FIVE, 1, peer="ipv4:198.51.100.1:9") == [LIMITED]
    assert await verdicts(authorizer, FIVE, 1, peer="ipv6:[::ffff:198.51.100.1]:9") == [LIMITED]
    assert await verdicts(authorizer, FIVE, 1, peer="ipv6:[2001:db8::1]:9") == ["OK"]
    limited = await decide(authorizer, FIVE, peer=PEER_B)
    assert "per client address" in limited.message


async def test_x_forwarded_for_does_not_pick_the_bucket_without_trusted_proxies(
    authorizer: Authorizer,
):
    for i in range(5):
        spoofed = (("x-forwarded-for", f"203.0.113.{i}"),)
        assert verdict(await decide(authorizer, FIVE, headers=spoofed)) == "OK"
    spoofed = (("x-forwarded-for", "203.0.113.99"),)
    assert verdict(await decide(authorizer, FIVE, headers=spoofed)) == LIMITED


async def test_trusted_proxies_forward_the_client_address(
    tmp_path: Path, keys: Keys, state: StateStore
):
    cfg = config_for(tmp_path, keys, POLICY, trusted_proxies=["198.51.100.0/24"])
    authorizer = build_authorizer(cfg, state)
    one = (("x-forwarded-for", "1.1.1.1, 203.0.113.1"),)
    two = (("x-forwarded-for", "1.1.1.1, 203.0.113.2"),)
    for peer in (PEER_A, PEER_B):  # two trusted proxies, one client behind both
        assert await verdicts(authorizer, FIVE, 2, peer=peer, headers=one) == ["OK"] * 2
    assert await verdicts(authorizer, FIVE, 2, peer=PEER_A, headers=one) == ["OK", LIMITED]
    assert await verdicts(authorizer, FIVE, 5, peer=PEER_A, headers=two) == ["OK"] * 5
    # An untrusted peer is its own client whatever it forwards.
    untrusted = "ipv4:192.0.2.1:1"
    assert await verdicts(authorizer, FIVE, 6, peer=untrusted, headers=one) == ["OK"] * 5 + [
        LIMITED
    ]


async def test_subject_key_counts_every_token_and_address_of_a_subject(
    authorizer: Authorizer, issuer: TokenIssuer
):
    tokens = [minted(issuer, "alice") for _ in range(5)]  # five tokens, one subject
    peers = [PEER_A, PEER_B, "ipv4:192.0.2.3:1", None, "unix:/tmp/s"]
    for bearer, peer in zip(tokens, peers, strict=True):
        assert verdict(await decide(authorizer, SUBJECT, bearer, peer=peer)) == "OK"
    refused = await decide(authorizer, SUBJECT, minted(issuer, "alice"), peer="ipv4:192.0.2.4:1")
    assert verdict(refused) == LIMITED
    assert "per subject" in refused.message
    assert await verdicts(authorizer, SUBJECT, 5, bearer=minted(issuer, "bob")) == ["OK"] * 5


async def test_claim_key_counts_per_claim_value(authorizer: Authorizer, issuer: TokenIssuer):
    phone = minted(issuer, "alice", extra={"device_id": "phone-1"})
    assert await verdicts(authorizer, DEVICE, 4, bearer=phone) == ["OK"] * 3 + [LIMITED]
    # Another subject on the same device shares the device's bucket...
    same_device = minted(issuer, "bob", extra={"device_id": "phone-1"})
    refused = await decide(authorizer, DEVICE, same_device, peer=PEER_B)
    assert verdict(refused) == LIMITED
    assert "per 'device_id'" in refused.message
    # ...and the same subject on another device has its own.
    tablet = minted(issuer, "alice", extra={"device_id": "tablet-1"})
    assert await verdicts(authorizer, DEVICE, 4, bearer=tablet) == ["OK"] * 3 + [LIMITED]
    numeric = minted(issuer, "carol", extra={"device_id": 42})
    assert await verdicts(authorizer, DEVICE, 4, bearer=numeric) == ["OK"] * 3 + [LIMITED]
    # Long values are hashed whole: two values with a long common prefix stay apart.
    long_one = minted(issuer, "dave", extra={"device_id": "d" * 300 + "1"})
    long_two = minted(issuer, "dave", extra={"device_id": "d" * 300 + "2"})
    assert await verdicts(authorizer, DEVICE, 4, bearer=long_one) == ["OK"] * 3 + [LIMITED]
    assert await verdicts(authorizer, DEVICE, 4, bearer=long_two) == ["OK"] * 3 + [LIMITED]


@pytest.mark.parametrize(
    "claims",
    [
        {},
        {"device_id": ""},
        {"device_id": None},
        {"device_id": True},
        {"device_id": 1.5},
        {"device_id": ["phone"]},
        {"device_id": {"id": "phone"}},
    ],
    ids=["missing", "empty", "null", "boolean", "float", "list", "object"],
)
async def test_claim_key_without_a_usable_claim_is_unauthenticated(
    authorizer: Authorizer, issuer: TokenIssuer, claims: dict[str, Any]
):
    decision = await decide(authorizer, DEVICE, minted(issuer, extra=claims))
    assert verdict(decision) == "MISSING_CLAIM"
    assert decision.status == grpc.StatusCode.UNAUTHENTICATED
    assert "'device_id'" in decision.message
    assert decision.retry_after is None


async def test_calls_refused_for_other_reasons_are_not_counted(
    authorizer: Authorizer, issuer: TokenIssuer, state: StateStore
):
    # Missing role: ten refusals, then the subject still has its five calls.
    for _ in range(10):
        assert verdict(await decide(authorizer, ADMIN, minted(issuer, "alice"))) == (
            "INSUFFICIENT_ROLE"
        )
    # Revoked: ten refusals of a revoked admin token of the same subject.
    revoked = issuer.mint("access", "alice", ttl=300, roles=["admin"])
    await state.revoke_token(revoked.jti, revoked.exp)
    for _ in range(10):
        assert verdict(await decide(authorizer, ADMIN, revoked.token)) == "TOKEN_REVOKED"
    admin = minted(issuer, "alice", roles=["admin"])
    assert await verdicts(authorizer, ADMIN, 6, bearer=admin) == ["OK"] * 5 + [LIMITED]

    # No token, or a bad one, on a rule keyed by client address.
    for bearer in (None, "not-a-token", minted(issuer)[:-4] + "AAAA"):
        for _ in range(5):
            decision = await decide(authorizer, TOKEN_PEER, bearer)
            assert decision.status == grpc.StatusCode.UNAUTHENTICATED, decision
    assert await verdicts(authorizer, TOKEN_PEER, 6, bearer=minted(issuer)) == ["OK"] * 5 + [
        LIMITED
    ]


async def test_two_rules_never_share_a_counter(authorizer: Authorizer):
    """FIVE and OTHER have the same limit and key; only the rule differs."""
    assert await verdicts(authorizer, FIVE, 6) == ["OK"] * 5 + [LIMITED]
    assert await verdicts(authorizer, OTHER, 6) == ["OK"] * 5 + [LIMITED]
    # A service wildcard is one rule: its methods share the rule's counter.
    assert await verdicts(authorizer, "/rl.Five/Report", 1) == [LIMITED]


async def test_the_limits_of_one_rule_are_counted_separately(
    authorizer: Authorizer, issuer: TokenIssuer
):
    """BOTH: 4/minute per client address, then 2/minute per subject."""
    for sub in ("alice", "bob", "carol", "dave"):
        assert verdict(await decide(authorizer, BOTH, minted(issuer, sub))) == "OK"
    refused = await decide(authorizer, BOTH, minted(issuer, "erin"))
    assert verdict(refused) == LIMITED
    assert "per client address" in refused.message
    # Refused by the first limit, that call never reached the second: erin has both calls.
    erin = minted(issuer, "erin")
    assert verdict(await decide(authorizer, BOTH, erin, peer=PEER_B)) == "OK"
    assert verdict(await decide(authorizer, BOTH, erin, peer="ipv4:192.0.2.7:1")) == "OK"
    refused = await decide(authorizer, BOTH, erin, peer="ipv4:192.0.2.8:1")
    assert verdict(refused) == LIMITED
    assert "per subject" in refused.message
    # Each limit has its own counter even when two are written alike.
    assert await verdicts(authorizer, TWICE, 4) == ["OK"] * 3 + [LIMITED]


async def test_a_call_refused_by_a_later_limit_does_not_use_up_an_earlier_one(
    authorizer: Authorizer, issuer: TokenIssuer
):
    """Refused calls never use up an allowance: a user over their own per-subject limit
    must not exhaust the per-address allowance of everyone behind the same address."""
    frank = minted(issuer, "frank")
    assert await verdicts(authorizer, BOTH, 5, bearer=frank) == ["OK"] * 2 + [LIMITED] * 3
    # Two calls reached the address's window so far; gina (same address) has two more.
    gina = minted(issuer, "gina")
    assert await verdicts(authorizer, BOTH, 2, bearer=gina) == ["OK", "OK"]


async def test_after_the_retry_delay_the_call_is_allowed_again(authorizer: Authorizer):
    assert verdict(await decide(authorizer, SECOND)) == "OK"
    refused = await decide(authorizer, SECOND)
    assert verdict(refused) == LIMITED
    assert refused.retry_after is not None
    assert 0 < refused.retry_after <= 1 + ROUNDING
    await asyncio.sleep(refused.retry_after + 0.05)
    assert verdict(await decide(authorizer, SECOND)) == "OK"
    assert verdict(await decide(authorizer, SECOND)) == LIMITED


def test_a_malformed_trusted_proxy_is_a_config_error(tmp_path: Path, keys: Keys):
    cfg = config_for(tmp_path, keys, POLICY, trusted_proxies=["10.0.0.0/8", "10.0.0.0/33"])
    with pytest.raises(ConfigError, match=r"--trusted-proxy: .*10\.0\.0\.0/33"):
        build_authorizer(cfg, MemoryState())


def test_the_rate_limit_library_is_a_declared_dependency():
    """`proxy` imports `limits`: a fresh install (`pip install .`, the Dockerfile, CI's
    `./dev`) must bring it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}
    assert "limits" in names, sorted(names)


async def test_without_a_limiter_a_limited_rule_fails_closed(authorizer: Authorizer):
    bare = Authorizer(authorizer.policy, authorizer.verifier)
    decision = await decide(bare, FIVE)
    assert (verdict(decision), decision.status) == (
        "STATE_UNAVAILABLE",
        grpc.StatusCode.UNAVAILABLE,
    )


# --- Redis keys -----------------------------------------------------------------------------


async def test_redis_keys_live_under_the_namespace_and_all_expire(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    redis_url: str,
):
    long_value = "L" * 300
    async with (
        running_state(redis_url, namespace="ns-one") as one,
        running_state(redis_url, namespace="ns-two") as two,
    ):
        first = build_authorizer(config_for(tmp_path, keys, POLICY), one)
        second = build_authorizer(config_for(tmp_path, keys, POLICY), two)
        assert await verdicts(first, FIVE, 6) == ["OK"] * 5 + [LIMITED]
        # Another namespace is another set of counters.
        assert await verdicts(second, FIVE, 5) == ["OK"] * 5
        assert await verdicts(first, SUBJECT, 1, bearer=minted(issuer)) == ["OK"]
        device = minted(issuer, extra={"device_id": long_value})
        assert await verdicts(first, DEVICE, 1, bearer=device) == ["OK"]

        async with raw_client(redis_url) as client:
            found = {key: await client.ttl(key) async for key in client.scan_iter("*")}
    limits = {k: ttl for k, ttl in found.items() if ":ratelimit:" in k}
    assert sorted(k.split(":ratelimit:")[0] for k in limits) == ["ns-one"] * 3 + ["ns-two"]
    # Besides the counters, only each namespace's epoch (state/redis_store.py), expiring too.
    epochs = {"ns-one:epoch{ns-one:revocations}", "ns-two:epoch{ns-two:revocations}"}
    assert set(found) == set(limits) | epochs, f"keys other than rate limits: {found}"
    assert all(found[k] > 0 for k in epochs), found
    for key, ttl in limits.items():
        assert 0 < ttl <= 60, (key, ttl)  # -1 would be a key without expiry
    device_keys = [k for k in limits if "/rl.Device/" in k]
    assert len(device_keys) == 1
    assert long_value not in device_keys[0] and "sha256:" in device_keys[0]


# --- through real servers -------------------------------------------------------------------


def retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    assert rpc_status.from_call(error) is not None
    return status_detail(error, error_details_pb2.RetryInfo)


async def test_the_sidecar_refuses_the_sixth_call_with_retry_info(
    tmp_path: Path, keys: Keys, backend: EchoBackend
):
    running = await start_sidecar(tmp_path, backend.port, keys, POLICY)
    try:
        start = time.time()
        for i in range(5):
            response, _ = await running.unary(FIVE, f"call {i}".encode())
            assert response == f"call {i}".encode()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.unary(FIVE, b"sixth")
        elapsed = time.time() - start
        error = refused.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details().startswith("RATE_LIMITED: rate limit of 5 per 1 minute")
        info = error_info(error)
        assert info is not None
        assert (info.reason, info.domain) == (LIMITED, "authproxy")
        retry = retry_info(error)
        assert retry is not None
        delay = retry.retry_delay.ToTimedelta().total_seconds()
        assert 0 < delay <= 60
        assert delay >= 60 - elapsed - ROUNDING  # a minute after the first call
        # Other rules and other methods of other rules are unaffected.
        response, _ = await running.unary(OTHER, b"other")
        assert response == b"other"
    finally:
        await running.stop()
    assert [m for m, _ in backend.calls].count(FIVE) == 5  # never saw the refused call
    assert [m for m, _ in backend.calls].count(OTHER) == 1


@pytest.mark.parametrize("loopback", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
async def test_the_sidecar_believes_x_forwarded_for_from_a_trusted_proxy(
    tmp_path: Path, keys: Keys, backend: EchoBackend, loopback: str
):
    """The sidecar behind a proxy on loopback; each forwarded client has its own bucket."""
    host = f"[{loopback}]" if ":" in loopback else loopback
    cfg = config_for(
        tmp_path,
        keys,
        POLICY,
        listen=f"{host}:0",
        upstream=f"127.0.0.1:{backend.port}",
        upstream_reflection=False,
        trusted_proxies=[loopback],
    )
    async with running_proxy(cfg, host=host) as running:

        async def call(client: str) -> tuple[grpc.StatusCode, str | None]:
            return await running.call(
                FIVE, metadata=(("x-forwarded-for", f"192.0.2.200, {client}"),)
            )

        first = [await call("203.0.113.1") for _ in range(6)]
        second = [await call("203.0.113.2") for _ in range(6)]
    assert first == [OK] * 5 + [RESOURCE_EXHAUSTED]
    assert second == [OK] * 5 + [RESOURCE_EXHAUSTED]


async def test_two_sidecars_sharing_redis_let_exactly_5_of_100_calls_through(
    tmp_path: Path,
    keys: Keys,
    backend: EchoBackend,
    redis_url: str,
):
    async with (
        # A count under concurrency, not a timing: patient Redis timeouts.
        running_node(tmp_path, keys, backend, "a", POLICY, redis=redis_url, **PATIENT_CONFIG) as a,
        running_node(tmp_path, keys, backend, "b", POLICY, redis=redis_url, **PATIENT_CONFIG) as b,
    ):
        nodes = (a, b)
        results = await asyncio.gather(*(nodes[i % 2].call(FIVE) for i in range(100)))
    assert Counter(results) == {OK: 5, RESOURCE_EXHAUSTED: 95}
    assert [m for m, _ in backend.calls].count(FIVE) == 5


async def test_redis_outage_fail_closed_or_open_and_recovery(
    tmp_path: Path,
    keys: Keys,
    backend: EchoBackend,
    redis_server: RedisServer,
):
    async with running_node(tmp_path, keys, backend, "a", POLICY, redis=redis_server.url) as n:
        limiter = limiter_of(n.proxy.authorizer)
        assert await n.call(FIVE) == OK
        assert await n.call(OPEN) == OK
        assert limiter.failures_total == 0

        redis_server.kill()
        assert await n.call(FIVE) == STATE_DOWN
        # fail_open: allowed, and not counted: more calls than the limit all pass.
        assert [await n.call(OPEN) for _ in range(7)] == [OK] * 7
        assert await n.call(FIVE) == STATE_DOWN
        assert limiter.failures_total == 9  # one per refused or waved-through check

        redis_server.restart()  # an empty Redis: nothing was persisted
        result, _ = await poll(lambda: n.call(FIVE), lambda r: r == OK, within=5.0, every=0.05)
        assert result == OK
        assert [await n.call(FIVE) for _ in range(5)] == [OK] * 4 + [RESOURCE_EXHAUSTED]
        assert [await n.call(OPEN) for _ in range(6)] == [OK] * 5 + [RESOURCE_EXHAUSTED]
        assert limiter.failures_total >= 9
    calls = [m for m, _ in backend.calls]
    assert calls.count(FIVE) == 1 + 5  # before the outage, and after recovery
    assert calls.count(OPEN) == 1 + 7 + 5


# --- Envoy ext_authz ------------------------------------------------------------------------


async def http_get(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, Any] | None]:
    async with session.get(url, headers=headers or {}) as answer:
        body = await answer.read()
        parsed = json.loads(body) if answer.status != 200 else None
        return answer.status, answer.headers, parsed


async def test_ext_authz_http_answers_429_with_retry_after(tmp_path: Path, keys: Keys):
    async with (
        running_ext_authz(tmp_path, keys, policy=POLICY) as running,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
    ):
        url = running.http_url + FIVE
        for _ in range(5):
            status, _, _ = await http_get(session, url)
            assert status == 200
        status, headers, body = await http_get(session, url)
        assert status == 429
        retry_after = headers["retry-after"]
        assert retry_after.isdigit() and 1 <= int(retry_after) <= 60, retry_after
        assert headers["content-type"] == "application/json"
        assert body is not None
        assert (body["error"], body["reason"]) == ("resource_exhausted", LIMITED)
        assert body["message"].startswith("rate limit of 5 per 1 minute")
        assert "www-authenticate" not in headers


async def test_ext_authz_grpc_check_denies_with_429_and_retry_after(tmp_path: Path, keys: Keys):
    async with running_ext_authz(tmp_path, keys, policy=POLICY) as running:
        request = check_request(FIVE)
        request.attributes.source.address.socket_address.address = "198.51.100.1"
        for _ in range(5):
            assert outcome(await check(running, request)) == "ALLOW"
        response = await check(running, request)
        assert outcome(response) == LIMITED
        assert response.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert response.denied_response.status.code == 429
        headers = denied_headers(response)
        assert headers["retry-after"].isdigit()
        assert 1 <= int(headers["retry-after"]) <= 60
        assert headers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        status = status_pb2.Status.FromString(
            unpadded_b64decode(headers["grpc-status-details-bin"])
        )
        retries = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert len(retries) == 1
        retry = error_details_pb2.RetryInfo()
        retries[0].Unpack(retry)
        delay = retry.retry_delay.ToTimedelta().total_seconds()
        assert 0 < delay <= 60
        assert int(headers["retry-after"]) >= delay  # rounded up, never down
        assert metadata(response)["rule"] == "/rl.Five/*"


async def test_ext_authz_grpc_check_uses_the_source_address_as_the_client(
    tmp_path: Path, keys: Keys
):
    async with running_ext_authz(tmp_path, keys, policy=POLICY) as running:

        async def from_source(address: str) -> list[str]:
            request = check_request(FIVE)
            request.attributes.source.address.socket_address.address = address
            return [outcome(await check(running, request)) for _ in range(6)]

        assert await from_source("198.51.100.1") == ["ALLOW"] * 5 + [LIMITED]
        assert await from_source("198.51.100.2") == ["ALLOW"] * 5 + [LIMITED]
        assert await from_source("2001:db8::2") == ["ALLOW"] * 5 + [LIMITED]


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted-envoy", "untrusted"])
async def test_ext_authz_http_x_forwarded_for_needs_a_trusted_proxy(
    tmp_path: Path, keys: Keys, trusted: bool
):
    proxies = ["127.0.0.1/32"] if trusted else []
    async with (
        running_ext_authz(tmp_path, keys, policy=POLICY, trusted_proxies=proxies) as running,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
    ):
        url = running.http_url + FIVE

        async def statuses(client: str, n: int) -> list[int]:
            forwarded = {"x-forwarded-for": f"192.0.2.200, {client}"}
            return [(await http_get(session, url, forwarded))[0] for _ in range(n)]

        assert await statuses("203.0.113.1", 5) == [200] * 5
        if trusted:
            assert await statuses("203.0.113.1", 1) == [429]
            assert await statuses("203.0.113.2", 6) == [200] * 5 + [429]
        else:  # every check comes from Envoy's address: one bucket for all
            assert await statuses("203.0.113.2", 1) == [429]
