"""Checking the policy's `strip_headers:` (see `policy/strip_headers.py` for what it removes).

    strip_headers: [x-internal-user, "x-legacy-auth-*"]     # added to the default set
    strip_headers:
      add: [x-internal-user]
      keep: [x-forwarded-email]                           # a default entry, kept

Names are folded to lowercase with `-` for `_`; an entry ending in `-*` is a prefix. A
default is only ever kept by naming it under `keep`; `x-auth-*`, `authorization` and the
override headers cannot be kept, and names the proxy sets or the transport needs cannot
be added.
"""

from __future__ import annotations

import re
from typing import Any

from authproxy.policy.model import IDENTITY_HEADER_PREFIX
from authproxy.policy.strip_headers import (
    DEFAULT_IDENTITY,
    DEFAULT_STRIP,
    OVERRIDE_HEADERS,
    StripHeaders,
)
from authproxy.policy.values import ValueChecks
from authproxy.policy.yaml_source import LineList, LineMap

STRIP_KEYS = ("add", "keep")
_NAME = re.compile(r"[a-z0-9]+(?:[-.][a-z0-9]+)*")
#: What an entry may not cover: headers the transport needs.
_TRANSPORT = ("host", "content-type", "content-length", "te", "connection", "transfer-encoding")
_TRANSPORT_PREFIX = "grpc-"
_AUTHORIZATION = "authorization"


def _covers(entry: str, name: str) -> bool:
    """Whether entry (exact, or a prefix ending in `*`) removes `name`."""
    return name.startswith(entry[:-1]) if entry.endswith("*") else entry == name


def _overlaps_prefix(entry: str, prefix: str) -> bool:
    """Whether entry removes some name that starts with `prefix`."""
    if entry.endswith("*"):
        head = entry[:-1]
        return head.startswith(prefix) or prefix.startswith(head)
    return entry.startswith(prefix)


class StripHeaderChecks(ValueChecks):
    def strip_headers(self, doc: LineMap) -> StripHeaders:
        if "strip_headers" not in doc:
            return DEFAULT_STRIP
        value = doc["strip_headers"]
        line = doc.line_of("strip_headers")
        add: Any = value
        keep: Any = None
        if isinstance(value, LineMap):
            self.unknown_keys(value, STRIP_KEYS, "key in strip_headers")
            if not value:
                self.error(line, "'strip_headers' is empty")
            add, keep = value.get("add"), value.get("keep")
            for key in STRIP_KEYS:
                if key in value and not (isinstance(value[key], LineList) and value[key]):
                    self.error(value.line_of(key), f"strip_headers.{key} must be a non-empty list")
        elif not isinstance(value, LineList) or not value:
            self.error(
                line,
                "'strip_headers' must be a list of header names to remove, or a mapping with"
                " 'add' and/or 'keep' lists",
            )
            return DEFAULT_STRIP
        kept = self._kept(keep) if isinstance(keep, LineList) else set()
        defaults = [entry for entry in DEFAULT_IDENTITY if entry not in kept]
        where = "strip_headers.add" if isinstance(value, LineMap) else "strip_headers"
        added = self._added(add, defaults, where) if isinstance(add, LineList) else []
        return StripHeaders.of([*defaults, *added])

    def _entries(self, items: LineList, where: str) -> list[tuple[str, int]]:
        """(normalized entry, line) for each well-formed item; errors for the others."""
        out: list[tuple[str, int]] = []
        seen: dict[str, int] = {}
        for index, item in enumerate(items):
            line = items.line_of(index)
            if not isinstance(item, str) or not item:
                self.error(line, f"{where}: {item!r} is not a header name")
                continue
            entry = item.strip().lower().replace("_", "-")
            name = entry[:-2] if entry.endswith("-*") else entry
            if not _NAME.fullmatch(name):
                self.error(
                    line,
                    f"{where}: {item!r} is not a header name (letters, digits, '-', '.'; a"
                    " prefix ends in '-*')",
                )
                continue
            if entry in seen:
                self.error(line, f"{where}: {item!r} is listed twice (line {seen[entry]})")
                continue
            seen[entry] = line
            out.append((entry, line))
        return out

    def _kept(self, items: LineList) -> set[str]:
        kept: set[str] = set()
        for entry, line in self._entries(items, "strip_headers.keep"):
            if _overlaps_prefix(entry, IDENTITY_HEADER_PREFIX):
                self.error(
                    line,
                    f"strip_headers.keep: {entry!r} cannot be kept: every incoming x-auth-*"
                    " header is removed (the proxy sets its own)",
                )
            elif _covers(entry, _AUTHORIZATION):
                self.error(
                    line,
                    f"strip_headers.keep: {entry!r} cannot be kept here: authorization is"
                    " removed unless the rule has forward_token",
                )
            elif entry in OVERRIDE_HEADERS:
                self.error(
                    line,
                    f"strip_headers.keep: {entry!r} cannot be kept: method and URL override"
                    " headers are always removed",
                )
            elif entry not in DEFAULT_IDENTITY:
                self.error(
                    line,
                    f"strip_headers.keep: {entry!r} is not in the default set (keep names a"
                    " default entry exactly, e.g. 'x-forwarded-email' or 'x-pomerium-*')",
                )
            else:
                kept.add(entry)
        return kept

    def _added(self, items: LineList, defaults: list[str], where: str) -> list[str]:
        added: list[str] = []
        for entry, line in self._entries(items, where):
            problem = self._add_problem(entry, defaults)
            if problem:
                self.error(line, f"{where}: {entry!r} {problem}")
            else:
                added.append(entry)
        return added

    @staticmethod
    def _add_problem(entry: str, defaults: list[str]) -> str | None:
        if _overlaps_prefix(entry, IDENTITY_HEADER_PREFIX):
            return (
                "would remove x-auth-* headers: every incoming one is removed already, and"
                " the proxy sets its own"
            )
        if _covers(entry, _AUTHORIZATION):
            return "cannot be listed: authorization is removed unless the rule has forward_token"
        if any(_covers(entry, name) for name in _TRANSPORT) or _overlaps_prefix(
            entry, _TRANSPORT_PREFIX
        ):
            return "would remove a header the transport needs"
        if entry in OVERRIDE_HEADERS:
            return "is an override header: always removed already"
        target = entry[:-1] if entry.endswith("*") else entry
        for default in defaults:
            if default == entry or (default.endswith("*") and _covers(default, target)):
                return f"is removed by default already (default entry {default!r})"
        return None
