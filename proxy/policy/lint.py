"""Comparing a policy with the methods a backend really serves.

`lint(policy, methods)` takes a valid `Policy` and the backend's method paths (from its
server reflection or from protosets, see `sidecar/catalog.py`) and finds:

- **uncovered** methods: served, but named by no exact key and no `/pkg.Service/*`
  wildcard, so `default` decides them (often by accident);
- **unmatched** rules: exact keys and wildcards that match no served method (a typo, a
  method that was renamed or removed);
- services covered **only by a wildcard** (informational).

`uncovered(policy, methods)` is the first list alone, for a one-time log at startup.
Infrastructure services (`grpc.health.*`, `grpc.reflection.*`) are methods like any
other: a client can call them through the proxy, so the policy should say who may.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from authproxy.policy.model import Policy, Rule
from authproxy.policy.yaml_source import SourceError

#: Server reflection: used by tools such as grpcurl. The proxy's own reflection calls
#: (to learn method kinds) go straight to the backend and never meet the policy.
REFLECTION_PREFIX = "/grpc.reflection."


@dataclass(frozen=True, slots=True)
class WildcardService:
    """A served service whose every served method the `/pkg.Service/*` rule decides."""

    service: str
    rule: Rule
    methods: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LintResult:
    policy: Policy
    #: Every served method path, sorted.
    served: tuple[str, ...]
    #: Served methods that only `default` decides.
    uncovered: tuple[str, ...]
    #: Exact keys and wildcards that match no served method, in file order.
    unmatched: tuple[Rule, ...]
    wildcard_only: tuple[WildcardService, ...]
    #: Served methods decided by an exact key and by a wildcard.
    by_exact: int
    by_wildcard: int

    @property
    def findings(self) -> int:
        """Uncovered methods plus unmatched rules: what `--strict` fails on."""
        return len(self.uncovered) + len(self.unmatched)


def service_of(method: str) -> str:
    """`pkg.Service` of `/pkg.Service/Method` (what a `/pkg.Service/*` key names)."""
    return method[1 : method.rfind("/")]


def uncovered(policy: Policy, methods: Iterable[str]) -> list[str]:
    """Served methods no exact key or service wildcard names (`default` decides them)."""
    return sorted({m for m in methods if policy.listed(m) is None})


def lint(policy: Policy, methods: Iterable[str]) -> LintResult:
    served_set = set(methods)
    served = tuple(sorted(served_set))
    by_service: dict[str, list[str]] = {}
    for method in served:
        by_service.setdefault(service_of(method), []).append(method)
    unmatched = [rule for pattern, rule in policy.exact.items() if pattern not in served_set]
    unmatched += [rule for service, rule in policy.services.items() if service not in by_service]
    wildcard_only = tuple(
        WildcardService(service, rule, tuple(by_service[service]))
        for service, rule in sorted(policy.services.items())
        if service in by_service and not any(m in policy.exact for m in by_service[service])
    )
    exact = sum(1 for m in served if m in policy.exact)
    missing = tuple(uncovered(policy, served))
    return LintResult(
        policy,
        served,
        missing,
        tuple(sorted(unmatched, key=lambda r: (r.line or 0, r.pattern))),
        wildcard_only,
        by_exact=exact,
        by_wildcard=len(served) - exact - len(missing),
    )


# --- reports ---------------------------------------------------------------------------


def text_report(result: LintResult, sources: Sequence[str], strict: bool = False) -> str:
    """The human report: one section per kind of finding, then a summary line."""
    policy = result.policy
    file = policy.source
    kind = "error" if strict else "warning"
    lines = [
        f"{file}: OK (version {policy.version}, {policy.rule_count} rules)",
        f"served: {_count(len(result.served), 'method')} from {', '.join(sources)}",
    ]
    default = policy.default
    if result.uncovered:
        lines.append(
            f"{kind}: {_count(len(result.uncovered), 'served method')} without a rule, decided"
            f" by default ({default.level}, {_where(file, default)}):"
        )
        for method in result.uncovered:
            note = (
                "  (server reflection: lets clients list the API; say who may call it)"
                if method.startswith(REFLECTION_PREFIX)
                else ""
            )
            lines.append(f"  {method}{note}")
    if result.unmatched:
        lines.append(f"{kind}: {_count(len(result.unmatched), 'rule')} matching no served method:")
        lines += [f"  {_where(file, r)}: {r.pattern} ({r.level})" for r in result.unmatched]
    if result.wildcard_only:
        lines.append(
            f"note: {_count(len(result.wildcard_only), 'service')} covered only by a wildcard:"
        )
        lines += [
            f"  {_where(file, w.rule)}: {w.rule.pattern} ({w.rule.level}):"
            f" {_count(len(w.methods), 'method')}"
            for w in result.wildcard_only
        ]
    verdict = (
        "no findings"
        if not result.findings
        else f"{_count(result.findings, 'finding')} ({'--strict: failing' if strict else 'warnings; --strict fails on them'})"
    )
    lines.append(
        f"summary: {_count(len(result.served), 'served method')}: {result.by_exact} by exact"
        f" rules, {result.by_wildcard} by wildcards, {len(result.uncovered)} by default;"
        f" {_count(len(result.unmatched), 'rule')} matching nothing; {verdict}"
    )
    return "\n".join(lines)


def json_report(
    file: str,
    *,
    policy: Policy | None = None,
    errors: Sequence[SourceError] = (),
    result: LintResult | None = None,
    sources: Sequence[str] = (),
    strict: bool = False,
) -> dict[str, Any]:
    """The machine-readable report. Keys are always present: `lint` is null when no
    served methods were given, `version` and `rules` when the policy is invalid."""
    return {
        "file": file,
        "valid": policy is not None,
        "version": policy.version if policy else None,
        "rules": policy.rule_count if policy else None,
        "errors": [{"line": e.line, "message": e.problem} for e in errors],
        "strict": strict,
        "lint": None if result is None else _lint_json(result, sources),
    }


def _lint_json(result: LintResult, sources: Sequence[str]) -> dict[str, Any]:
    default = result.policy.default
    return {
        "sources": list(sources),
        "served": list(result.served),
        "default": {"level": default.level, "line": default.line},
        "uncovered": [
            {"method": m, "level": default.level, "reflection": m.startswith(REFLECTION_PREFIX)}
            for m in result.uncovered
        ],
        "unmatched": [
            {
                "pattern": r.pattern,
                "line": r.line,
                "level": r.level,
                "kind": "service" if r.pattern.endswith("/*") else "method",
            }
            for r in result.unmatched
        ],
        "wildcard_only": [
            {
                "service": w.service,
                "pattern": w.rule.pattern,
                "line": w.rule.line,
                "level": w.rule.level,
                "methods": list(w.methods),
            }
            for w in result.wildcard_only
        ],
        "summary": {
            "served": len(result.served),
            "by_exact": result.by_exact,
            "by_wildcard": result.by_wildcard,
            "by_default": len(result.uncovered),
            "unmatched": len(result.unmatched),
            "findings": result.findings,
        },
    }


def _where(file: str, rule: Rule) -> str:
    return f"{file}:{rule.line}" if rule.line else file


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
