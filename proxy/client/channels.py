"""Channel options for clients that outlive a proxy restart.

When the proxy restarts (a deploy, a crash, a node move), the channel's connection drops
and gRPC reconnects with an exponential backoff (1 s, growing to 2 minutes by default).
Meanwhile a call fails at once with UNAVAILABLE unless it says `wait_for_ready=True`
(then it waits for the connection, until its deadline). Two settings cover it:

* `reconnect_options()` for the channel: a retry policy for UNAVAILABLE in the channel's
  service config (gRPC retries a call only when no response has started, so the proxy
  or backend did not answer it), and a reconnect backoff capped at a few seconds, so the
  channel finds a proxy that is back soon after it is.
* `wait_for_ready=True` for calls (per call, or as the session's default): a call made
  while the channel reconnects waits for the proxy instead of failing. Give such calls a
  deadline (`timeout=`): without one a call waits for as long as the proxy is down.

The sessions' channels get `reconnect_options()` unless `options` set a service config.
"""

from __future__ import annotations

import json
from typing import Any

#: The option that carries the service config (with its retry policy).
SERVICE_CONFIG = "grpc.service_config"


def reconnect_options(
    *,
    max_attempts: int = 5,
    initial_backoff: float = 0.2,
    max_backoff: float = 2.0,
    max_reconnect_backoff: float = 5.0,
) -> list[tuple[str, Any]]:
    """Channel options (`grpc.aio.insecure_channel(target, options=...)`, or a session's
    `options=`): retry a call that failed with UNAVAILABLE up to `max_attempts` times in
    all (gRPC caps it at 5), waiting a random time up to `initial_backoff` seconds before
    the first retry, doubling to at most `max_backoff`; and reconnect at least every
    `max_reconnect_backoff` seconds while the proxy is unreachable."""
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": f"{initial_backoff}s",
        "maxBackoff": f"{max_backoff}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    config = {"methodConfig": [{"name": [{}], "retryPolicy": policy}]}  # every method
    return [
        ("grpc.enable_retries", 1),
        (SERVICE_CONFIG, json.dumps(config)),
        ("grpc.max_reconnect_backoff_ms", int(max_reconnect_backoff * 1000)),
    ]
