"""Checking scalar values in a policy file (strings, lists, booleans, numbers, durations),
collecting `file:line: problem` errors instead of stopping at the first."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any

from authproxy.policy.yaml_source import LineList, LineMap, SourceError

MAX_LEEWAY = 300.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ValueChecks:
    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[SourceError] = []

    def error(self, line: int | None, problem: str) -> None:
        self.errors.append(SourceError(self.file, line, problem))

    def unknown_keys(self, mapping: LineMap, allowed: tuple[str, ...], what: str) -> None:
        """Report each key not in `allowed`, with a did-you-mean when one allowed key that the
        mapping lacks is close. Such a key is then renamed in place to the one it most likely
        meant, so the checks that follow judge the value under its intended name instead of
        also reporting that name as missing (and what a missing key implies)."""
        missing = [k for k in allowed if k not in mapping]
        renamed: dict[Any, str] = {}
        for key in mapping:
            if key in allowed:
                continue
            guess = close_match(key, missing)
            if guess is None:
                self.error(
                    mapping.line_of(key), f"unknown {what} {key!r} (allowed: {', '.join(allowed)})"
                )
                continue
            self.error(mapping.line_of(key), f"unknown {what} {key!r}: did you mean {guess!r}?")
            missing.remove(guess)
            renamed[key] = guess
        if renamed:
            items = [(renamed.get(k, k), v, mapping.line_of(k)) for k, v in mapping.items()]
            mapping.clear()
            mapping.lines = {}
            for key, value, line in items:
                mapping[key] = value
                mapping.lines[key] = line

    def string(self, m: LineMap, key: str, where: str, default: str | None = None) -> str | None:
        if key not in m:
            if default is None:
                self.error(m.line, f"{where} has no '{key}'")
            return default
        value = m[key]
        if not isinstance(value, str) or not value:
            self.error(m.line_of(key), f"'{key}' must be a non-empty string")
            return default
        return value

    def strings(self, m: LineMap, key: str, allow_single: bool = False) -> frozenset[str] | None:
        if key not in m:
            return None
        value = m[key]
        line = m.line_of(key)
        if allow_single and isinstance(value, str) and value:
            return frozenset((value,))
        if not isinstance(value, LineList) or not value:
            kind = "a string or a non-empty list of strings" if allow_single else "a non-empty list"
            self.error(line, f"'{key}' must be {kind}")
            return None
        bad = [v for v in value if not isinstance(v, str) or not v]
        if bad:
            self.error(line, f"'{key}' must contain only non-empty strings, got {bad[0]!r}")
            return None
        return frozenset(value)

    def boolean(self, m: LineMap, key: str, default: bool) -> bool:
        if key not in m:
            return default
        if not isinstance(m[key], bool):
            self.error(m.line_of(key), f"'{key}' must be true or false")
            return default
        return m[key]

    def integer(self, m: LineMap, key: str, default: int, low: int, high: int) -> int:
        return self._number(m, key, default, low, high, int, lambda v: v)

    def duration(self, m: LineMap, key: str, default: float) -> float:
        return self._number(m, key, default, 0.0, MAX_LEEWAY, float, parse_duration)

    def _number(
        self,
        m: LineMap,
        key: str,
        default: Any,
        low: float,
        high: float,
        kind: type,
        convert: Callable[[Any], Any],
    ) -> Any:
        if key not in m:
            return default
        raw = m[key]
        line = m.line_of(key)
        value = None if isinstance(raw, bool) else convert(raw)
        if not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
            hint = " (like 30s, 2m, 500ms)" if kind is float else ""
            self.error(line, f"'{key}' must be a {'duration' if kind is float else 'number'}{hint}")
            return default
        if not low <= value <= high:
            self.error(line, f"'{key}' must be between {low:g} and {high:g}, got {raw!r}")
            return default
        return value


def close_match(key: Any, candidates: list[str]) -> str | None:
    """The candidate `key` is most likely a misspelling of (case aside), or None."""
    if not isinstance(key, str) or not candidates:
        return None
    lowered = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(key.lower(), list(lowered), n=1)
    return lowered[found[0]] if found else None


def parse_duration(value: Any) -> float | None:
    """Seconds from `30`, `1.5`, `"30s"`, `"2m"`, `"500ms"`, `"1h"`, `"30d"`; None if not a
    duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.fullmatch(value.strip())
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    return None
