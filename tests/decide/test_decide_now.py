"""`Authorizer.decide_now`: the decision without a coroutine when no step waits, else an
awaitable whose waiting steps start only when it is awaited (in a task).

A front end on Python 3.11 (no eager tasks) calls it to decide a call with a cached token
in the same event loop turn, with no task; anything that waits (single use, rate limits,
a slow state check) is still decided exactly as `decide` does, once awaited.
"""

from __future__ import annotations

import asyncio

import pytest

from authproxy.decide.decision import Decision
from authproxy.decide.pipeline import Authorizer
from authproxy.decide.reasons import Denied, Reason
from authproxy.decide.state_checks import SingleUse, revocation_check
from authproxy.keys.verify import TokenVerifier, VerifiedToken
from authproxy.policy.model import Rule
from authproxy.state.store import MemoryState
from tests.support.tokens import (
    METHOD_FOR,
    POLICY_YAML,
    Clock,
    bearer,
    keyset,
    policy,
    token,
)

ONCE = "/api.v1.Auth/Once"
ACCESS = METHOD_FOR["access"]


def authorizer(clock: Clock) -> tuple[Authorizer, list[Decision]]:
    """The pipeline with the state steps `serve` installs (revocation, single use) on
    in-memory state, and an observer that keeps every decision it is told about."""
    text = POLICY_YAML + f"  {ONCE}: {{level: refresh, single_use: true}}\n"
    state = MemoryState(clock=clock)
    single_use = SingleUse(state, clock)
    seen: list[Decision] = []
    auth = Authorizer(
        policy(text),
        TokenVerifier(keyset(), clock=clock),
        (revocation_check(state), single_use.check),
        recorders=(single_use.record,),
        observers=(lambda decision, seconds, peer: seen.append(decision),),
    )
    return auth, seen


async def test_a_call_whose_steps_need_no_io_is_decided_at_once() -> None:
    auth, seen = authorizer(Clock())
    headers = bearer(token())
    first = auth.decide_now(ACCESS, headers)
    assert isinstance(first, Decision) and first.allowed
    assert first.identity is not None and first.identity.subject == "alice"
    second = auth.decide_now(ACCESS, headers)  # the cached token: the same answer
    assert isinstance(second, Decision)
    assert second == first
    assert seen == [first, second]  # each decision observed once
    assert await auth.decide(ACCESS, headers) == first


async def test_a_deny_without_io_is_decided_at_once_too() -> None:
    auth, seen = authorizer(Clock())
    decision = auth.decide_now(ACCESS, bearer(token("refresh")))
    assert isinstance(decision, Decision)
    assert decision.reason is Reason.WRONG_TOKEN_TYPE
    assert seen == [decision]


async def test_a_waiting_step_starts_only_when_awaited() -> None:
    """A single-use refresh waits on the store: `decide_now` hands back an awaitable, and
    until it is awaited nothing of it has happened: another call spends the token first,
    and the awaitable, awaited afterwards, finds it spent."""
    auth, seen = authorizer(Clock())
    headers = bearer(token("refresh", jti="once-1"))
    pending = auth.decide_now(ONCE, headers)
    assert not isinstance(pending, Decision)
    assert seen == []
    first = await auth.decide(ONCE, headers)
    assert first.allowed
    late = await asyncio.create_task(_awaited(pending))
    assert late.reason is Reason.REFRESH_REUSED
    assert seen == [first, late]


async def _awaited(pending: Decision | object) -> Decision:
    assert not isinstance(pending, Decision)
    return await pending  # type: ignore[misc]


async def test_a_deny_from_a_waiting_step_is_a_deny_decision() -> None:
    auth, seen = authorizer(Clock())

    async def refuses(rule: Rule, verified: VerifiedToken) -> None:
        await asyncio.sleep(0)
        raise Denied(Reason.TOKEN_REVOKED, "revoked elsewhere")

    auth.state_checks = (*auth.state_checks, refuses)
    decision = await asyncio.create_task(_awaited(auth.decide_now(ACCESS, bearer(token()))))
    assert not decision.allowed
    assert (decision.reason, decision.message) == (Reason.TOKEN_REVOKED, "revoked elsewhere")
    assert decision.identity is not None  # who was refused, as for any deny after verify
    assert seen == [decision]


async def test_a_waiting_step_runs_in_the_awaiting_task() -> None:
    """Steps that wait may need a current task (`asyncio.timeout`, as redis-py uses): they
    run when awaited, not while `decide_now` runs outside any task."""
    auth, _ = authorizer(Clock())
    tasks: list[asyncio.Task | None] = []

    async def times_out(rule: Rule, verified: VerifiedToken) -> None:
        async with asyncio.timeout(5):
            tasks.append(asyncio.current_task())
            await asyncio.sleep(0)

    auth.state_checks = (*auth.state_checks, times_out)
    task = asyncio.create_task(_awaited(auth.decide_now(ACCESS, bearer(token()))))
    decision = await task
    assert decision.allowed
    assert tasks == [task]


async def test_an_unexpected_error_in_a_waiting_step_is_raised_not_decided() -> None:
    auth, seen = authorizer(Clock())

    async def broken(rule: Rule, verified: VerifiedToken) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("store exploded")

    auth.state_checks = (*auth.state_checks, broken)
    with pytest.raises(RuntimeError, match="store exploded"):
        await auth.decide(ACCESS, bearer(token()))
    assert seen == []  # no decision was made
