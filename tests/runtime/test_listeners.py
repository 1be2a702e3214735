"""Every listener binds when the proxy starts, in a fixed order (admin, sidecar, ext_authz
gRPC, ext_authz HTTP). A port one of them cannot have stops the start with a ConfigError
naming the flag and address, and the listeners that had opened are closed again: their
ports can be bound at once, nothing leaks."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from authproxy.runtime.serve import AuthProxy, ConfigError
from tests.support.echo_backend import start_echo_backend
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import config_for

#: (flag, ServeConfig field, AuthProxy attribute), in the order the proxy opens them.
LISTENERS = (
    ("--admin", "admin", "admin"),
    ("--listen", "listen", "sidecar"),
    ("--ext-authz-grpc", "ext_authz_grpc", "check_grpc"),
    ("--ext-authz-http", "ext_authz_http", "check_http"),
)


def _bindable(port: int) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.mark.parametrize("busy", range(len(LISTENERS)), ids=[f for f, _, _ in LISTENERS])
async def test_a_busy_port_names_its_flag_and_the_listeners_opened_before_it_close(
    tmp_path: Path, keys: Keys, busy: int
):
    backend = await start_echo_backend()
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_address = f"127.0.0.1:{taken.getsockname()[1]}"
        addresses = {field: "127.0.0.1:0" for _, field, _ in LISTENERS}
        flag, field, _ = LISTENERS[busy]
        addresses[field] = busy_address
        cfg = config_for(
            tmp_path, keys, TEST_POLICY, upstream=f"127.0.0.1:{backend.port}",
            upstream_reflection=False, watch_policy=False, **addresses,
        )  # fmt: skip
        proxy = AuthProxy(cfg)
        with pytest.raises(ConfigError) as caught:
            await proxy.start()
        assert str(caught.value).startswith(f"{flag} {busy_address}: ")
        assert "in use" in str(caught.value)
        opened = [getattr(proxy, attribute).port for _, _, attribute in LISTENERS[:busy]]
        assert all(port > 0 for port in opened)  # they did open before the busy one
        assert [port for port in opened if not _bindable(port)] == []
    finally:
        taken.close()
        await backend.server.stop(None)
