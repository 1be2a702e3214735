"""Running a policy's tests (`policy/cases.py`): each call is decided by an `Authorizer`
put together the way `serve` and `explain` put theirs (`assemble`, which is
`runtime.serve.assemble_authorizer`), on a fresh in-memory state per test — nothing
revoked, no token used, no call counted before it.

The tokens are signed with an HMAC key made for the run, and verified with that key: the
tests check what the policy decides, not where keys come from. A level that names its
keys (`keys: [refresh-hmac]`) gets a token with that key id.

`verify_policy` is the gate of every load: a test that fails, or a test file that cannot
be used, raises `PolicyTestsFailed`, a `PolicyError` whose lines read `file:line: problem`
like those of an invalid policy, so a reload refuses it the same way.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from authproxy.decide.decision import Decision
from authproxy.decide.pipeline import Authorizer
from authproxy.decide.reasons import Denied
from authproxy.decide.request_fields import check_fields_json
from authproxy.keys.issuer import SigningKey, TokenIssuer, hmac_signing_key
from authproxy.keys.keyset import KeySet, hmac_key
from authproxy.keys.verify import TokenVerifier
from authproxy.policy.cases import ALLOW, PolicyCase, TokenRequest, load_cases, policy_test_files
from authproxy.policy.loader import PolicyError
from authproxy.policy.model import Policy
from authproxy.policy.yaml_source import SourceError
from authproxy.state.store import MemoryState, StateStore

#: Builds the pipeline on a state store, as `serve` does (`runtime.serve.assemble_authorizer`).
Assemble = Callable[[Policy, TokenVerifier, StateStore], Authorizer]
#: The connection every test call comes from (rate limits keyed by client address).
TEST_PEER = "ipv4:192.0.2.1:50000"
#: The subject of a test token whose `claims` name none.
TEST_SUBJECT = "policy-test"
#: The key id of the run's key, for levels that do not name their keys.
TEST_KID = "policy-tests"
#: How long a test token lives; an expired one ended this long before the leeway.
TOKEN_TTL = 900


class PolicyTestsFailed(PolicyError):
    """Tests of a policy failed; `str()` lists them as `file:line: test 'name' failed: ...`."""


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: PolicyCase
    decision: Decision

    @property
    def passed(self) -> bool:
        d = self.decision
        if self.case.deny is None:
            return d.allowed and d.reason is None
        return not d.allowed and d.reason == self.case.deny

    @property
    def got(self) -> str:
        d = self.decision
        if d.allowed:
            return ALLOW if d.reason is None else f"{ALLOW} (shadow mode; would deny {d.reason})"
        return f"deny {d.reason}"

    @property
    def problem(self) -> str:
        """`expected deny X, got allow`, with the decision's message when it has one."""
        message = f": {self.decision.message}" if self.decision.message else ""
        return f"expected {self.case.expected}, got {self.got}{message}"

    def error(self) -> SourceError:
        case = self.case
        return SourceError(case.file, case.line, f"test {case.name!r} failed: {self.problem}")


@dataclass(frozen=True, slots=True)
class PolicyTestRun:
    policy: Policy
    files: tuple[str, ...]
    results: tuple[CaseResult, ...]

    @property
    def passed(self) -> list[CaseResult]:
        return [r for r in self.results if r.passed]

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    def errors(self) -> list[SourceError]:
        return [r.error() for r in self.failed]

    def summary(self) -> str:
        """`9 passed, 1 failed (policy.tests.yaml)`."""
        counts = f"{len(self.passed)} passed"
        if self.failed:
            counts += f", {len(self.failed)} failed"
        return f"{counts} ({', '.join(self.files)})"


class RunKeys:
    """The run's signing key, minting the tokens tests describe, and its verifier."""

    def __init__(self, policy: Policy, now: float) -> None:
        secret = secrets.token_bytes(32)
        self.policy = policy
        self.now = now
        self.signing: dict[str, SigningKey] = {
            level: hmac_signing_key(secret, min(spec.key_ids) if spec.key_ids else TEST_KID)
            for level, spec in policy.tokens.items()
        }
        kids = sorted({key.kid for key in self.signing.values()})
        keys = KeySet(hmac_key(secret, kid, "policy tests") for kid in kids)
        self.verifier = TokenVerifier(keys, cache_size=0, clock=lambda: now)
        self.issuer = TokenIssuer(policy, self.signing, clock=lambda: now)

    def token(self, request: TokenRequest) -> str:
        """A token of `request.level` as the policy defines it, with the request's claims."""
        claims: dict[str, Any] = dict(
            self.issuer.mint(request.level, TEST_SUBJECT, ttl=TOKEN_TTL).claims
        )
        if request.expired:
            claims["exp"] = int(self.now - self.policy.leeway - 60)
            claims["iat"] = claims["exp"] - TOKEN_TTL
        for name, value in request.claims.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        key = self.signing[request.level]
        return jwt.encode(claims, key.key, algorithm=key.alg, headers={"kid": key.kid})


async def run_case(case: PolicyCase, keys: RunKeys, assemble: Assemble) -> CaseResult:
    """The decision of the case's call (of its last call, with `repeat`), on a new state."""
    headers = list(case.headers)
    if case.token is not None:
        headers.append(("authorization", f"Bearer {keys.token(case.token)}"))
    state = MemoryState()
    authorizer = assemble(keys.policy, keys.verifier, state)
    try:
        for _ in range(case.repeat):
            if case.http_method is None:
                decision = await authorizer.decide(case.target, headers, TEST_PEER, case.principal)
            else:
                decision = await authorizer.decide_http(
                    case.http_method,
                    case.target,
                    headers,
                    grpc=False,
                    peer=TEST_PEER,
                    principal=case.principal,
                )
    finally:
        await state.close()
    if decision.allowed and decision.identity is not None:
        try:  # the request message's fields, as the case writes them
            check_fields_json(decision.rule, decision.identity, case.request or {})
        except Denied as denied:
            decision = authorizer.refuse_later(decision, denied)
    return CaseResult(case, decision)


async def run_policy_tests(
    policy: Policy, assemble: Assemble, files: Sequence[str | Path] | None = None
) -> PolicyTestRun:
    """Run the tests in `files` (default: the policy's own, `policy_test_files`).
    PolicyError when a file cannot be read or has problems (all of them)."""
    paths = policy_test_files(policy) if files is None else [Path(f) for f in files]
    cases = load_cases(paths, policy)
    keys = RunKeys(policy, time.time())
    results = [await run_case(case, keys, assemble) for case in cases]
    return PolicyTestRun(policy, tuple(str(p) for p in paths), tuple(results))


async def verify_policy(policy: Policy, assemble: Assemble) -> PolicyTestRun:
    """The policy's own tests, which must all pass: PolicyTestsFailed (the failures, or the
    test files' problems) otherwise. A policy without tests passes."""
    try:
        run = await run_policy_tests(policy, assemble)
    except PolicyError as e:
        raise PolicyTestsFailed(e.errors) from None
    if run.failed:
        raise PolicyTestsFailed(run.errors())
    return run
