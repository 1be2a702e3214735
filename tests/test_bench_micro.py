"""The microbenchmarks run and return well-formed figures (no timing thresholds: timings on
a shared machine are noise; figures are read from `python -m bench.micro`)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from authproxy.decide.pipeline import _method_rule
from authproxy.policy.loader import parse_policy
from authproxy.policy.model import LEVELS, PUBLIC
from bench import micro


def _leaves(figures: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(figures, dict):
        return [leaf for key, value in figures.items() for leaf in _leaves(value, f"{path}/{key}")]
    return [(path, figures)]


def _assert_figures(figures: dict[str, Any]) -> None:
    leaves = _leaves(figures)
    assert leaves
    for path, value in leaves:
        assert isinstance(value, int | float) and not isinstance(value, bool), (path, value)
        assert math.isfinite(value) and value > 0, (path, value)
    json.dumps(figures)  # what the caller writes


@pytest.mark.timeout(60)
def test_quick_run_returns_every_figure():
    figures = micro.run(quick=True)

    verify = figures["cold_verify"]
    _assert_figures(verify)
    assert set(verify["algorithms"]) == {"RS256", "ES256", "EdDSA", "HS256"}
    for row in verify["algorithms"].values():
        assert set(row) == {"ours_us", "pyjwt_us", "ratio"}
        assert row["ratio"] == pytest.approx(row["ours_us"] / row["pyjwt_us"], rel=1e-9)
    assert set(verify["cached_us"]) == {"ES256"}

    match = figures["policy_match"]
    _assert_figures(match)
    assert set(match["sizes"]) == {10, 1_000, 100_000}
    for row in match["sizes"].values():
        assert set(row) == {"parse_s", "lookup_ns", "spread_ns", "decide_us"}
    sizes = match["sizes"]
    assert match["ratio_100k_vs_10"] == pytest.approx(
        sizes[100_000]["lookup_ns"] / sizes[10]["lookup_ns"], rel=1e-9
    )
    assert match["decide_ratio_100k_vs_10"] == pytest.approx(
        sizes[100_000]["decide_us"] / sizes[10]["decide_us"], rel=1e-9
    )


@pytest.mark.parametrize("rules", [10, 1_000])
def test_generated_policy_has_its_rules_and_the_probes_match_as_labelled(rules):
    policy = parse_policy(micro.policy_yaml(rules), "micro.yaml")
    assert policy.rule_count == rules
    assert len(policy.services) == max(1, rules // 20)
    assert {rule.level for rule in policy.exact.values()} == set(LEVELS)
    assert any(rule.roles for rule in policy.exact.values())
    for method in micro.EXACT_PROBES:
        assert _method_rule(policy, method) is policy.exact[method]
    for method in micro.WILDCARD_PROBES:
        assert _method_rule(policy, method) is policy.services["pkg0.Open"]
    for method in micro.MISS_PROBES:
        assert _method_rule(policy, method) is policy.default
    assert policy.exact[micro.PUBLIC_METHOD].level == PUBLIC
