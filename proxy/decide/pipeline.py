"""The decision pipeline every front end calls.

    match the method's rule -> extract the token -> verify it for the rule's level
    -> check shared state -> check requirements and `when:` conditions -> count rate limits
    -> record single use -> Decision

Only calls that pass every other step are counted or recorded: the rate limit counts a
call that passed the requirements, and a single-use token is spent (recorded) last, so a
call refused for any reason — rate limit, role, peer — leaves it usable for a retry.

`decide` takes a gRPC method path (the sidecar, and gRPC calls seen through Envoy);
`decide_http` takes an HTTP request seen through Envoy ext_authz and picks the rule by
the precedence documented there, then runs the same steps. Neither raises for a bad
request: every problem becomes a deny `Decision` with a `Reason`. The policy is read
once per call, so swapping `Authorizer.policy` (a reload) never affects a call already
in progress.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Iterable
from time import perf_counter
from typing import Any
from urllib.parse import quote

from authproxy.decide.bearer import extract_bearer
from authproxy.decide.conditions import check_conditions
from authproxy.decide.decision import Decision
from authproxy.decide.identity import Identities
from authproxy.decide.reasons import Denied, Reason
from authproxy.decide.requirements import check_requirements, peer_message
from authproxy.keys.selection import UnknownKey
from authproxy.keys.verify import TokenVerifier, VerifiedToken
from authproxy.policy.http_routes import split_path
from authproxy.policy.memo import PolicyMemo
from authproxy.policy.model import DENY, METHOD_PATH, PUBLIC, Policy, Rule
from authproxy.policy.strip_headers import override_problem

Headers = Iterable[tuple[str, str | bytes]]

#: A shared-state check (revocation, "already used?"): raise `Denied` to refuse. Checks
#: record nothing. A check returns None when it is done (a local look-up, or a rule it
#: does not apply to: no coroutine is made per call for nothing) or an awaitable when it
#: has to wait (I/O); an `async def` is a check that always waits.
StateCheck = Callable[[Rule, VerifiedToken], Awaitable[None] | None]
#: A step that records the call in shared state (single use), run last, after every other
#: step let the call through; raise `Denied` to refuse (a concurrent use won). Returns
#: None or an awaitable, as a `StateCheck` does.
Recorder = Callable[[Rule, VerifiedToken], Awaitable[None] | None]
#: The rate-limit step (`rate_limits.RateLimiter`): (rule, peer, headers, verified token or
#: None for a public rule); raise `Denied` to refuse.
Limiter = Callable[[Rule, str | None, Headers, VerifiedToken | None], Awaitable[None]]

#: Told about every decision: (decision, seconds it took, peer). Metrics, decision log.
Observer = Callable[[Decision, float, str | None], None]
#: The pipeline's steps after matching, as a generator: it yields what a step has to wait
#: for, is sent the result (or thrown the exception) and returns the `Decision`. Steps
#: that need no I/O run without any task or coroutine (`Authorizer.decide_now`).
Steps = Generator[Awaitable[Any], Any, Decision]

_MALFORMED_RULE = Rule("malformed", DENY)
#: Printable ASCII but "%": what a principal may hold unescaped.
_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class Authorizer:
    def __init__(
        self,
        policy: Policy,
        verifier: TokenVerifier,
        state_checks: Iterable[StateCheck] = (),
        limiter: Limiter | None = None,
        recorders: Iterable[Recorder] = (),
        observers: Iterable[Observer] = (),
    ) -> None:
        """`observers` are told every decision and how long it took (metrics, the
        decision log)."""
        self.policy = policy
        self.verifier = verifier
        self.state_checks = tuple(state_checks)
        self.limiter = limiter
        self.recorders = tuple(recorders)
        self.observers = tuple(observers)
        #: Each verified token's identity, made once.
        self._identities = Identities()
        #: `_http_rule`'s answers: (method, path) -> what applies.
        self._routes: PolicyMemo[tuple[str, str], Decision | tuple[str, Rule]] = PolicyMemo()
        #: `_method_rule`'s answers: method path -> rule (None: not a method path). A
        #: wildcard or default method otherwise costs a regular expression and three
        #: lookups per call.
        self._methods: PolicyMemo[str, Rule | None] = PolicyMemo()

    async def decide(
        self,
        method: str,
        headers: Headers,
        peer: str | None = None,
        principal: str | None = None,
    ) -> Decision:
        """The decision for a gRPC call to `method` (`/package.Service/Method`); `peer` is
        the connection's peer (`ipv4:1.2.3.4:5`) for rate limits keyed by client address;
        `principal` the verified client certificate's identity (mTLS), for `peers:`."""
        decision = self.decide_now(method, headers, peer, principal)
        if isinstance(decision, Decision):
            return decision
        return await decision

    def decide_now(
        self,
        method: str,
        headers: Headers,
        peer: str | None = None,
        principal: str | None = None,
    ) -> Decision | Awaitable[Decision]:
        """`decide` without a coroutine when no step has to wait (no I/O: a cached token,
        the local revocation view): the `Decision` itself. Otherwise an awaitable of it,
        which must be awaited, in a task: the steps that wait (Redis, with timeouts that
        need a current task) start only then, so nothing of them has happened yet. On
        Python 3.11, where a task cannot start eagerly, this spares a front end a task
        and two event loop turns per call."""
        started = perf_counter()
        policy = self.policy
        rule = self._rule_of(policy, method)
        if rule is None:
            return self._observed(_malformed_method(policy, method), started, peer)
        steps = self._evaluate(policy, method, rule, headers, peer, principal)
        try:
            waiting = steps.send(None)
        except StopIteration as done:
            return self._observed(done.value, started, peer)
        return self._decide_later(steps, waiting, started, peer)

    async def _decide_later(
        self, steps: Steps, waiting: Awaitable[Any], started: float, peer: str | None
    ) -> Decision:
        return self._observed(await _run(steps, waiting), started, peer)

    def _observed(self, decision: Decision, started: float, peer: str | None) -> Decision:
        if self.observers:
            self._observe(decision, started, peer)
        return decision

    async def recheck(
        self, method: str, headers: Headers, principal: str | None = None
    ) -> Decision:
        """A call already let through, judged again by the current policy (after a reload):
        rule, token and requirements, without the steps that record anything (single use,
        rate limits) and without revocation (open streams follow it by themselves)."""
        policy = self.policy
        rule = self._rule_of(policy, method)
        if rule is None:
            return _malformed_method(policy, method)
        return await _run(
            self._evaluate(policy, method, rule, headers, None, principal, recording=False)
        )

    def _rule_of(self, policy: Policy, method: str) -> Rule | None:
        """`_method_rule`, remembered per policy snapshot."""
        try:
            return self._methods.of(policy)[method]
        except KeyError:
            pass
        rule = _method_rule(policy, method)
        self._methods.keep(method, rule, len(method))
        return rule

    def refuse_later(self, decision: Decision, denied: Denied) -> Decision:
        """A call let through on its headers, refused by a later step (a request message's
        fields, `decide/request_fields.py`): the deny, told to the observers like any
        decision. Under a shadow rule it stays an allow that reports the would-be deny."""
        late = decision._replace(
            allowed=decision.rule.shadow,
            reason=denied.reason,
            message=denied.message,
            shadow=decision.rule.shadow,
        )
        return self._observed(late, perf_counter(), None)

    def _observe(self, decision: Decision, started: float, peer: str | None) -> None:
        elapsed = perf_counter() - started
        for observer in self.observers:
            observer(decision, elapsed, peer)

    async def decide_http(
        self,
        http_method: str,
        path: str,
        headers: Headers,
        grpc: bool,
        policy: Policy | None = None,
        peer: str | None = None,
        principal: str | None = None,
    ) -> Decision:
        """The decision for an HTTP request seen through Envoy.

        Precedence: a gRPC request (`grpc`, from its content-type) is judged by `methods:`
        with its path as the method. Any other request whose decoded path is a method that
        `methods:` lists (exactly or as `/pkg.Service/*`) is judged by that rule too, so a
        method cannot be reached around its rule by changing the content-type or escaping
        the path. Everything else is judged by the most specific `http:` route, else the
        `default` rule. `policy` is the snapshot to decide with (default: the current one),
        for callers that need the same snapshot afterwards; `peer` is the client address,
        `principal` the client certificate's identity as Envoy verified it.
        """
        started = perf_counter()
        if policy is None:
            policy = self.policy
        found = self._http_rule(http_method, path, headers, grpc, policy)
        if isinstance(found, Decision):  # refused before any rule applies
            decision = found
        else:
            target, rule = found
            decision = await _run(self._evaluate(policy, target, rule, headers, peer, principal))
        return self._observed(decision, started, peer)

    def _http_rule(
        self, http_method: str, path: str, headers: Headers, grpc: bool, policy: Policy
    ) -> Decision | tuple[str, Rule]:
        """(target, rule) for an HTTP request, or the deny of a request no rule can judge."""
        problem = override_problem(http_method, path, headers)
        if problem is not None:  # X-HTTP-Method-Override, X-Original-URL, ... (refused)
            return Decision(
                False,
                f"{http_method} {path}"[:256],
                _MALFORMED_RULE,
                policy.version,
                Reason.REQUEST_MALFORMED,
                problem,
            )
        if grpc:  # as in the sidecar: a method path has no query or fragment
            if "?" in path or "#" in path:
                return _malformed_method(policy, path)
            rule = self._rule_of(policy, path)
            if rule is None:
                return _malformed_method(policy, path)
            return path, rule
        path = path.partition("?")[0].partition("#")[0]
        # What a (method, path) resolves to depends on nothing else: remembered per policy.
        key = (http_method, path)
        found = self._routes.of(policy).get(key)
        if found is None:
            target = f"{http_method} {path}"
            found = _http_route(policy, http_method, path, target)
            self._routes.keep(key, found, len(target))
        return found

    def malformed(self, target: str, message: str) -> Decision:
        """A deny for a request that cannot be judged at all (no path, no attributes)."""
        return Decision(
            False, target, _MALFORMED_RULE, self.policy.version, Reason.REQUEST_MALFORMED, message
        )

    def _evaluate(
        self,
        policy: Policy,
        target: str,
        rule: Rule,
        headers: Headers,
        peer: str | None,
        principal: str | None,
        recording: bool = True,
    ) -> Steps:
        """The steps after matching: level, token, shared state, requirements, peers, rate
        limits, then the recorders (single use), which run only for a call every other step
        let through. With `recording` false, the state steps are skipped. A generator
        (`Steps`): each `yield` is a step that waits; a `Denied` thrown in there is a deny
        like any other."""
        if principal is not None and (
            "%" in principal or not (principal.isascii() and principal.isprintable())
        ):  # it travels in x-auth-peer: percent-encoded, "%" too, so it stays unambiguous
            principal = quote(principal, safe=_PRINTABLE)
        level = rule.level
        if level == PUBLIC and not rule.rate_limits and not rule.peers:
            return Decision(True, target, rule, policy.version, principal=principal)
        verified = identity = None
        try:
            if level == DENY:
                raise Denied(Reason.METHOD_DENIED, "this method is disabled")
            if level != PUBLIC:
                spec = policy.tokens[level]
                token = extract_bearer(headers, policy.max_token_bytes)
                try:
                    verified = self.verifier.verify(token, spec, policy)
                except UnknownKey as unknown:  # keys may have rotated at the issuer
                    verified = yield self.verifier.verify_refreshing(token, spec, policy, unknown)
                identity = self._identities.of(verified, spec, policy)
                if recording:
                    for check in self.state_checks:
                        waiting = check(rule, verified)
                        if waiting is not None:
                            yield waiting
                if rule.roles or rule.permissions or rule.scopes:
                    check_requirements(rule, identity)
                if rule.when:
                    check_conditions(rule.when, verified.claims, headers)
            if rule.peers and not rule.peer_allowed(principal):
                raise Denied(Reason.PEER_NOT_ALLOWED, peer_message(rule, principal))
            if rule.rate_limits and recording:
                if self.limiter is None:
                    raise Denied(Reason.STATE_UNAVAILABLE, "no rate limit storage is configured")
                yield self.limiter(rule, peer, headers, verified)
            if verified is not None and recording:
                for record in self.recorders:
                    waiting = record(rule, verified)
                    if waiting is not None:
                        yield waiting
        except Denied as denied:
            return Decision(
                rule.shadow,  # shadow mode: computed and reported, but allowed
                target,
                rule,
                policy.version,
                denied.reason,
                denied.message,
                identity=identity,  # who was refused (logs); shadow: headers too
                retry_after=denied.retry_after,
                shadow=rule.shadow,
                principal=principal,
            )
        return Decision(
            True, target, rule, policy.version, None, "", identity, None, False, principal
        )


async def _run(steps: Steps, waiting: Awaitable[Any] | None = None) -> Decision:
    """Drive `steps` (from the start, or from a step that waits, `waiting`): await what
    they wait for, hand back its result or exception (a `Denied` there becomes the deny),
    until they return the decision."""
    send, value = steps.send, None
    while True:
        if waiting is not None:
            try:
                value, send = await waiting, steps.send
            except Exception as e:
                value, send = e, steps.throw
            except BaseException:  # cancelled: the steps end here too
                steps.close()
                raise
        try:
            waiting = send(value)
        except StopIteration as done:
            return done.value


def _http_route(
    policy: Policy, http_method: str, path: str, target: str
) -> Decision | tuple[str, Rule]:
    """(target, rule) for a plain HTTP request's decoded path (query removed), by the
    precedence `Authorizer.decide_http` documents; a deny when the path is malformed."""
    try:
        segments = split_path(path)
    except Denied as denied:
        return Decision(
            False, target, _MALFORMED_RULE, policy.version, denied.reason, denied.message
        )
    decoded = "/" + "/".join(segments)
    rule = policy.listed(decoded) if METHOD_PATH.fullmatch(decoded) else None
    if rule is not None:
        return decoded, rule
    return target, policy.http.match(http_method, segments) or policy.default


def _method_rule(policy: Policy, method: str) -> Rule | None:
    """The rule for a gRPC method path; None when the path is not a method path."""
    rule = policy.exact.get(method)
    if rule is None and METHOD_PATH.fullmatch(method) is not None:
        rule = policy.match(method)
    return rule


def _malformed_method(policy: Policy, method: str) -> Decision:
    return Decision(
        False,
        method,
        _MALFORMED_RULE,
        policy.version,
        Reason.METHOD_MALFORMED,
        "not a gRPC method path ('/package.Service/Method')",
    )
