"""Policy test files: calls, and the decision the policy must give each.

    tests:
      - name: admins list users
        call: /api.v1.UserService/ListUsers     # or  http: "GET /healthz"
        token: {level: access, claims: {sub: alice, roles: [admin]}}
        headers: {x-tenant-id: t1}              # more request headers
        request: {user_id: alice}               # the request message's fields (JSON)
        peer: spiffe://cluster/ns/app/sa/web    # the client certificate's identity (mTLS)
        repeat: 3                               # the same call 3 times; `expect` judges the last
        expect: allow                           # or  {deny: INSUFFICIENT_ROLE}

A token is described, never written out: a valid token of `level` as the policy's
`tokens.<level>` defines it (type, audience, issuer), with `claims` added or replaced (a
claim set to null is removed) and `expired: true` for one whose `exp` has passed. A file
is checked as strictly as a policy: every problem at once, as `file:line: problem`.

Which files hold a policy's tests (`policy_test_files`): those its top-level `tests:` list
names, relative to the policy file (`tests: []`: none); without that key, the file
`<stem>.tests.yaml` beside the policy (`policy.yaml` -> `policy.tests.yaml`) when it exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authproxy.decide.reasons import Reason
from authproxy.policy import yaml_source
from authproxy.policy.loader import PolicyError, read_policy_file
from authproxy.policy.model import LEVELS, Policy
from authproxy.policy.values import ValueChecks, close_match
from authproxy.policy.yaml_source import LineList, LineMap, SourceError

CASE_KEYS = ("name", "call", "http", "token", "headers", "request", "peer", "repeat", "expect")
TOKEN_KEYS = ("level", "claims", "expired")
ALLOW = "allow"
DENY = "deny"
MAX_REPEAT = 1000
_HTTP_TARGET = re.compile(r"([A-Z]+) +(/\S*)")
_REASONS = [r.value for r in Reason]


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """The token a test call carries, described by its level."""

    level: str
    #: Claims added to or replacing the minted ones; a None value removes that claim.
    claims: Mapping[str, Any]
    expired: bool = False


@dataclass(frozen=True, slots=True)
class PolicyCase:
    file: str
    line: int
    name: str
    #: The method path, or (with `http_method`) the HTTP request's path.
    target: str
    http_method: str | None
    token: TokenRequest | None
    headers: tuple[tuple[str, str], ...]
    #: The client certificate's identity, for rules with `peers:`.
    principal: str | None
    repeat: int
    #: The reason the call must be denied with; None: it must be allowed.
    deny: Reason | None
    #: The request message's fields, for rules with `request:` (nested objects for
    #: nested messages; a field left out is unset).
    request: Mapping[str, Any] | None = None

    @property
    def expected(self) -> str:
        return ALLOW if self.deny is None else f"{DENY} {self.deny}"

    @property
    def shown_target(self) -> str:
        return self.target if self.http_method is None else f"{self.http_method} {self.target}"


def policy_test_files(policy: Policy) -> list[Path]:
    """The test files of `policy`: those `tests:` names, else `<stem>.tests.yaml` beside
    the policy file when there is one."""
    source = Path(policy.source)
    if policy.tests is not None:
        return [source.parent / name for name in policy.tests]
    sibling = source.with_name(f"{source.stem}.tests.yaml")
    return [sibling] if sibling.is_file() else []


def load_cases(paths: Iterable[str | Path], policy: Policy) -> list[PolicyCase]:
    """Every case of every file, checked against `policy`'s token levels; PolicyError
    listing every problem of every file."""
    cases: list[PolicyCase] = []
    errors: list[SourceError] = []
    for path in paths:
        try:
            cases.extend(parse_cases(read_policy_file(path, "policy tests"), str(path), policy))
        except PolicyError as e:
            errors.extend(e.errors)
    if errors:
        raise PolicyError(errors)
    return cases


def parse_cases(data: bytes | str, file: str, policy: Policy) -> list[PolicyCase]:
    raw = data.encode() if isinstance(data, str) else data
    try:
        doc = yaml_source.load(raw.decode("utf-8"), file)
    except UnicodeDecodeError as e:
        raise PolicyError([SourceError(file, None, f"not UTF-8 text: {e}")]) from None
    except SourceError as e:
        raise PolicyError([e]) from None
    return _CaseChecks(file, policy).document(doc)


class _CaseChecks(ValueChecks):
    def __init__(self, file: str, policy: Policy) -> None:
        super().__init__(file)
        self.policy = policy
        self.names: dict[str, int] = {}

    def document(self, doc: Any) -> list[PolicyCase]:
        if doc is None:
            raise PolicyError([SourceError(self.file, None, "the test file is empty")])
        if not isinstance(doc, LineMap):
            raise PolicyError([SourceError(self.file, 1, "expected a mapping with 'tests'")])
        self.unknown_keys(doc, ("tests",), "top-level key")
        entries = doc.get("tests")
        cases = []
        if not isinstance(entries, LineList) or not entries:
            self.error(doc.line_of("tests"), "'tests' must be a non-empty list of tests")
        else:
            for index, entry in enumerate(entries):
                case = self.case(entry, entries.line_of(index))
                if case is not None:
                    cases.append(case)
        if self.errors:
            raise PolicyError(sorted(self.errors, key=lambda e: e.line or 0))
        return cases

    def case(self, entry: Any, line: int) -> PolicyCase | None:
        if not isinstance(entry, LineMap):
            self.error(line, "a test must be a mapping with 'name', 'call' or 'http', 'expect'")
            return None
        self.unknown_keys(entry, CASE_KEYS, "key in a test")
        name = self.string(entry, "name", "the test")
        where = f"test {name!r}" if name else "the test"
        if name is not None:
            if name in self.names:
                self.error(line, f"{where} is defined already on line {self.names[name]}")
            self.names.setdefault(name, line)
        http_method, target = self.target(entry, where)
        token = self.token(entry, where) if "token" in entry else None
        headers = self.headers(entry)
        principal = self.string(entry, "peer", where, default="") or None
        repeat = self.integer(entry, "repeat", default=1, low=1, high=MAX_REPEAT)
        found, deny = self.expect(entry, where)
        request = entry.get("request")
        if request is not None and not isinstance(request, LineMap):
            self.error(entry.line_of("request"), f"{where}: 'request' maps field names to values")
            request = None
        if name is None or target is None or not found:
            return None
        return PolicyCase(
            self.file, line, name, target, http_method, token, headers, principal, repeat, deny,
            request,
        )  # fmt: skip

    def target(self, entry: LineMap, where: str) -> tuple[str | None, str | None]:
        """(None, method path) for `call:`, (METHOD, path) for `http: "METHOD /path"`."""
        if ("call" in entry) == ("http" in entry):
            self.error(entry.line, f"{where} needs one of 'call' (a gRPC method) or 'http'")
            return None, None
        if "call" in entry:
            call = entry["call"]
            if not isinstance(call, str) or not call.startswith("/"):
                self.error(entry.line_of("call"), "'call' must be a method path like /pkg.Svc/M")
                return None, None
            return None, call
        m = _HTTP_TARGET.fullmatch(entry["http"]) if isinstance(entry["http"], str) else None
        if m is None:
            self.error(entry.line_of("http"), "'http' must be 'METHOD /path', like 'GET /healthz'")
            return None, None
        return m.group(1), m.group(2)

    def token(self, entry: LineMap, where: str) -> TokenRequest | None:
        spec = entry["token"]
        line = entry.line_of("token")
        if not isinstance(spec, LineMap):
            self.error(line, f"{where}: 'token' must be a mapping with 'level' (omit it: no token)")
            return None
        self.unknown_keys(spec, TOKEN_KEYS, "key in a token")
        level = self.string(spec, "level", f"the token of {where}")
        claims = spec.get("claims", {})
        if not isinstance(claims, LineMap | dict) or not all(isinstance(k, str) for k in claims):
            self.error(spec.line_of("claims"), "'claims' must map claim names to values")
            claims = {}
        expired = self.boolean(spec, "expired", default=False)
        if level is None or not self.known_level(level, spec.line_of("level")):
            return None
        return TokenRequest(level, {k: _plain(v) for k, v in claims.items()}, expired)

    def known_level(self, level: str, line: int) -> bool:
        defined = list(self.policy.tokens)
        if level in defined:
            return True
        guess = close_match(level, defined)
        if level in LEVELS:
            problem = f"the policy defines no {level!r} tokens"
        else:
            problem = f"unknown token level {level!r}"
        hint = f": did you mean {guess!r}?" if guess and guess != level else ""
        self.error(line, f"{problem}{hint} (the policy's token levels: {', '.join(defined)})")
        return False

    def headers(self, entry: LineMap) -> tuple[tuple[str, str], ...]:
        section = entry.get("headers")
        if section is None:
            return ()
        if not isinstance(section, LineMap):
            self.error(entry.line_of("headers"), "'headers' must map header names to values")
            return ()
        pairs = []
        for name, value in section.items():
            if not isinstance(name, str) or not name or name != name.lower():
                self.error(section.line_of(name), f"header name {name!r} must be lowercase")
            elif not isinstance(value, str):
                self.error(section.line_of(name), f"header {name!r}: the value must be a string")
            else:
                pairs.append((name, value))
        return tuple(pairs)

    def expect(self, entry: LineMap, where: str) -> tuple[bool, Reason | None]:
        """(valid, deny reason): `allow`, or `{deny: REASON}`."""
        if "expect" not in entry:
            self.error(entry.line, f"{where} has no 'expect' (allow, or {{deny: REASON}})")
            return False, None
        value, line = entry["expect"], entry.line_of("expect")
        if value == ALLOW:
            return True, None
        if not isinstance(value, LineMap) or list(value) != [DENY]:
            hint = " with its reason, like {deny: METHOD_DENIED}" if value == DENY else ""
            self.error(line, f"'expect' must be allow, or {{deny: REASON}}{hint}")
            return False, None
        reason = value[DENY]
        if reason not in _REASONS:
            guess = close_match(reason, _REASONS)
            hint = f": did you mean {guess}?" if guess else " (see README, Errors and reasons)"
            self.error(value.line_of(DENY), f"unknown reason {reason!r}{hint}")
            return False, None
        return True, Reason(reason)


def _plain(value: Any) -> Any:
    """A YAML value as plain JSON-able data (mappings and lists of the loader's types)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
