"""The per-call metrics are plain numbers turned into families at scrape time; what
`/metrics` shows must be exactly what prometheus-client's own `Counter` and `Histogram`
show for the same calls: names, labels, buckets, values, `_created` series and order."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from authproxy.decide.decision import Decision
from authproxy.decide.reasons import Reason
from authproxy.policy.model import ACCESS, DENY, PUBLIC, Rule
from authproxy.runtime.metrics import _DECISION_BUCKETS, OTHER, Metrics

EXACT = Rule("/a.B/C", ACCESS)
WILDCARD = Rule("/a.B/*", ACCESS)
DEFAULT = Rule("default", DENY)
OPEN = Rule("/a.B/Open", PUBLIC)
DECISIONS = [
    Decision(True, "/a.B/C", EXACT, "v1"),
    Decision(True, "/a.B/D", WILDCARD, "v1"),
    Decision(False, "/x.Y/Z", DEFAULT, "v1", Reason.METHOD_DENIED, "disabled"),
    Decision(True, "/a.B/C", EXACT, "v1", Reason.INSUFFICIENT_ROLE, "needs", shadow=True),
    Decision(False, "/a.B/C", EXACT, "v1", Reason.TOKEN_EXPIRED, "expired"),
    Decision(True, "/a.B/Open", OPEN, "v1"),
]
#: Bucket bounds exactly, between them, below the first and beyond the last.
SECONDS = [0.00001, 0.000003, 0.00002, 0.0003, 0.1, 0.2, 0.5, 0.7, 0.0025, 12.0, 0.0]
UPSTREAM = [("unary", 0.005), ("unary", 0.03), ("stream", 12.0), ("unary", 10.0)]


def reference() -> bytes:
    """The same figures kept by prometheus-client's classes, as `Metrics` once did."""
    r = CollectorRegistry()
    requests = Counter(
        "authproxy_requests",
        "Decisions, by method (named in the policy, else other), level, decision, reason",
        ["method", "level", "decision", "reason"],
        registry=r,
    )
    shadow = Counter(
        "authproxy_shadow_would_deny",
        "Calls allowed only because their rule is in shadow mode",
        ["method", "level", "reason"],
        registry=r,
    )
    decision_seconds = Histogram(
        "authproxy_decision_seconds",
        "Time to decide a call (the whole pipeline)",
        buckets=_DECISION_BUCKETS,
        registry=r,
    )
    upstream = Histogram(
        "authproxy_upstream_seconds",
        "Time of calls relayed to the backend, from sending to the last response",
        ["kind"],
        registry=r,
    )
    Gauge("authproxy_policy_info", "The active policy (value 1)", ["version"], registry=r).labels(
        "v1"
    ).set(1)
    Gauge(
        "authproxy_policy_loaded_timestamp_seconds", "When the active policy was loaded", registry=r
    ).set(1700000000.0)
    for kind in ("unary", "stream"):
        upstream.labels(kind)
    for i, d in enumerate(DECISIONS * 3):
        method = d.method if d.rule.pattern == d.method else OTHER
        reason = d.reason.value if d.reason is not None else ""
        verdict = "allow" if d.allowed else "deny"
        requests.labels(method, d.rule.level, verdict, "" if d.shadow else reason).inc()
        if d.shadow:
            shadow.labels(method, d.rule.level, reason).inc()
        decision_seconds.observe(SECONDS[i % len(SECONDS)])
    for kind, seconds in UPSTREAM:
        upstream.labels(kind).observe(seconds)
    return generate_latest(r)


def ours() -> bytes:
    metrics = Metrics()
    for kind in ("unary", "stream"):  # the relay takes both children when it starts
        metrics.upstream_seconds.labels(kind)
    metrics.policy_loaded_now("v1", 1700000000.0)
    for i, d in enumerate(DECISIONS * 3):
        metrics.observe(d, SECONDS[i % len(SECONDS)], None)
    for kind, seconds in UPSTREAM:
        metrics.upstream_seconds.labels(kind).observe(seconds)
    return metrics.exposition()


def without_creation_times(text: bytes) -> str:
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", text.decode())


def test_the_exposition_is_prometheus_clients_own() -> None:
    expected = without_creation_times(reference())
    assert "authproxy_requests_created" in expected  # the comparison covers them
    assert without_creation_times(ours()) == expected


def test_created_is_when_a_series_first_appeared() -> None:
    metrics = Metrics()
    metrics.observe(DECISIONS[0], 0.001, None)
    created = re.findall(rb"authproxy_requests_created\{[^}]*\} (\S+)", metrics.exposition())
    metrics.observe(DECISIONS[0], 0.001, None)
    assert re.findall(rb"authproxy_requests_created\{[^}]*\} (\S+)", metrics.exposition()) == (
        created
    )
    assert len(created) == 1 and float(created[0]) > 1.7e9
