"""At startup, once the backend answers server reflection, the sidecar logs the served
methods its policy does not name (the default decides them) — once, as a warning."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.support.example_backend import Example
from tests.support.keys import Keys
from tests.support.running_proxy import config_for, running_proxy

POLICY = """\
version: 1
default: deny
tokens:
  access: {type: access, audience: api-access}
methods:
  /api.v1.AuthService/*: public
  /api.v1.UserService/GetProfile: access
  /grpc.health.v1.Health/*: public
  /grpc.reflection.v1alpha.ServerReflection/*: deny
"""


async def test_uncovered_served_methods_are_logged_once_at_startup(
    tmp_path: Path, keys: Keys, example: Example, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config_for(
        tmp_path,
        keys,
        POLICY,
        listen="127.0.0.1:0",
        upstream=f"127.0.0.1:{example.backend.port}",
        watch_policy=False,
    )
    caplog.set_level(logging.INFO, logger="authproxy")
    async with running_proxy(cfg) as running:
        assert running.sidecar.learning is not None
        async with asyncio.timeout(15):  # learned, then logged, before the task ends
            await asyncio.shield(running.sidecar.learning)
    warnings = [r.getMessage() for r in caplog.records if "have no rule" in r.getMessage()]
    assert len(warnings) == 1, warnings
    line = warnings[0]
    assert "default (deny) decides them" in line
    names = line.rsplit(": ", 1)[1].split(", ")
    assert "/api.v1.UserService/UpdateProfile" in names
    assert any(name.startswith("/api.v1.DataService/") for name in names)
    assert "/api.v1.UserService/GetProfile" not in names  # named exactly
    assert not any(name.startswith("/api.v1.AuthService/") for name in names)  # wildcard
    assert not any("ServerReflection" in name for name in names)
