"""What the proxy would do with one call, and why — decided by the runtime's own code.

The verdict is `Authorizer.decide` (or `decide_http`) itself, on an authorizer built from
the same configuration and keys as `serve` (`serve.load_keys`, `check_policy_keys`) with
the same state checks and rate limiter. To say *where* a call stops, the pipeline's steps
are also run one at a time — `extract_bearer`, `TokenVerifier.verify` (reported as its
signature layer and its claims layer), `identity_of`, `check_requirements` — so the
report and the verdict come from the same functions.

Offline there is no shared state: the authorizer starts from an empty in-memory store,
so nothing is revoked, no single-use token has been spent and no call has been counted.
The report says so for each such step ("not checked offline").
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from authproxy.decide.bearer import extract_bearer
from authproxy.decide.conditions import check_conditions
from authproxy.decide.decision import Decision
from authproxy.decide.identity import Identity, identity_of
from authproxy.decide.pipeline import Authorizer, Headers
from authproxy.decide.reasons import Denied, Reason
from authproxy.decide.request_fields import check_fields_json
from authproxy.decide.requirements import check_requirements
from authproxy.keys.ring import KeyRing
from authproxy.keys.verify import TokenVerifier, VerifiedToken, check_claims, shown
from authproxy.policy.model import PUBLIC, Policy, RateLimit, Rule, TokenSpec
from authproxy.runtime.serve import (
    ServeConfig,
    assemble_authorizer,
    check_policy_keys,
    load_keys,
    read_policy,
)
from authproxy.state.store import MemoryState

OK, FAIL, OFFLINE = "ok", "FAIL", "not checked offline"


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    outcome: str  # OK, FAIL, OFFLINE, or "not needed"
    detail: str = ""
    reason: Reason | None = None


@dataclass(frozen=True, slots=True)
class Explanation:
    target: str  # the method path, or "GET /path"
    http: bool
    policy: Policy
    decision: Decision  # from Authorizer.decide / decide_http: the verdict
    steps: tuple[Step, ...]

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @property
    def not_checked_offline(self) -> list[str]:
        """The steps reached that need shared state, which explain does not have."""
        return [s.name for s in self.steps if s.outcome == OFFLINE]


def offline_authorizer(
    cfg: ServeConfig,
    state: MemoryState,
    need_keys: bool,
    now: float | None = None,
    keys: KeyRing | None = None,
) -> Authorizer:
    """An `Authorizer` for `cfg` as `serve` builds one, on `state` (empty: offline) and a
    clock fixed at `now` (so every step sees the same time). `need_keys`: refuse, as
    `serve` does, a policy whose token levels have no key."""
    policy, _ = read_policy(cfg)
    keys = keys or load_keys(cfg)
    if need_keys:
        check_policy_keys(policy, keys)
    fixed = time.time() if now is None else now
    verifier = TokenVerifier(
        keys, cache_size=0, clock=lambda: fixed, refresher=keys.refresh_for if keys.remote else None
    )
    return assemble_authorizer(policy, verifier, state)


async def explain_offline(
    cfg: ServeConfig,
    target: str,
    token: str | None = None,
    http_method: str | None = None,
    now: float | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    request: Mapping[str, Any] | None = None,
) -> Explanation:
    """`explain` on a fresh `offline_authorizer(cfg)` at time `now` (default: the clock).
    Keys are required, as by `serve`, when there is a token to verify or keys are
    configured; a call without a token never reaches a key."""
    configured = cfg.jwks or cfg.issuer_jwks or cfg.oidc_issuers
    need_keys = token is not None or bool(configured or cfg.public_keys or cfg.hmac_secret_envs)
    state = MemoryState(subject_ttl=cfg.subject_revocation_ttl)
    keys = load_keys(cfg)
    try:
        if keys.remote:  # fetch them as serve would
            await keys.start()
            await keys.wait_loaded(cfg.jwks_fetch.timeout)
        authorizer = offline_authorizer(cfg, state, need_keys, now, keys)
        return await explain(authorizer, target, token, http_method, headers, request)
    finally:
        await keys.close()
        await state.close()


async def explain(
    authorizer: Authorizer,
    target: str,
    token: str | None = None,
    http_method: str | None = None,
    extra_headers: tuple[tuple[str, str], ...] = (),
    request: Mapping[str, Any] | None = None,
) -> Explanation:
    """Explain a gRPC call to `target` (a method path), or with `http_method` an HTTP
    request for the path `target`, carrying `token` (a JWT, or a whole `Bearer ...`),
    `extra_headers` (what `when:` conditions bind to claims) and, as JSON, the `request`
    message's fields (what a `request:` rule checks)."""
    headers: list[tuple[str, str]] = list(extra_headers)
    if token is not None:
        headers.append(("authorization", token if " " in token.strip() else f"Bearer {token}"))
    if http_method is None:
        decision = await authorizer.decide(target, headers)
    else:
        decision = await authorizer.decide_http(http_method, target, headers, grpc=False)
    if request is not None and decision.allowed and decision.identity is not None:
        try:  # the front ends' step after the headers: the request message
            check_fields_json(decision.rule, decision.identity, request)
        except Denied as denied:
            decision = authorizer.refuse_later(decision, denied)
    policy = authorizer.policy
    steps = tuple(_steps(authorizer.verifier, policy, decision.rule, headers, request))
    shown_target = target if http_method is None else f"{http_method} {target}"
    return Explanation(shown_target, http_method is not None, policy, decision, steps)


# --- the steps, in the pipeline's order --------------------------------------------------


def _steps(
    verifier: TokenVerifier,
    policy: Policy,
    rule: Rule,
    headers: Headers,
    request: Mapping[str, Any] | None,
) -> list[Step]:
    if rule.level == PUBLIC:
        steps = [Step("token", "not needed", "a public rule looks at no token")]
    elif rule.needs_token:
        spec = policy.tokens[rule.level]
        steps = list(_token_steps(verifier, policy, rule, spec, headers, request))
    else:
        return []  # deny, or no rule at all: the verdict says why
    if rule.rate_limits and steps[-1].outcome != FAIL:
        steps.append(Step("rate limits", OFFLINE, "; ".join(map(rate_text, rule.rate_limits))))
    if rule.single_use and steps[-1].outcome != FAIL:  # recorded last: only an allowed call
        steps.append(Step("single use", OFFLINE, "needs a 'jti'; no token has been used yet"))
    return steps


def _token_steps(
    verifier: TokenVerifier,
    policy: Policy,
    rule: Rule,
    spec: TokenSpec,
    headers: Headers,
    request: Mapping[str, Any] | None,
) -> Iterator[Step]:
    try:
        token = extract_bearer(headers, policy.max_token_bytes)
    except Denied as d:
        yield _failed("token", d)
        return
    yield Step("token", OK, f"one bearer token, {len(token)} bytes")
    try:
        verified = verifier.verify(token, spec, policy)
    except Denied as d:
        yield from _verify_failure(verifier, token, spec, policy, d)
        return
    yield _signature_ok(verified)
    yield Step("claims", OK, _claims(verified, spec, policy, verifier.clock()))
    try:
        identity = identity_of(verified, spec, policy)
    except Denied as d:
        yield _failed("identity", d)
        return
    yield Step("identity", OK, _identity(identity))
    yield Step("revocation", OFFLINE, "nothing is revoked in an empty state")
    try:
        check_requirements(rule, identity)
    except Denied as d:
        yield _failed("requirements", d)
        return
    yield Step("requirements", OK, "; ".join(requirements(rule)) or "none")
    if rule.when:
        try:
            check_conditions(rule.when, verified.claims, headers)
        except Denied as d:
            yield _failed("conditions", d)
            return
        yield Step("conditions", OK, "; ".join(map(str, rule.when)))
    if rule.request is not None:
        yield _request_step(rule, identity, request)


def _request_step(rule: Rule, identity: Identity, request: Mapping[str, Any] | None) -> Step:
    """The `request:` fields, on the request written as JSON (`--request`)."""
    if request is None:
        return Step("request", OFFLINE, f"{rule.request}: give --request JSON to check one")
    try:
        check_fields_json(rule, identity, request)
    except Denied as d:
        return _failed("request", d)
    return Step("request", OK, str(rule.request))


def _verify_failure(
    verifier: TokenVerifier, token: str, spec: TokenSpec, policy: Policy, denied: Denied
) -> Iterator[Step]:
    """Which layer of `TokenVerifier.verify` refused the token: its signature layer, its
    claims layer, or (neither) the size bound it checks first."""
    try:
        verified = verifier.signature(token)
    except Denied as d:
        yield _failed("signature" if _same(d, denied) else "verify", denied)
        return
    try:
        check_claims(verified, spec, policy, verifier.clock())
    except Denied as d:
        if _same(d, denied):
            yield _signature_ok(verified)
            yield _failed("claims", denied)
            return
    yield _failed("verify", denied)


def _same(a: Denied, b: Denied) -> bool:
    return (a.reason, a.message) == (b.reason, b.message)


def _failed(name: str, denied: Denied) -> Step:
    return Step(name, FAIL, denied.message, denied.reason)


def _signature_ok(verified: VerifiedToken) -> Step:
    return Step("signature", OK, f"{verified.alg}, key {shown(verified.kid)}")


def _claims(verified: VerifiedToken, spec: TokenSpec, policy: Policy, now: float) -> str:
    claims = verified.claims
    parts = [f"{spec.type_claim} {shown(claims.get(spec.type_claim))}"]
    parts += [f"{name} {shown(claims[name])}" for name in ("aud", "iss", "sub") if name in claims]
    left = verified.exp - now
    parts.append(
        f"expires in {left:.0f}s"
        if left >= 0
        else f"expired {-left:.0f}s ago, within the leeway of {policy.leeway:g}s"
    )
    return ", ".join(parts)


def _identity(identity: Identity) -> str:
    mapped = identity.claims_from

    def source(name: str) -> str:
        return f" (claim {mapped[name]})" if name in mapped else ""

    parts = [f"subject {shown(identity.subject)}{source('subject')}"]
    for name, values in (
        ("roles", identity.roles),
        ("permissions", identity.permissions),
        ("scopes", identity.scopes),
    ):
        if values:
            parts.append(f"{name} {', '.join(values)}{source(name)}")
    return "; ".join(parts)


def requirements(rule: Rule) -> list[str]:
    """A rule's roles, permissions and scopes, one line each (none: empty)."""
    out = []
    for name, values, how in (
        ("roles", rule.roles, "any of"),
        ("permissions", rule.permissions, "all of"),
        ("scopes", rule.scopes, "all of"),
    ):
        if values:
            out.append(f"{name} ({how}) {', '.join(sorted(values))}")
    return out


def rate_text(limit: RateLimit) -> str:
    """`10 per 1 minute per client address`."""
    key = {"peer": "client address", "subject": "subject"}.get(limit.key, f"claim {limit.key!r}")
    return f"{limit.item} per {key}" + (" (fails open)" if limit.fail_open else "")


def match_kind(rule: Rule) -> str:
    """How a decision's rule was found: exact method, service wildcard, http route,
    default, or none (a request that cannot be judged)."""
    if rule.pattern == "default":
        return "default"
    if not rule.pattern.startswith("/"):
        return "http route" if " " in rule.pattern else "none"
    return "service wildcard" if rule.pattern.endswith("/*") else "exact method"
