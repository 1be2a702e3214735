"""Checking a rule's `rate_limit:` entries (see `decide/rate_limits.py` for how they are counted)."""

from __future__ import annotations

import re

import limits
from limits import RateLimitItem

from authproxy.policy.model import DENY, PUBLIC, RateLimit
from authproxy.policy.values import ValueChecks
from authproxy.policy.yaml_source import LineList, LineMap

RATE_LIMIT_KEYS = ("limit", "key", "fail_open")
#: The moving window keeps one timestamp per counted call and key: bound what one key holds.
MAX_RATE_AMOUNT = 10_000
_CLAIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}")


class RateLimitChecks(ValueChecks):
    def rate_limits(self, spec: LineMap, where: str, level: str) -> tuple[RateLimit, ...]:
        """`rate_limit: {limit: 5/minute, key: peer, fail_open: false}`, or a list of them."""
        if "rate_limit" not in spec:
            return ()
        value = spec["rate_limit"]
        line = spec.line_of("rate_limit")
        if level == DENY:
            self.error(line, f"{where}: a rate limit needs a level that allows calls, not 'deny'")
            return ()
        entries = value if isinstance(value, LineList) else [value]
        if not entries or not all(isinstance(e, LineMap) for e in entries):
            self.error(
                line,
                f"{where}: 'rate_limit' must be a mapping like {{limit: 5/minute, key: peer}}"
                " or a non-empty list of them",
            )
            return ()
        out = []
        for entry in entries:
            self.unknown_keys(entry, RATE_LIMIT_KEYS, f"key in the rate limit of {where}")
            text = self.string(entry, "limit", f"the rate limit of {where}")
            key = self.string(entry, "key", f"the rate limit of {where}", default="peer")
            fail_open = self.boolean(entry, "fail_open", default=False)
            item = self.rate(entry, text)
            if key is not None and not _CLAIM_NAME.fullmatch(key):
                self.error(
                    entry.line_of("key"),
                    f"rate limit key {key!r} must be 'peer', 'subject' or a claim name",
                )
            elif key not in (None, "peer") and level == PUBLIC:
                self.error(
                    entry.line_of("key"),
                    f"{where}: a public method has no token, so its rate limit key must be"
                    f" 'peer', not {key!r}",
                )
            elif item is not None and key is not None:
                out.append(RateLimit(item, key, fail_open))
        return tuple(out)

    def rate(self, entry: LineMap, text: str | None) -> RateLimitItem | None:
        if text is None:
            return None
        line = entry.line_of("limit")
        try:
            items = limits.parse_many(text)
        except ValueError:
            items = []
        if len(items) != 1:
            self.error(
                line,
                f"malformed rate {text!r}: expected one rate like 5/minute, 10/hour or"
                " '100 per 2 hours' (list several entries for several limits)",
            )
            return None
        if not 1 <= items[0].amount <= MAX_RATE_AMOUNT:
            self.error(line, f"rate {text!r}: the count must be between 1 and {MAX_RATE_AMOUNT}")
            return None
        return items[0]
