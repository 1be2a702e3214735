"""The `authproxy explain` report: text for people, JSON for tools (stable keys)."""

from __future__ import annotations

from typing import Any

from authproxy.cli.explain import (
    FAIL,
    OK,
    Explanation,
    Step,
    match_kind,
    rate_text,
    requirements,
)
from authproxy.decide.decision import Decision
from authproxy.keys.verify import shown
from authproxy.policy.model import PUBLIC, Policy, Rule


def text_report(x: Explanation) -> str:
    policy, rule, d = x.policy, x.decision.rule, x.decision
    where = f"{policy.source}:{rule.line}" if rule.line else policy.source
    lines = [f"call          {x.target}"]
    if d.method != x.target:
        lines.append(f"judged as     {d.method}")
    if match_kind(rule) == "none":
        lines.append("rule          none: the request cannot be judged")
    else:
        lines.append(f"rule          {where}: {rule.pattern} ({match_kind(rule)})")
    lines.append(f"level         {rule.level}: {_level(policy, rule)}")
    lines += [f"requires      {r}" for r in requirements(rule)]
    lines += [f"when          {condition}" for condition in rule.when]
    options = [f"forward_token {_yes(rule.forward_token)}", f"single_use {_yes(rule.single_use)}"]
    if rule.single_use:
        options.append(f"revoke_on_reuse {_yes(rule.revoke_on_reuse)}")
    if getattr(rule, "shadow", False):
        options.append("mode shadow")
    lines.append(f"options       {', '.join(options)}")
    lines += [f"rate limit    {rate_text(limit)}" for limit in rule.rate_limits]
    lines += ["steps"] if x.steps else []
    lines += [_step_line(s) for s in x.steps]
    if x.not_checked_offline:
        lines.append(
            "offline       explain starts from an empty state: nothing is revoked, no token"
            " has been used, no call has been counted"
        )
    lines.append(f"verdict       {_verdict(d)}")
    return "\n".join(lines)


def json_report(x: Explanation) -> dict[str, Any]:
    rule, d = x.decision.rule, x.decision
    spec = x.policy.tokens.get(rule.level)
    identity = d.identity
    return {
        "target": x.target,
        "http": x.http,
        "judged_as": d.method,
        "policy": {"file": x.policy.source, "version": x.policy.version},
        "rule": {
            "pattern": rule.pattern,
            "line": rule.line,
            "match": match_kind(rule),
            "level": rule.level,
            "roles": sorted(rule.roles),
            "permissions": sorted(rule.permissions),
            "scopes": sorted(rule.scopes),
            "when": [str(condition) for condition in rule.when],
            "forward_token": rule.forward_token,
            "single_use": rule.single_use,
            "revoke_on_reuse": rule.revoke_on_reuse,
            "end_streams": rule.end_streams,
            "shadow": getattr(rule, "shadow", False),
            "rate_limits": [
                {"limit": str(r.item), "key": r.key, "fail_open": r.fail_open}
                for r in rule.rate_limits
            ],
            "token": None
            if spec is None
            else {
                "type": spec.type,
                "type_claim": spec.type_claim,
                "audiences": sorted(spec.audiences),
                "issuers": None if spec.issuers is None else sorted(spec.issuers),
                "keys": None if spec.key_ids is None else sorted(spec.key_ids),
                "claims_from": spec.claims.mapped(),
            },
        },
        "steps": [
            {"step": s.name, "outcome": s.outcome, "reason": s.reason, "detail": s.detail}
            for s in x.steps
        ],
        "not_checked_offline": x.not_checked_offline,
        "decision": {
            "allowed": d.allowed,
            "status": d.status.name,
            "reason": d.reason,
            "message": d.message,
            "shadow": getattr(d, "shadow", False),
            "retry_after": d.retry_after,
            "identity": None
            if identity is None
            else {"subject": identity.subject, "headers": [list(h) for h in identity.headers]},
        },
    }


def _step_line(step: Step) -> str:
    if step.outcome == FAIL:
        return f"  {step.name:<12} FAIL  {step.reason}: {step.detail}"
    if step.outcome == OK:
        return f"  {step.name:<12} ok    {step.detail}"
    return f"  {step.name:<12} --    {step.outcome}: {step.detail}"


def _level(policy: Policy, rule: Rule) -> str:
    if rule.level == PUBLIC:
        return "no token needed; no identity headers are set"
    spec = policy.tokens.get(rule.level)
    if spec is None:
        return "no rule applies" if match_kind(rule) == "none" else "always denied"
    issuers = ", ".join(sorted(spec.issuers)) if spec.issuers is not None else "not checked"
    keys = ", ".join(sorted(spec.key_ids)) if spec.key_ids is not None else "any configured"
    return (
        f"a token with {spec.type_claim} {spec.type!r}, audience"
        f" {', '.join(sorted(spec.audiences))}, issuer {issuers}, keys {keys}"
    )


def _verdict(d: Decision) -> str:
    if getattr(d, "shadow", False) and d.reason is not None:
        return f"ALLOW (shadow mode; enforcing would deny: {d.reason.status.name} {d.reason}: {d.message})"
    if d.allowed:
        return "ALLOW" + (f" as {shown(d.identity.subject)}" if d.identity else "")
    return f"DENY {d.status.name} {d.reason}: {d.message}"


def _yes(value: bool) -> str:
    return "yes" if value else "no"
