"""In-process microbenchmarks: token verification and policy matching, returned as figures.

    .venv/bin/python -m bench.micro [--quick] [--json FILE]

Nothing here touches the network: each figure times one function of the proxy in a
loop, in this process, against a floor or against itself at another size.

`cold_verify` — what a token that is not in the verifier's cache costs. For each of
RS256, ES256, EdDSA (keys made by `keygen`) and HS256 (an HMAC secret, as
`--hmac-secret-env` loads it), a pool of 200 access tokens with distinct `sub` and `jti`
is minted, then verified in turn by

- ours: `TokenVerifier(keys, cache_size=0).verify(token, spec, policy)` with the access
  `TokenSpec` of a parsed policy — strict header and JSON, key by `kid`, signature, type
  claim, audience, issuer, expiry and the identity claims, on every call;
- the floor: `jwt.decode(token, key, algorithms=[alg], audience=..., issuer=...)` with
  the same key (the `PyJWK` our verifier uses), which checks the signature, `aud`,
  `iss`, `exp`, `iat` and `nbf`.

`ratio` is ours / PyJWT (of the two medians). One more figure, `cached_us`: a repeated
ES256 token through a verifier with the default cache, what a client reusing its token
pays.

`policy_match` — whether matching a method costs more in a large policy. Policies of 10,
1,000 and 100,000 rules are built through `parse_policy` from `policy_yaml` (95 % exact
methods `/pkg{i}.Svc{j}/Method{k}`, 5 % service wildcards `/pkg{i}.Open/*`, all five
levels, some rules with roles). `parse_s` is what `parse_policy` took, measured once and
kept out of the other figures. `lookup_ns` times `proxy.pipeline._method_rule(policy,
method)`, the lookup `Authorizer.decide` does per call, over the same ten probes at every
size: six exact hits, two wildcard hits, two misses that fall to the default. Each lookup
gets a fresh copy of its method string (as a call does, so the string's hash is computed
every time), and the figure includes the Python loop and call overhead (tens of ns).
`spread_ns` is the same lookup for exact hits only, cycling through up to 10,000 distinct
listed methods spread evenly over the policy (all of them for the smaller sizes): the
same work per lookup, but in a large policy the entries it touches are no longer in the
CPU caches, as when traffic reaches many methods of a large policy.
`decide_us` times the whole `Authorizer.decide` for a public method (awaited in one event
loop, no headers), what such a call pays.

How the figures are taken: a round runs every contender (ours and PyJWT; or the three
sizes) over the same number of calls, interleaved in small chunks — chunk 1 of each, then
chunk 2 of each, the order rotating from chunk to chunk and round to round — so a slow
spell on a shared machine falls on every side instead of one. Each figure is the median
over rounds of the per-call time in that round (`time.perf_counter_ns`). Garbage
collection is off during a round, as `timeit` has it.
Absolute numbers depend on the machine and its load; compare ratios between runs.
`quick=True` runs fewer and smaller chunks for a smoke run: noisier figures, not other
ones.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jwt

from authproxy.decide.pipeline import Authorizer, _method_rule
from authproxy.keys.issuer import SigningKey, TokenIssuer, hmac_signing_key
from authproxy.keys.keygen import keygen
from authproxy.keys.keyset import KeySet, hmac_key, load_jwks_file
from authproxy.keys.verify import TokenVerifier
from authproxy.policy.loader import parse_policy
from authproxy.policy.model import LEVELS, PUBLIC, TOKEN_LEVELS, Policy, TokenSpec
from bench.fixtures import AUTH_POLICY

ALGORITHMS = ("RS256", "ES256", "EdDSA", "HS256")
SIZES = (10, 1_000, 100_000)
#: Rounds whose median is reported: full, and with `--quick`.
ROUNDS = 15
QUICK_ROUNDS = 3
#: Distinct tokens per algorithm.
POOL = 200
HMAC_KID = "bench-hmac"


class Chunks:
    """Calls per chunk, and chunks per contender in a round (full and quick)."""

    def __init__(self, size: int, full: int, quick: int) -> None:
        self.size, self.full, self.quick = size, full, quick

    def count(self, quick: bool) -> int:
        return self.quick if quick else self.full

    def calls(self, quick: bool) -> int:
        return self.size * self.count(quick)


VERIFY = Chunks(20, POOL // 20, 2)
CACHED = Chunks(1_000, 10, 2)
LOOKUP = Chunks(500, 100, 10)
SPREAD = Chunks(500, 20, 4)
DECIDE = Chunks(200, 25, 5)

#: The probes of `policy_match`, matched alike in every policy `policy_yaml` builds:
#: exact hits (every level, one rule with roles), wildcard hits, misses to the default.
EXACT_PROBES = tuple(f"/pkg0.Svc0/Method{k}" for k in range(6))
WILDCARD_PROBES = ("/pkg0.Open/Get", "/pkg0.Open/List")
MISS_PROBES = ("/pkg0.Svc0/Unlisted", "/other.v1.Svc/Call")
PROBES = EXACT_PROBES + WILDCARD_PROBES + MISS_PROBES
#: A method with a public exact rule in every policy `policy_yaml` builds.
PUBLIC_METHOD = EXACT_PROBES[0]

_POLICY_HEAD = """\
version: 1
default: deny
issuer: bench
tokens:
  2fa: {type: 2fa_pending, audience: 2fa-verification}
  refresh: {type: refresh, audience: token-refresh}
  access: {type: access, audience: api-access}
methods:
"""

K = TypeVar("K", bound=Hashable)
#: One chunk of calls; returns the nanoseconds it took.
Chunk = Callable[[], int]


# --- timing --------------------------------------------------------------------------


def _timed(calls: Callable[[], object]) -> Chunk:
    def chunk() -> int:
        start = time.perf_counter_ns()
        calls()
        return time.perf_counter_ns() - start

    return chunk


def _interleaved(sides: Mapping[K, Sequence[Chunk]], round_no: int) -> dict[K, int]:
    """Nanoseconds per side for one round: chunk j of every side runs in turn, in an order
    that rotates with j and `round_no`. Garbage collection is off meanwhile (the objects of
    a 100,000-rule policy make a full collection take some 0.1 s)."""
    keys = list(sides)
    totals = dict.fromkeys(keys, 0)
    chunks = min(len(c) for c in sides.values())
    gc.disable()
    try:
        for j in range(chunks):
            shift = (j + round_no) % len(keys)
            for key in keys[shift:] + keys[:shift]:
                totals[key] += sides[key][j]()
    finally:
        gc.enable()
    return totals


def _median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


# --- cold verification ----------------------------------------------------------------


def _verify_all(
    verifier: TokenVerifier, spec: TokenSpec, policy: Policy, tokens: Sequence[str]
) -> None:
    verify = verifier.verify
    for token in tokens:
        verify(token, spec, policy)


def _decode_all(
    key: jwt.PyJWK, alg: str, audience: str, issuer: str, tokens: Sequence[str]
) -> None:
    decode, algorithms = jwt.decode, [alg]
    for token in tokens:
        decode(token, key, algorithms=algorithms, audience=audience, issuer=issuer)


def _signing_and_verification_keys(tmp: Path) -> tuple[dict[str, SigningKey], KeySet]:
    """A signing key per algorithm, and the key set holding all their verification keys."""
    signing: dict[str, SigningKey] = {}
    jwks = tmp / "jwks.json"
    for alg in ALGORITHMS:
        if alg != "HS256":
            signing[alg] = keygen(alg, tmp / f"{alg}.pem", jwks)
    keys = load_jwks_file(str(jwks))
    secret = secrets.token_urlsafe(32).encode()  # what --hmac-secret-env reads: text
    signing["HS256"] = hmac_signing_key(secret, HMAC_KID)
    keys.append(hmac_key(secret, HMAC_KID, "$BENCH_HMAC_SECRET"))
    return signing, KeySet(keys)


def _split(items: Sequence[str], size: int, count: int) -> list[list[str]]:
    """`count` chunks of `size` items, cycling through `items`."""
    return [[items[(j * size + i) % len(items)] for i in range(size)] for j in range(count)]


def cold_verify(rounds: int = ROUNDS, *, quick: bool = False) -> dict[str, Any]:
    """µs per full verification, ours against PyJWT, per algorithm; and the cached path.

    Returns `{"algorithms": {alg: {"ours_us": µs, "pyjwt_us": µs, "ratio": ours/pyjwt}}
    for alg in ALGORITHMS, "cached_us": {"ES256": µs}}`."""
    policy = parse_policy(AUTH_POLICY, "bench")
    spec = policy.tokens["access"]
    assert spec.issuers is not None
    audience, issuer = sorted(spec.audiences)[0], sorted(spec.issuers)[0]
    with tempfile.TemporaryDirectory(prefix="authproxy-micro-") as tmp:
        signing, keys = _signing_and_verification_keys(Path(tmp))
    cold = TokenVerifier(keys, cache_size=0)
    cached = TokenVerifier(keys)

    sides: dict[tuple[str, str], list[Chunk]] = {}
    for alg in ALGORITHMS:
        minter = TokenIssuer(policy, {"access": signing[alg]})
        pool = [minter.mint("access", f"user-{i}", ttl=3600).token for i in range(POOL)]
        key = keys.by_kid[signing[alg].kid][0].algorithms[alg]
        for token in pool:  # both accept every token, with the same claims
            claims = jwt.decode(token, key, algorithms=[alg], audience=audience, issuer=issuer)
            assert cold.verify(token, spec, policy).claims == claims
        chunks = _split(pool, VERIFY.size, VERIFY.count(quick))
        sides[alg, "ours"] = [
            _timed(lambda c=c: _verify_all(cold, spec, policy, c)) for c in chunks
        ]
        sides[alg, "pyjwt"] = [
            _timed(lambda c=c, k=key, a=alg: _decode_all(k, a, audience, issuer, c)) for c in chunks
        ]
    es256 = TokenIssuer(policy, {"access": signing["ES256"]}).mint("access", "u", ttl=3600)
    cached.verify(es256.token, spec, policy)  # now in the cache
    repeated = [es256.token] * CACHED.size
    hot = [_timed(lambda: _verify_all(cached, spec, policy, repeated))] * CACHED.count(quick)

    samples: dict[tuple[str, str], list[float]] = {side: [] for side in sides}
    cached_us: list[float] = []
    for r in range(rounds):
        shift = r % len(ALGORITHMS)
        for alg in ALGORITHMS[shift:] + ALGORITHMS[:shift]:
            pair = {side: sides[side] for side in ((alg, "ours"), (alg, "pyjwt"))}
            for side, ns in _interleaved(pair, r).items():
                samples[side].append(ns / VERIFY.calls(quick) / 1e3)
        cached_us.append(_interleaved({"cached": hot}, r)["cached"] / CACHED.calls(quick) / 1e3)

    results: dict[str, dict[str, float]] = {}
    for alg in ALGORITHMS:
        ours, floor = _median(samples[alg, "ours"]), _median(samples[alg, "pyjwt"])
        results[alg] = {"ours_us": ours, "pyjwt_us": floor, "ratio": ours / floor}
    return {"algorithms": results, "cached_us": {"ES256": _median(cached_us)}}


# --- policy matching ------------------------------------------------------------------


def policy_yaml(rules: int) -> str:
    """A policy file with `rules` method rules (at least 10): 95 % exact methods
    `/pkg{i}.Svc{j}/Method{k}` (100 per package), 5 % wildcards `/pkg{w}.Open/*`; levels
    cycle through all five, and every 7th exact rule of a token level asks for roles."""
    if rules < 10:
        raise ValueError("a policy for the probes needs at least 10 rules")
    wildcards = max(1, rules // 20)
    lines = [_POLICY_HEAD]
    for e in range(rules - wildcards):
        level = LEVELS[e % len(LEVELS)]
        if level in TOKEN_LEVELS and e % 7 == 0:
            level = f"{{level: {level}, roles: [admin, ops]}}"
        lines.append(f"  /pkg{e // 100}.Svc{e // 10 % 10}/Method{e % 10}: {level}\n")
    for w in range(wildcards):
        lines.append(f"  /pkg{w}.Open/*: {LEVELS[w % len(LEVELS)]}\n")
    return "".join(lines)


def _fresh(methods: Sequence[str], size: int, count: int) -> list[list[str]]:
    """`count` chunks of `size` method strings cycling through `methods`, each string a new
    object (its hash is computed on first use, as for a call's method path)."""
    return [[m[:1] + m[1:] for m in chunk] for chunk in _split(methods, size, count)]


def _spread(policy: Policy, count: int) -> list[str]:
    """Up to `count` distinct exact methods of `policy`, evenly spread over its rules."""
    listed = list(policy.exact)
    return listed[:: max(1, len(listed) // count)][:count]


def _lookup_all(policy: Policy, methods: Sequence[str]) -> None:
    for method in methods:
        _method_rule(policy, method)


async def _decide_all(authorizer: Authorizer, methods: Sequence[str]) -> int:
    """Nanoseconds `decide` takes for every method in turn."""
    decide = authorizer.decide
    start = time.perf_counter_ns()
    for method in methods:
        await decide(method, ())
    return time.perf_counter_ns() - start


def policy_match(rounds: int = ROUNDS, *, quick: bool = False) -> dict[str, Any]:
    """Per-call cost of matching a method at 10, 1,000 and 100,000 rules.

    Returns `{"sizes": {rules: {"parse_s": s, "lookup_ns": ns, "spread_ns": ns,
    "decide_us": µs}} for rules in SIZES, "ratio_100k_vs_10": lookup ratio, "decide_ratio_100k_vs_10": ratio}`."""
    policies: dict[int, Policy] = {}
    parse_s: dict[int, float] = {}
    for size in SIZES:
        text = policy_yaml(size)
        start = time.perf_counter()
        policies[size] = parse_policy(text, f"micro-{size}.yaml")
        parse_s[size] = time.perf_counter() - start
        assert policies[size].rule_count == size
    small = policies[SIZES[0]]
    for policy in policies.values():  # every size matches the probes alike
        for method in PROBES:
            rule, expected = _method_rule(policy, method), _method_rule(small, method)
            assert rule is not None and expected is not None
            assert (rule.pattern, rule.level) == (expected.pattern, expected.level), method
        assert policy.match(PUBLIC_METHOD).level == PUBLIC
    no_keys = TokenVerifier(KeySet())
    authorizers = {size: Authorizer(policy, no_keys) for size, policy in policies.items()}

    spread_probes = {
        size: _spread(policy, SPREAD.calls(False)) for size, policy in policies.items()
    }
    lookup_ns: dict[int, list[float]] = {size: [] for size in SIZES}
    spread_ns: dict[int, list[float]] = {size: [] for size in SIZES}
    decide_us: dict[int, list[float]] = {size: [] for size in SIZES}
    with asyncio.Runner() as runner:
        for authorizer in authorizers.values():
            assert runner.run(authorizer.decide(PUBLIC_METHOD, ())).allowed
        for r in range(rounds):
            lookups = {
                size: [
                    _timed(lambda p=policy, c=c: _lookup_all(p, c))
                    for c in _fresh(PROBES, LOOKUP.size, LOOKUP.count(quick))
                ]
                for size, policy in policies.items()
            }
            for size, ns in _interleaved(lookups, r).items():
                lookup_ns[size].append(ns / LOOKUP.calls(quick))
            spread = {
                size: [
                    _timed(lambda p=policy, c=c: _lookup_all(p, c))
                    for c in _fresh(spread_probes[size], SPREAD.size, SPREAD.count(quick))
                ]
                for size, policy in policies.items()
            }
            for size, ns in _interleaved(spread, r).items():
                spread_ns[size].append(ns / SPREAD.calls(quick))
            decides = {
                size: [
                    lambda a=authorizer, c=c: runner.run(_decide_all(a, c))
                    for c in _fresh((PUBLIC_METHOD,), DECIDE.size, DECIDE.count(quick))
                ]
                for size, authorizer in authorizers.items()
            }
            for size, ns in _interleaved(decides, r).items():
                decide_us[size].append(ns / DECIDE.calls(quick) / 1e3)

    sizes = {
        size: {
            "parse_s": parse_s[size],
            "lookup_ns": _median(lookup_ns[size]),
            "spread_ns": _median(spread_ns[size]),
            "decide_us": _median(decide_us[size]),
        }
        for size in SIZES
    }
    small_row, large_row = sizes[SIZES[0]], sizes[SIZES[-1]]
    return {
        "sizes": sizes,
        "ratio_100k_vs_10": large_row["lookup_ns"] / small_row["lookup_ns"],
        "decide_ratio_100k_vs_10": large_row["decide_us"] / small_row["decide_us"],
    }


# --- the command -----------------------------------------------------------------------


def run(quick: bool = False) -> dict[str, Any]:
    """Both benchmarks: `ROUNDS`, or `QUICK_ROUNDS` of small chunks with `quick`."""
    rounds = QUICK_ROUNDS if quick else ROUNDS
    return {
        "cold_verify": cold_verify(rounds, quick=quick),
        "policy_match": policy_match(rounds, quick=quick),
    }


def print_figures(figures: Mapping[str, Any]) -> None:
    verify, match = figures["cold_verify"], figures["policy_match"]
    print("token verification without the cache (µs per token, medians):")
    print(f"  {'alg':<6} {'ours':>8} {'PyJWT':>8} {'ours/PyJWT':>11}")
    for alg, row in verify["algorithms"].items():
        print(f"  {alg:<6} {row['ours_us']:8.1f} {row['pyjwt_us']:8.1f} {row['ratio']:11.2f}")
    print(f"  cached ES256 token: {verify['cached_us']['ES256']:.2f} µs per verify")
    print("method matching (medians):")
    print(f"  {'rules':>7} {'parse':>8} {'lookup':>10} {'spread':>10} {'decide':>10}")
    for size, row in match["sizes"].items():
        print(
            f"  {size:>7} {row['parse_s']:7.2f}s {row['lookup_ns']:7.0f} ns "
            f"{row['spread_ns']:7.0f} ns {row['decide_us']:7.2f} µs"
        )
    print(f"  lookup 100k / 10 rules = {match['ratio_100k_vs_10']:.2f}")
    print(f"  decide 100k / 10 rules = {match['decide_ratio_100k_vs_10']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of small chunks")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    started = time.perf_counter()
    figures = run(quick=args.quick)
    print_figures(figures)
    print(f"({time.perf_counter() - started:.1f}s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
