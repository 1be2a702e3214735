"""Remote verification keys against a real identity provider (`tests/support/idp_server.py`, an
aiohttp server on 127.0.0.1): OpenID Connect discovery, JWKS URLs, issuer-bound key
files, rotation and the unknown-kid refetch, the cache lifetime from `Cache-Control`,
an identity provider that is down or misbehaving, TLS, live key-file reloads and
`retire_at`, and what operators see (`/readyz`, `/metrics`, configuration errors).

Every proxy is a real `AuthProxy` (sidecar in front of the echo backend, admin listener)
on loopback; calls are real gRPC calls. Fetch settings are short (timeout 0.5 s, cache_min
0.2 s, refetch interval 1 s) so the tests are quick; waits poll with deadlines. The only
time bounds are functional: a set is not fetched again before its cache lifetime, and it
is fetched again (or retried) within a generous deadline after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from jwt.algorithms import ECAlgorithm

from authproxy.keys.keygen import generate_private_key
from authproxy.keys.sources import FetchSettings, KeyFile, RemoteJwks
from authproxy.runtime.serve import ServeConfig
from tests.support.certs import make_ca
from tests.support.cli import ADDRESSES, POLICY, assert_config_error, serve
from tests.support.echo_backend import EchoBackend
from tests.support.idp_server import DISCOVERY, JWKS, MOVED, FakeIdp, SigningKey, server_tls, sign
from tests.support.keys import Keys
from tests.support.operations import write_atomically
from tests.support.running_proxy import OK, RunningProxy, http_json, running_proxy, value_of
from tests.support.waits import poll

METHOD = "/test.Access/Echo"
OWN = "auth-service"
KEY_NOT_FOUND = (grpc.StatusCode.UNAUTHENTICATED, "KEY_NOT_FOUND")
WRONG_ISSUER = (grpc.StatusCode.UNAUTHENTICATED, "WRONG_ISSUER")
KEYS_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, "KEYS_UNAVAILABLE")

FAST = FetchSettings(
    timeout=0.5,
    cache_default=60.0,  # no background refetch during a test unless Cache-Control says so
    cache_min=0.2,
    cache_max=60.0,
    refetch_interval=1.0,
    max_bytes=64 * 1024,
)
#: Deadline for anything the proxy does by itself (a load, a retry, a reload).
SOON = 5.0


def policy_text(*issuers: str) -> str:
    issuer = f", issuer: {json.dumps(list(issuers))}" if issuers else ""
    return (
        "version: 1\n"
        "default: deny\n"
        "tokens:\n"
        f"  access: {{type: access, audience: api-access{issuer}}}\n"
        "methods:\n"
        "  /test.Access/*: access\n"
        "  /test.Public/*: public\n"
    )


@asynccontextmanager
async def remote_proxy(
    tmp_path: Path,
    backend: EchoBackend,
    issuers: tuple[str, ...] = (),
    fetch: FetchSettings = FAST,
    **fields: Any,
) -> AsyncIterator[RunningProxy]:
    """The proxy (sidecar + admin listener on loopback) with only the key sources
    `fields` names (oidc_issuers, jwks, issuer_jwks, ...) and a policy whose access
    tokens must come from `issuers` (any issuer when empty)."""
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(policy_text(*issuers))
    cfg = ServeConfig(
        policy=str(policy_path),
        listen="127.0.0.1:0",
        upstream=f"127.0.0.1:{backend.port}",
        upstream_reflection=False,
        admin="127.0.0.1:0",
        shutdown_grace=0.5,
        watch_policy=False,
        jwks_fetch=fetch,
    )
    for key, value in fields.items():
        assert hasattr(cfg, key), key
        setattr(cfg, key, value)
    async with running_proxy(cfg) as node:
        yield node


@pytest.fixture
async def idp() -> AsyncIterator[FakeIdp]:
    """A running identity provider publishing one EC key, `k1`."""
    server = await FakeIdp().start()
    server.add_key("k1")
    yield server
    await server.close()


def remote(node: RunningProxy, index: int = 0) -> RemoteJwks:
    return node.proxy.keys.remote[index]


async def eventually(
    probe: Callable[[], Awaitable[Any]], until: Callable[[Any], bool], within: float = SOON
) -> Any:
    """`probe()`'s first result that satisfies `until` (fails after `within` seconds)."""
    result, elapsed = await poll(probe, until, within)
    assert until(result), f"still {result!r} after {elapsed:.1f}s"
    return result


async def counted(source: Any, result: str, at_least: int, within: float = SOON) -> None:
    """Wait until `source` counted `result` (ok, unchanged, error, ...) `at_least` times."""

    async def results() -> dict[str, int]:
        return dict(source.results)

    await eventually(results, lambda r: r.get(result, 0) >= at_least, within)


async def past_refetch_interval(idp: FakeIdp, fetch: FetchSettings = FAST) -> None:
    """Wait until the last key-set request is older than the refetch interval (an unknown
    kid may then fetch at once)."""
    wait = fetch.refetch_interval - idp.since_last()
    if wait > 0:
        await asyncio.sleep(wait + 0.05)


async def readyz(node: RunningProxy) -> tuple[int, dict[str, Any]]:
    return await http_json(f"{node.admin_base}/readyz")


def write_jwks(path: Path, *jwks: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps({"keys": list(jwks)}))
    return path


def own_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", generate_private_key("ES256"))


# --- OpenID Connect discovery -------------------------------------------------------------


async def test_oidc_discovery_a_token_signed_by_the_idp_is_allowed_through_the_sidecar(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    async with remote_proxy(tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer]) as node:
        assert await node.call(METHOD, idp.token("k1")) == OK
        assert idp.hits[DISCOVERY] == 1 and idp.hits[JWKS] == 1
        source = remote(node)
        assert source.loaded and source.issuer == idp.issuer
        assert [k.kid for k in node.proxy.keys.current] == ["k1"]
        # The key verifies only the IdP's tokens: another issuer's claim is refused.
        assert await node.call(METHOD, idp.token("k1", iss="https://other.example")) == (
            WRONG_ISSUER
        )
        assert await node.call(METHOD) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")


async def test_a_discovery_document_naming_another_issuer_is_never_loaded_keys_unavailable(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    idp.discovery_issuer = "https://impostor.example"
    async with remote_proxy(tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer]) as node:
        source = remote(node)
        await counted(source, "error", 3)  # retried (backoff), refused every time
        assert await node.call(METHOD, idp.token("k1")) == KEYS_UNAVAILABLE
        assert not source.loaded and len(node.proxy.keys.current) == 0
        assert idp.hits[JWKS] == 0  # the jwks_uri of a mismatched document is never used
        assert "impostor.example" in (source.last_error or "")
        status, body = await readyz(node)
        assert status == 503
        assert body["checks"]["keys"].startswith(f"waiting for keys from {idp.discovery_url}")
        assert "impostor.example" in body["checks"]["keys"]


async def test_readyz_is_503_until_the_first_load_and_200_after(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    idp.mode = "down"
    async with remote_proxy(tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer]) as node:
        status, body = await readyz(node)
        assert status == 503, body
        assert body["checks"]["keys"].startswith("waiting for keys from")
        assert "503" in body["checks"]["keys"]  # the last error says why
        idp.mode = "ok"
        status, body = await eventually(lambda: readyz(node), lambda r: r[0] == 200)
        assert body["checks"]["keys"] == "ok (1 loaded)"


async def test_without_keys_wait_readyz_is_200_while_the_idp_is_down(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp, keys: Keys
):
    """--no-keys-wait: ready with the local keys, although the IdP never answered."""
    idp.mode = "down"
    async with remote_proxy(
        tmp_path,
        backend,
        oidc_issuers=[idp.issuer],
        jwks=[str(keys.jwks)],
        keys_wait=False,
    ) as node:
        await counted(remote(node), "error", 1)
        status, body = await readyz(node)
        assert status == 200, body
        assert not remote(node).loaded
        # Tokens of the IdP still fail closed until its keys load.
        assert await node.call(METHOD, idp.token("k1")) == KEYS_UNAVAILABLE


async def test_idp_down_at_start_is_keys_unavailable_then_allowed_once_it_is_up(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    idp.mode = "down"
    async with remote_proxy(tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer]) as node:
        token = idp.token("k1")
        assert await node.call(METHOD, token) == KEYS_UNAVAILABLE
        idp.mode = "ok"
        assert await eventually(lambda: node.call(METHOD, token), lambda r: r == OK) == OK
        assert remote(node).loaded


# --- rotation and the unknown-kid refetch --------------------------------------------------


async def test_rotation_a_new_kid_is_allowed_after_exactly_one_immediate_refetch(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    async with remote_proxy(tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer]) as node:
        assert await node.call(METHOD, idp.token("k1")) == OK
        await past_refetch_interval(idp)
        idp.add_key("k2", kty="RSA")
        before = idp.hits[JWKS]
        assert await node.call(METHOD, idp.token("k2")) == OK
        assert idp.hits[JWKS] == before + 1
        assert idp.hits[DISCOVERY] == 1  # the jwks_uri is not discovered again
        # Known now: more k2 tokens (and k1 ones) fetch nothing.
        assert await node.call(METHOD, idp.token("k2")) == OK
        assert await node.call(METHOD, idp.token("k1")) == OK
        assert idp.hits[JWKS] == before + 1
        assert remote(node).results.get("ok", 0) == 2


async def test_a_set_an_unknown_kid_fetch_changed_is_used_though_the_asking_call_went_away(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    """The call that asked for the fetch is cancelled while the IdP answers: the fetch goes
    on and the ring is rebuilt from it, so the next token with that kid fetches nothing."""
    fetch = dataclasses.replace(FAST, timeout=SOON)
    async with remote_proxy(
        tmp_path, backend, (idp.issuer,), fetch, oidc_issuers=[idp.issuer]
    ) as node:
        assert await node.call(METHOD, idp.token("k1")) == OK
        await past_refetch_interval(idp, fetch)
        idp.add_key("k2")
        idp.mode = "held"
        ring = node.proxy.keys
        asking = asyncio.create_task(ring.refresh_for("k2", idp.issuer))
        await asyncio.wait_for(idp.holding.wait(), SOON)
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
        hits = idp.hits[JWKS]
        idp.release.set()

        async def kids() -> set[str]:
            return set(ring.current.by_kid)

        await eventually(kids, lambda found: "k2" in found)
        idp.mode = "ok"
        assert await node.call(METHOD, idp.token("k2")) == OK
        assert idp.hits[JWKS] == hits


async def test_a_removed_kid_is_refused_once_the_cache_lifetime_has_passed(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    """The token is verified (and cached by the verifier) while its key is published; the
    IdP drops the key; the set is kept for its max-age, then the background refresh
    removes the key and the very same token is refused."""
    max_age = 2.0
    idp.cache_control = f"max-age={max_age:g}"
    idp.add_key("k2")
    async with remote_proxy(tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer]) as node:
        token = idp.token("k1")
        assert await node.call(METHOD, token) == OK
        (loaded_at,) = idp.times()
        idp.remove_key("k1")

        outcomes: list[tuple[bool, tuple]] = []

        def holds_k1() -> bool:
            return "k1" in node.proxy.keys.current.by_kid

        async def call() -> tuple:
            before = holds_k1()
            outcome = await node.call(METHOD, token)
            if holds_k1() == before:  # (a call during the swap could go either way)
                outcomes.append((before, outcome))
            return outcome

        await eventually(call, lambda r: r == KEY_NOT_FOUND, within=max_age + SOON)
        # Allowed for as long as the proxy held the set with k1, refused after.
        assert {outcome for held, outcome in outcomes if held} == {OK}, outcomes
        assert {outcome for held, outcome in outcomes if not held} <= {KEY_NOT_FOUND}
        refetched = idp.times()[1]
        assert refetched - loaded_at >= max_age - 0.05  # not before the cache lifetime
        assert await node.call(METHOD, idp.token("k2")) == OK


async def test_an_unknown_kid_storm_costs_the_idp_one_fetch_per_refetch_interval(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    fetch = dataclasses.replace(FAST, refetch_interval=0.5)
    async with remote_proxy(
        tmp_path, backend, (idp.issuer,), fetch, oidc_issuers=[idp.issuer]
    ) as node:
        assert await node.call(METHOD, idp.token("k1")) == OK
        key = idp.keys["k1"]
        before = idp.hits[JWKS]
        waves, per_wave = 6, 50
        started = time.monotonic()
        outcomes: list[tuple] = []
        for _ in range(waves):  # concurrent calls, spread over more than two intervals
            tokens = [
                idp.token(f"made-up-{random.getrandbits(64):x}", key) for _ in range(per_wave)
            ]
            outcomes += await asyncio.gather(*(node.call(METHOD, t) for t in tokens))
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        fetches = idp.hits[JWKS] - before
        calls = waves * per_wave
        assert len(outcomes) == calls
        assert set(outcomes) == {KEY_NOT_FOUND}
        bound = 1 + int(elapsed / fetch.refetch_interval)  # no background refresh is due
        print(f"storm: {calls} calls over {elapsed:.2f}s -> {fetches} key-set fetches")
        assert 1 <= fetches <= bound, (fetches, elapsed)
        _, samples, _ = await node.metrics()
        throttled = value_of(
            samples, "authproxy_key_fetches_total", source=idp.discovery_url, result="throttled"
        )
        assert throttled is not None and throttled >= calls - 2 * per_wave * fetches
        # The real key still works, without a fetch.
        before = idp.hits[JWKS]
        assert await node.call(METHOD, idp.token("k1")) == OK
        assert idp.hits[JWKS] == before


# --- an identity provider that misbehaves after a good load --------------------------------


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("down", "HTTP 503"),
        ("garbage", "not a valid JSON document"),
        ("not-jwks", "expected a JWKS"),
        ("slow", "no answer within 0.5s"),
        ("huge", "larger than 65536 bytes"),
        ("huge-chunked", "larger than 65536 bytes"),
        ("redirect", "HTTP 302"),
    ],
)
async def test_a_failing_idp_keeps_the_last_good_keys_counts_errors_and_recovers(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp, mode: str, says: str
):
    idp.cache_control = "no-store"  # refetched every cache_min (0.2 s)
    async with remote_proxy(tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer]) as node:
        source = remote(node)
        assert await node.call(METHOD, idp.token("k1")) == OK
        idp.mode = mode
        await counted(source, "error", 2)  # failed, retried, failed again
        assert says in (source.last_error or ""), source.last_error
        # A token never seen before (no cache) still verifies with the last good keys.
        assert await node.call(METHOD, idp.token("k1")) == OK
        assert [k.kid for k in node.proxy.keys.current] == ["k1"]
        _, samples, _ = await node.metrics()
        errors = value_of(
            samples, "authproxy_key_fetches_total", source=idp.discovery_url, result="error"
        )
        assert errors is not None and errors >= 2
        if mode == "redirect":
            assert idp.hits[MOVED] == 0  # redirects are not followed
        status, _ = await readyz(node)
        assert status == 200  # loaded once: still ready

        idp.add_key("k2")  # published while the proxy could not fetch
        idp.mode = "ok"
        await counted(source, "ok", 2)  # a background retry brought the new set
        assert source.last_error is None
        assert await node.call(METHOD, idp.token("k2")) == OK


async def test_failed_fetches_are_retried_with_doubling_backoff_up_to_cache_min(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    fetch = dataclasses.replace(FAST, cache_min=2.0)
    idp.mode = "down"
    async with remote_proxy(tmp_path, backend, fetch=fetch, jwks=[idp.jwks_url]) as node:
        await counted(remote(node), "error", 4, within=3 * SOON)
        times = idp.times()
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # 1 s, 2 s, 2 s (each +-10 % jitter): never sooner than the backoff ...
        assert gaps[0] >= 0.9 - 0.05, gaps
        assert all(gap >= 1.8 - 0.05 for gap in gaps[1:3]), gaps
        # ... and no longer than cache_min: the third wait is not doubled to 4 s.
        assert gaps[2] < 3.6, gaps


async def test_a_failed_unknown_kid_fetch_is_retried_in_the_background(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    """The set is fresh for a minute (no background fetch due), the IdP rotates while it
    is briefly down: the unknown-kid fetch fails, and the retry comes with the backoff,
    not a minute later, and without another call asking for it."""
    async with remote_proxy(tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer]) as node:
        source = remote(node)
        assert await node.call(METHOD, idp.token("k1")) == OK
        await past_refetch_interval(idp)
        idp.add_key("k2")
        idp.mode = "down"
        assert await node.call(METHOD, idp.token("k2")) == KEY_NOT_FOUND
        assert source.results.get("error") == 1
        idp.mode = "ok"
        await counted(source, "ok", 2)
        assert await node.call(METHOD, idp.token("k2")) == OK


async def test_a_key_set_sent_in_several_chunks_is_read_whole(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    for n in range(2, 6):
        idp.add_key(f"k{n}", kty="RSA")  # a few kB: several chunks
    idp.mode = "chunked"
    async with remote_proxy(tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer]) as node:
        source = remote(node)
        assert source.loaded, source.last_error
        assert len(node.proxy.keys.current) == 5
        assert await node.call(METHOD, idp.token("k5")) == OK


# --- Cache-Control ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache_control", "cache_min", "cache_max", "lifetime"),
    [
        ("public, max-age=1", 0.2, 60.0, 1.0),  # honoured within [cache_min, cache_max]
        ("no-store", 0.5, 60.0, 0.5),  # -> cache_min
        ("max-age=0", 0.5, 60.0, 0.5),  # below cache_min -> cache_min
        ("max-age=86400", 0.2, 1.0, 1.0),  # clamped to cache_max
    ],
)
async def test_the_background_refetch_follows_cache_control_within_cache_min_and_max(
    tmp_path: Path,
    backend: EchoBackend,
    idp: FakeIdp,
    cache_control: str,
    cache_min: float,
    cache_max: float,
    lifetime: float,
):
    idp.cache_control = cache_control
    fetch = dataclasses.replace(FAST, cache_min=cache_min, cache_max=cache_max)
    async with remote_proxy(tmp_path, backend, fetch=fetch, jwks=[idp.jwks_url]) as node:

        async def fetches() -> int:
            return len(idp.times())

        await eventually(fetches, lambda n: n >= 3, within=2 * lifetime + SOON)
        times = idp.times()
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(gap >= lifetime - 0.05 for gap in gaps), gaps  # not before it runs out
        source = remote(node)
        assert source.results.get("unchanged", 0) >= 2 and source.results["ok"] == 1


# --- several issuers ---------------------------------------------------------------------------


async def test_several_issuers_each_key_verifies_only_its_issuers_tokens(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    own, own_shared = own_key("own-1"), own_key("shared")
    idp_shared = idp.add_key("shared")  # the same kid at both issuers
    own_file = write_jwks(tmp_path / "own.json", own.jwk(), own_shared.jwk())
    async with remote_proxy(
        tmp_path,
        backend,
        (OWN, idp.issuer),
        issuer_jwks=[f"{OWN}={own_file}"],
        oidc_issuers=[idp.issuer],
    ) as node:
        assert await node.call(METHOD, sign(own, "own-1", OWN)) == OK
        assert await node.call(METHOD, idp.token("k1")) == OK
        # Genuine signatures, claiming the other issuer.
        assert await node.call(METHOD, idp.token("k1", iss=OWN)) == WRONG_ISSUER
        assert await node.call(METHOD, sign(own, "own-1", idp.issuer)) == WRONG_ISSUER
        # One kid, two issuers: each key verifies its own issuer's tokens only.
        assert await node.call(METHOD, sign(own_shared, "shared", OWN)) == OK
        assert await node.call(METHOD, sign(idp_shared, "shared", idp.issuer)) == OK
        assert await node.call(METHOD, sign(idp_shared, "shared", OWN)) == WRONG_ISSUER
        assert await node.call(METHOD, sign(own_shared, "shared", idp.issuer)) == WRONG_ISSUER
        # An unknown kid claiming the own issuer asks no remote set.
        await past_refetch_interval(idp)
        fetched = idp.hits[JWKS]
        assert await node.call(METHOD, sign(own, "nobody", OWN)) == KEY_NOT_FOUND
        assert idp.hits[JWKS] == fetched


async def test_a_kid_another_issuer_uses_is_fetched_when_the_idp_starts_using_it(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    """The own issuer has `shared` from the start; the IdP publishes a key with the same
    kid later. Its first token must fetch the IdP's set (the kid is unknown *for that
    issuer*), not fail against the other issuer's key."""
    own_shared = own_key("shared")
    own_file = write_jwks(tmp_path / "own.json", own_shared.jwk())
    async with remote_proxy(
        tmp_path,
        backend,
        (OWN, idp.issuer),
        issuer_jwks=[f"{OWN}={own_file}"],
        oidc_issuers=[idp.issuer],
    ) as node:
        await past_refetch_interval(idp)
        idp_shared = idp.add_key("shared")
        before = idp.hits[JWKS]
        assert await node.call(METHOD, sign(idp_shared, "shared", idp.issuer)) == OK
        assert idp.hits[JWKS] == before + 1
        assert await node.call(METHOD, sign(own_shared, "shared", OWN)) == OK
        # A forged token (a key nobody publishes) still fails, after the throttle.
        forged = sign(own_key("shared"), "shared", idp.issuer)
        assert (await node.call(METHOD, forged))[1] in ("BAD_SIGNATURE", "KEY_NOT_FOUND")
        assert await node.call(METHOD, sign(own_shared, "shared", idp.issuer)) == WRONG_ISSUER


# --- what a remote set may contain -------------------------------------------------------------


async def test_a_remote_key_with_private_members_is_skipped_and_the_good_one_used(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    k1 = idp.keys["k1"]
    leaked = own_key("leaked")
    private = json.loads(ECAlgorithm.to_jwk(leaked.private))  # with "d"
    idp.extra = [{**private, "kid": "leaked", "use": "sig"}]
    idp.cache_control = "no-store"
    async with remote_proxy(tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer]) as node:
        source = remote(node)
        assert [k.kid for k in node.proxy.keys.current] == ["k1"]
        assert await node.call(METHOD, idp.token("k1")) == OK
        assert await node.call(METHOD, sign(leaked, "leaked", idp.issuer)) == KEY_NOT_FOUND

        idp.remove_key("k1")  # now only the unusable key: the set is refused
        await counted(source, "error", 1)
        assert "no usable verification key" in (source.last_error or "")
        assert await node.call(METHOD, sign(k1, "k1", idp.issuer)) == OK


# --- key files -----------------------------------------------------------------------------


async def test_key_file_live_reload_new_keys_bad_edits_and_retire_at(
    tmp_path: Path, backend: EchoBackend
):
    k1, k2, k3 = own_key("f1"), own_key("f2"), own_key("f3")
    path = write_jwks(tmp_path / "keys" / "jwks.json", k1.jwk())
    async with remote_proxy(tmp_path, backend, (OWN,), jwks=[str(path)]) as node:
        (source,) = node.proxy.keys.files
        assert isinstance(source, KeyFile)
        await counted(source, "unchanged", 1)  # the watch is listening

        def call(key: SigningKey) -> Awaitable[tuple]:
            return node.call(METHOD, sign(key, key.kid, OWN))

        assert await call(k2) == KEY_NOT_FOUND
        write_jwks(path, k1.jwk(), k2.jwk())  # add a key: live without a restart
        await eventually(lambda: call(k2), lambda r: r == OK)
        assert await call(k1) == OK

        write_atomically(path, '{"keys": [')  # a bad edit keeps the old keys
        await counted(source, "error", 1)
        assert await call(k1) == OK and await call(k2) == OK
        _, samples, _ = await node.metrics()
        assert value_of(samples, "authproxy_key_fetches_total", source=str(path), result="error")

        now = time.time()
        retire = now + 4.0
        write_jwks(
            path,
            {**k1.jwk(), "retire_at": int(now) - 10},  # retired already: not used
            k2.jwk(),
            {**k3.jwk(), "retire_at": retire},  # retires in 4 s: the ring's timer
        )
        await eventually(lambda: call(k1), lambda r: r == KEY_NOT_FOUND)
        assert time.time() < retire - 0.2, "the reload took too long to test the timer"
        assert await call(k3) == OK
        reloads = dict(source.results)
        refused = await eventually(lambda: call(k3), lambda r: r == KEY_NOT_FOUND, 4 + SOON)
        assert refused == KEY_NOT_FOUND and time.time() >= retire
        assert source.results == reloads  # no reload did it
        assert await call(k2) == OK


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture
async def tls_idp(tmp_path: Path) -> AsyncIterator[tuple[FakeIdp, Path]]:
    ca = make_ca()
    cert, key = ca.issue("idp", ips=("127.0.0.1",), client=False).write(tmp_path / "tls", "idp")
    server = await FakeIdp(tls=server_tls(str(cert), str(key))).start()
    server.add_key("k1")
    yield server, ca.write(tmp_path / "tls" / "ca.crt")
    await server.close()


async def test_an_https_idp_is_trusted_with_jwks_ca(
    tmp_path: Path, backend: EchoBackend, tls_idp: tuple[FakeIdp, Path]
):
    idp, ca = tls_idp
    assert idp.issuer.startswith("https://")
    async with remote_proxy(
        tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer], jwks_ca=str(ca)
    ) as node:
        assert await node.call(METHOD, idp.token("k1")) == OK


async def test_an_https_idp_with_a_private_ca_is_refused_with_the_system_roots(
    tmp_path: Path, backend: EchoBackend, tls_idp: tuple[FakeIdp, Path]
):
    idp, _ = tls_idp
    async with remote_proxy(tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer]) as node:
        assert await node.call(METHOD, idp.token("k1")) == KEYS_UNAVAILABLE
        error = remote(node).last_error or ""
        assert "certificate" in error.lower(), error
        assert idp.hits[JWKS] == 0


# --- configuration errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--issuer-jwks", "nonsense"], "--issuer-jwks 'nonsense': expected ISSUER=FILE_OR_URL"),
        (["--oidc-issuer", "ftp://x"], "--oidc-issuer 'ftp://x': expected an https:// URL"),
        (["--jwks-ca", "/missing"], "--jwks-ca /missing: cannot load CA certificates"),
        (
            ["--jwks-cache-min", "2h", "--jwks-cache-max", "1h"],
            "--jwks-cache-min is longer than --jwks-cache-max",
        ),
    ],
)
def test_remote_key_flags_config_errors_exit_2_with_one_line(
    tmp_path: Path, keys: Keys, args: list[str], words: str
):
    result = serve(
        tmp_path,
        "--policy", POLICY, "--jwks", str(keys.jwks),
        "--hmac-secret-env", "refresh-hmac=CLI_REFRESH_SECRET",
        *args, *ADDRESSES,
    )  # fmt: skip
    assert_config_error(result, words)


# --- metrics ---------------------------------------------------------------------------------------


async def test_metrics_show_key_fetches_by_source_and_result_and_the_key_set_age(
    tmp_path: Path, backend: EchoBackend, idp: FakeIdp
):
    async with remote_proxy(tmp_path, backend, (idp.issuer,), oidc_issuers=[idp.issuer]) as node:
        families, samples, text = await node.metrics()
        ok = value_of(samples, "authproxy_key_fetches_total", source=idp.discovery_url, result="ok")
        assert ok == 1, text
        assert {"authproxy_key_fetches", "authproxy_key_set_age_seconds"} <= families
        age = value_of(samples, "authproxy_key_set_age_seconds", source=idp.discovery_url)
        assert age is not None and 0 <= age < 60
        assert value_of(samples, "authproxy_keys_loaded") == 1
