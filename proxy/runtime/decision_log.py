"""The decision log: one JSON line per decision, on the `authproxy.decisions` logger.

Every deny and every shadow would-deny is written; allows are sampled (`--log-allows
RATE`, 0 to 1, default 0). A line holds: time, method, rule, level, decision, reason,
sub, jti, peer, principal, policy_version, latency_ms (and shadow), and with tracing on
the decision span's trace_id and span_id. Never a token, a header value or a claim other
than `sub` and `jti`.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Callable

from authproxy.decide.client_address import parse_address
from authproxy.decide.decision import Decision
from authproxy.decide.reasons import UNMET

LOGGER = "authproxy.decisions"


class DecisionLog:
    def __init__(
        self,
        allow_sample: float = 0.0,
        logger: logging.Logger | None = None,
        rng: Callable[[], float] = random.random,
        trace_ids: Callable[[], tuple[str, str] | None] | None = None,
    ) -> None:
        """`trace_ids`: the current (decision) span's ids, with tracing on."""
        self.allow_sample = allow_sample
        self.logger = logger or logging.getLogger(LOGGER)
        self.rng = rng
        self.trace_ids = trace_ids

    def __call__(self, decision: Decision, seconds: float, peer: str | None) -> None:
        """An `Authorizer` observer."""
        if (
            decision.allowed
            and not decision.shadow
            and (self.allow_sample <= 0 or self.rng() >= self.allow_sample)
        ):  # an allow, sampled out (the random draw only for allows)
            return
        if not self.logger.isEnabledFor(logging.INFO):
            return
        line = record(decision, seconds, peer)
        if self.trace_ids is not None and (ids := self.trace_ids()) is not None:
            line["trace_id"], line["span_id"] = ids
        self.logger.info(json.dumps(line, separators=(",", ":")))


def record(decision: Decision, seconds: float, peer: str | None) -> dict:
    now = time.time()
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        + f".{int(now % 1 * 1000):03d}Z",
        "method": decision.method,
        "rule": decision.rule.pattern,
        "level": decision.level,
        "decision": "allow" if decision.allowed else "deny",
        "reason": decision.reason.value if decision.reason is not None else None,
    }
    if decision.reason in UNMET:
        line["detail"] = decision.message
    if decision.shadow:
        line["shadow"] = True
    identity = decision.identity
    if identity is not None:
        line["sub"] = identity.subject
        if identity.jti is not None:
            line["jti"] = identity.jti
        if identity.claims_from:
            line["claims_from"] = identity.claims_from
    address = parse_address(peer)
    if address is not None:
        line["peer"] = str(address)
    if decision.principal is not None:
        line["principal"] = decision.principal
    line["policy_version"] = decision.policy_version
    line["latency_ms"] = round(seconds * 1000, 3)
    return line


def log_to(stream_name: str) -> None:
    """Send decision lines, bare, to `stdout` or `stderr`; `off` silences them."""
    logger = logging.getLogger(LOGGER)
    logger.propagate = False
    logger.handlers.clear()
    if stream_name == "off":
        logger.setLevel(logging.CRITICAL + 1)
        return
    handler = logging.StreamHandler(sys.stdout if stream_name == "stdout" else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
