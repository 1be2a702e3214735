"""`PolicyMemo`: answers computed from one policy snapshot, kept until the policy
changes (the pipeline's method-rule and HTTP-route lookups)."""

from __future__ import annotations

from typing import Generic, TypeVar

from authproxy.policy.model import Policy

K = TypeVar("K")
V = TypeVar("V")

#: How many answers a memo keeps, and the longest key (a method path, "METHOD /path") kept.
MAX_ANSWERS = 4096
MAX_KEY = 512


class PolicyMemo(Generic[K, V]):
    """Answers that depend only on the policy snapshot and a key: forgotten when the
    policy changes. Bounded, since keys come from clients: a key longer than
    `MAX_KEY` is not kept, and a flood of distinct keys only empties the memo."""

    __slots__ = ("answers", "policy")

    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.answers: dict[K, V] = {}

    def of(self, policy: Policy) -> dict[K, V]:
        """The answers for `policy` (none yet, for a new snapshot)."""
        if policy is not self.policy:
            self.policy, self.answers = policy, {}
        return self.answers

    def keep(self, key: K, answer: V, length: int) -> None:
        """Remember `answer` for `key` (of `length` characters) under the current policy."""
        if length <= MAX_KEY:
            if len(self.answers) >= MAX_ANSWERS:
                self.answers.clear()
            self.answers[key] = answer
