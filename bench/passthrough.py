"""The benchmark's relay floor: the proxy's frame relay (`proxy.relay.Relay` on a
`proxy.upstream_pool.UpstreamPool`, the same HTTP/2 limits and message size limit the
proxy runs with by default) with a decision that costs nothing.

`NoDecision` stands where the proxy has its `Authorizer`: every call is allowed at once
by one prebuilt allow `Decision` that carries no identity, so nothing is added to the
headers. There is no stream guard and no metrics. What such a relay costs per call is
the relay's own floor; the proxy minus this is what deciding costs (the pipeline, the
token cache, the observers, the stream guard's watch).

The headers are still rewritten as the proxy rewrites them (`relay_headers` with the
default `strip_headers`): that is the relay's work, whatever the decision.
"""

from __future__ import annotations

from typing import cast

from authproxy.decide.decision import Decision
from authproxy.decide.pipeline import Authorizer
from authproxy.policy.model import PUBLIC, Policy, Rule
from authproxy.runtime.config import DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_MESSAGE_BYTES
from authproxy.sidecar.relay import Relay
from authproxy.sidecar.upstream_pool import UpstreamPool
from authproxy.wire.h2_engine import Limits

#: The passthrough's "policy": one public default rule that forwards the token too, so
#: only hop-by-hop and the default stripped headers are left out.
_RULE = Rule("default", PUBLIC, forward_token=True)
_POLICY = Policy(
    source="passthrough", version="passthrough", default=_RULE, exact={}, services={}, tokens={}
)
_ALLOW = Decision(allowed=True, method="", rule=_RULE, policy_version=_POLICY.version)


class NoDecision:
    """What the relay asks of an authorizer — `decide_now` and `policy.strip_headers` —
    with an allow that needs no work: the decision is returned at once, so the call is
    relayed in the same event loop step, as any proxy decision that waits for no I/O is."""

    policy: Policy = _POLICY

    def decide_now(
        self,
        method: str,
        headers: tuple[tuple[str, str], ...],
        peer: str,
        principal: str | None = None,
    ) -> Decision:
        return _ALLOW


def build_passthrough(upstream: str) -> Relay:
    """A relay to `upstream` (HOST:PORT, h2c) that allows every call; `listen` it."""
    dirty: set = set()  # connections (both sides) with frames to write, as in the proxy
    limits = Limits(max_concurrent_streams=DEFAULT_MAX_CONCURRENT_STREAMS)
    pool = UpstreamPool(upstream, limits, dirty)
    # The relay types its decider as the proxy's Authorizer; it uses only what
    # NoDecision has.
    return Relay(cast(Authorizer, NoDecision()), pool, limits, dirty, DEFAULT_MAX_MESSAGE_BYTES)
