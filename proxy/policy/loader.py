"""Reading and validating a policy file into an immutable `Policy`.

Validation is all-or-nothing: every problem found is reported as `file:line: problem`, and
no `Policy` exists unless the whole file is valid, so a bad edit can never be half-applied.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from authproxy.decide.identity import BUILTIN_HEADERS
from authproxy.policy import yaml_source
from authproxy.policy.claim_section import RequestChecks
from authproxy.policy.http_routes import HttpRoute, HttpRoutes, parse_route_key
from authproxy.policy.limits import RateLimitChecks
from authproxy.policy.model import (
    DENY,
    IDENTITY_HEADER_PREFIX,
    LEVELS,
    METHOD_PATTERN,
    PUBLIC,
    TOKEN_LEVELS,
    Policy,
    Rule,
    TokenSpec,
)
from authproxy.policy.strip_section import StripHeaderChecks
from authproxy.policy.yaml_source import LineMap, SourceError

TOP_KEYS = (
    "version",
    "default",
    "issuer",
    "leeway",
    "max_token_bytes",
    "forward_token",
    "claim_headers",
    "tokens",
    "methods",
    "http",
    "mode",
    "strip_headers",
    "tests",  # test files run before the policy loads (`policy/cases.py`)
)
RULE_KEYS = (
    "level",
    "roles",
    "permissions",
    "scopes",
    "forward_token",
    "single_use",
    "revoke_on_reuse",
    "rate_limit",
    "end_streams",
    "mode",
    "peers",
    "when",
    "request",
)
MODES = ("enforce", "shadow")
TOKEN_KEYS = ("type", "audience", "issuer", "keys", "type_claim", "claims")
_HEADER_NAME = re.compile(r"x-auth-[a-z0-9]+(?:-[a-z0-9]+)*")


class PolicyError(Exception):
    """One or more problems in a policy file; `str()` lists them as `file:line: problem`."""

    def __init__(self, errors: list[SourceError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def load_policy(path: str | Path) -> Policy:
    """Read, parse and validate a policy file. Raises PolicyError naming file and line."""
    return parse_policy(read_policy_file(path), str(path))


def read_policy_file(path: str | Path, what: str = "policy") -> bytes:
    """The content of a policy file (or of its tests: `what`); PolicyError naming the file
    when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise PolicyError(
            [SourceError(str(path), None, f"cannot read {what}: {e.strerror}")]
        ) from None


def policy_version(data: bytes) -> str:
    """A policy's version: a prefix of its file content's SHA-256."""
    return hashlib.sha256(data).hexdigest()[:12]


def parse_policy(data: bytes | str, file: str = "<policy>") -> Policy:
    raw = data.encode() if isinstance(data, str) else data
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError([SourceError(file, None, f"not UTF-8 text: {e}")]) from None
    try:
        doc = yaml_source.load(text, file)
    except SourceError as e:
        raise PolicyError([e]) from None
    return _Validator(file).policy(doc, policy_version(raw))


class _Validator(RateLimitChecks, StripHeaderChecks, RequestChecks):
    shadow_default = False
    #: Token levels the file defines, valid or not: a rule using one whose definition is
    #: broken gets no second error (the definition's own error says what to fix).
    named_levels: frozenset[str] = frozenset()
    # --- the document ------------------------------------------------------------------

    def policy(self, doc: Any, version: str) -> Policy:
        if doc is None:
            raise PolicyError([SourceError(self.file, None, "policy is empty")])
        if not isinstance(doc, LineMap):
            raise PolicyError([SourceError(self.file, 1, "policy must be a mapping of keys")])
        self.unknown_keys(doc, TOP_KEYS, "top-level key")

        if "version" not in doc:
            self.error(doc.line, "missing key 'version' (use 'version: 1')")
        elif doc["version"] != 1 or isinstance(doc["version"], bool):
            self.error(
                doc.line_of("version"), f"unsupported version {doc['version']!r}; expected 1"
            )

        issuers = self.strings(doc, "issuer", allow_single=True)
        leeway = self.duration(doc, "leeway", default=30.0)
        max_bytes = self.integer(doc, "max_token_bytes", default=8192, low=256, high=65536)
        forward = self.boolean(doc, "forward_token", default=False)
        self.shadow_default = self.shadow(doc, default=False)
        claim_headers = self.claim_headers(doc)
        strip_headers = self.strip_headers(doc)
        tokens = self.tokens(doc, issuers)
        tests = () if doc.get("tests") == [] else self.strings(doc, "tests")

        default = Rule("default", DENY, line=doc.line_of("default"))
        if "default" in doc:
            default = self.rule("default", doc["default"], doc.line_of("default"), tokens, forward)

        exact: dict[str, Rule] = {}
        services: dict[str, Rule] = {}
        methods = doc.get("methods")
        if methods is None:
            if "methods" in doc:
                self.error(doc.line_of("methods"), "'methods' is empty")
        elif not isinstance(methods, LineMap):
            self.error(doc.line_of("methods"), "'methods' must map method names to levels")
        else:
            for pattern, value in methods.items():
                line = methods.line_of(pattern)
                m = METHOD_PATTERN.fullmatch(pattern) if isinstance(pattern, str) else None
                if m is None:
                    self.error(
                        line,
                        f"malformed method name {pattern!r}: expected '/package.Service/Method'"
                        " or '/package.Service/*'",
                    )
                    continue
                rule = self.rule(pattern, value, line, tokens, forward)
                if m.group(2) == "*":
                    services[m.group(1)] = rule
                else:
                    exact[pattern] = rule

        routes = self.http_routes(doc, tokens, forward)
        if self.errors:
            raise PolicyError(sorted(self.errors, key=lambda e: e.line or 0))  # in file order
        return Policy(
            source=self.file,
            version=version,
            default=default,
            exact=exact,
            services=services,
            tokens=tokens,
            leeway=leeway,
            max_token_bytes=max_bytes,
            claim_headers=claim_headers,
            http=HttpRoutes(routes),
            rule_count=len(exact) + len(services) + len(routes),
            strip_headers=strip_headers,
            tests=None if tests is None else tuple(sorted(tests)),
        )

    def http_routes(self, doc: LineMap, tokens: dict[str, TokenSpec], forward: bool) -> list:
        section = doc.get("http")
        if section is None:
            if "http" in doc:
                self.error(doc.line_of("http"), "'http' is empty")
            return []
        if not isinstance(section, LineMap):
            self.error(doc.line_of("http"), "'http' must map 'METHOD /path' keys to levels")
            return []
        routes: list[HttpRoute] = []
        seen: dict[tuple[str, tuple[str, ...]], int] = {}
        for key, value in section.items():
            line = section.line_of(key)
            try:
                method, segments = parse_route_key(key if isinstance(key, str) else "")
            except ValueError as e:
                self.error(line, f"malformed http route {key!r}: {e}")
                continue
            if (method, segments) in seen:
                self.error(
                    line,
                    f"http route {key!r} matches the same requests as the route on line "
                    f"{seen[method, segments]}",
                )
                continue
            seen[method, segments] = line
            routes.append(HttpRoute(method, segments, self.rule(key, value, line, tokens, forward)))
        return routes

    def tokens(self, doc: LineMap, issuers: frozenset[str] | None) -> dict[str, TokenSpec]:
        section = doc.get("tokens")
        if section is None:
            return {}
        if not isinstance(section, LineMap):
            self.error(doc.line_of("tokens"), "'tokens' must map levels to token requirements")
            self.named_levels = frozenset(TOKEN_LEVELS)
            return {}
        self.unknown_keys(section, TOKEN_LEVELS, "token level")
        self.named_levels = frozenset(section)
        specs: dict[str, TokenSpec] = {}
        for level, spec in section.items():
            line = section.line_of(level)
            if level not in TOKEN_LEVELS:
                continue  # reported above
            if not isinstance(spec, LineMap):
                self.error(line, f"tokens.{level} must be a mapping with 'type' and 'audience'")
                continue
            self.unknown_keys(spec, TOKEN_KEYS, f"key in tokens.{level}")
            token_type = self.string(spec, "type", f"tokens.{level}")
            audiences = self.strings(spec, "audience", allow_single=True)
            if "audience" not in spec:
                self.error(line, f"tokens.{level} has no 'audience': every token type needs one")
            level_issuers = self.strings(spec, "issuer", allow_single=True)
            key_ids = self.strings(spec, "keys")
            type_claim = self.string(spec, "type_claim", f"tokens.{level}", default="type")
            claim_map = self.claim_map(spec, f"tokens.{level}")
            if token_type is None or not audiences:
                continue
            specs[level] = TokenSpec(
                level=level,
                type=token_type,
                audiences=audiences,
                issuers=level_issuers if level_issuers is not None else issuers,
                key_ids=key_ids,
                type_claim=type_claim or "type",
                claims=claim_map,
                line=spec.line_of("keys") if "keys" in spec else line,
            )
        return specs

    def rule(
        self, pattern: str, value: Any, line: int, tokens: dict[str, TokenSpec], forward: bool
    ) -> Rule:
        where = "default" if pattern == "default" else pattern
        spec, level = self.rule_level(where, value, line, tokens)
        if spec is None:
            if level is None:
                return Rule(pattern, DENY, line=line)
            return Rule(
                pattern, level, forward_token=forward, shadow=self.shadow_default, line=line
            )
        # An unknown or missing level is reported once: checks that depend on the level are
        # skipped (rather than judged against `deny`), the others still run.
        tokenless = level in (PUBLIC, DENY)
        roles = self.strings(spec, "roles") or frozenset()
        permissions = self.strings(spec, "permissions") or frozenset()
        scopes = self.strings(spec, "scopes") or frozenset()
        if (roles or permissions or scopes) and tokenless:
            self.error(line, f"{where}: roles/permissions/scopes need a token level, not {level!r}")
        single_use = self.boolean(spec, "single_use", default=False)
        if single_use and tokenless:
            self.error(line, f"{where}: single_use needs a token level, not {level!r}")
        if "revoke_on_reuse" in spec and not single_use:
            self.error(line, f"{where}: revoke_on_reuse only applies with single_use: true")
        peers = self.peers(spec, where, level or "")
        end_streams = self.boolean(spec, "end_streams", default=True)
        if "end_streams" in spec and tokenless:
            self.error(line, f"{where}: end_streams needs a token level, not {level!r}")
        return Rule(
            pattern,
            level or DENY,
            roles=roles,
            permissions=permissions,
            scopes=scopes,
            forward_token=self.boolean(spec, "forward_token", default=forward),
            single_use=single_use,
            revoke_on_reuse=self.boolean(spec, "revoke_on_reuse", default=True),
            rate_limits=self.rate_limits(spec, where, level or ""),
            end_streams=end_streams,
            shadow=self.shadow(spec, default=self.shadow_default),
            peers=peers,
            when=self.conditions(spec, where, level) if level else (),
            request=self.request_ownership(spec, where, level) if level else None,
            line=line,
        )

    def rule_level(
        self, where: str, value: Any, line: int, tokens: dict[str, TokenSpec]
    ) -> tuple[LineMap | None, str | None]:
        """A rule's mapping (None for a bare level) and its level (None when missing or
        unknown, after reporting why)."""
        spec: LineMap | None = None
        if isinstance(value, str):
            level: Any = value
        elif isinstance(value, LineMap):
            spec = value
            self.unknown_keys(spec, RULE_KEYS, f"key in rule {where}")
            if "level" not in spec:
                self.error(line, f"rule {where} has no 'level'")
                return spec, None
            level = spec["level"]
        else:
            self.error(line, f"rule {where} must be a level name or a mapping with 'level'")
            return None, None
        if level not in LEVELS:
            self.error(
                line, f"unknown level {level!r} for {where} (expected one of {', '.join(LEVELS)})"
            )
            return spec, None
        if level in TOKEN_LEVELS and level not in tokens and level not in self.named_levels:
            self.error(
                line, f"{where} uses level {level!r}, but 'tokens' does not define {level!r}"
            )
        return spec, level

    def peers(self, spec: LineMap, where: str, level: str) -> tuple[str, ...]:
        """`peers: [spiffe://..., "spiffe://cluster/ns/x/*", "CN=client,O=Example"]`."""
        values = self.strings(spec, "peers")
        if values is None:
            return ()
        line = spec.line_of("peers")
        if level == DENY:
            self.error(line, f"{where}: peers has no effect on a deny rule")
        for value in sorted(values):
            if "*" in value[:-1]:
                self.error(
                    line,
                    f"{where}: peer {value!r}: '*' may only end a pattern (a prefix match)",
                )
        return tuple(sorted(values))

    def shadow(self, m: LineMap, default: bool) -> bool:
        """`mode: enforce | shadow` (at the top: the default of every rule)."""
        if "mode" not in m:
            return default
        if m["mode"] not in MODES:
            self.error(
                m.line_of("mode"), f"unknown mode {m['mode']!r} (expected enforce or shadow)"
            )
            return default
        return m["mode"] == "shadow"

    def claim_headers(self, doc: LineMap) -> tuple[tuple[str, str], ...]:
        section = doc.get("claim_headers")
        if section is None:
            return ()
        if not isinstance(section, LineMap):
            self.error(
                doc.line_of("claim_headers"), "'claim_headers' must map header names to claims"
            )
            return ()
        pairs = []
        for header, claim in section.items():
            line = section.line_of(header)
            if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header):
                self.error(
                    line,
                    f"claim header {header!r} must be lowercase and start with "
                    f"'{IDENTITY_HEADER_PREFIX}' (so clients can never forge it)",
                )
            elif header in BUILTIN_HEADERS:
                self.error(line, f"claim header {header!r} is set by the proxy already")
            elif not isinstance(claim, str) or not claim:
                self.error(line, f"claim header {header!r} must name a claim")
            else:
                pairs.append((header, claim))
        return tuple(pairs)
