"""The backend connections: failing closed when the backend is down, connecting again
for the next call, and learning method kinds from the backend's server reflection."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authproxy.sidecar.catalog import Kind
from tests.support.echo_backend import start_echo_backend
from tests.support.keys import Keys
from tests.support.running_proxy import start_sidecar


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_upstream_down_is_unavailable_then_recovers(tmp_path: Path, keys: Keys, issuer):
    port = free_port()
    running = await start_sidecar(tmp_path, port, keys)
    token = issuer.mint("access", "alice", ttl=300).token
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await running.unary("/test.Access/Report", token=token)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"upstream 127.0.0.1:{port} is unavailable" in caught.value.details()
        assert running.sidecar.upstream.errors_total >= 1

        backend = await start_echo_backend(port)
        try:
            # A failed connect is not remembered: the next call connects again, at once.
            report = await running.report("/test.Access/Report", token=token)
            assert report["md"]["x-auth-subject"] == ["alice"]
        finally:
            await backend.server.stop(None)
    finally:
        await running.stop()


async def test_method_kinds_learned_from_upstream_reflection(tmp_path: Path, keys: Keys):
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    reflection.enable_server_reflection(("grpc.health.v1.Health", reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    running = await start_sidecar(tmp_path, port, keys, upstream_reflection=True)
    try:
        assert running.sidecar.learning is not None
        async with asyncio.timeout(15):
            await asyncio.shield(running.sidecar.learning)
        kinds = running.sidecar.catalog.kinds
        assert kinds["/grpc.health.v1.Health/Check"] is Kind.UNARY
        assert kinds["/grpc.health.v1.Health/Watch"] is Kind.SERVER_STREAMING
        assert kinds["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"] is (
            Kind.BIDI_STREAMING
        )
    finally:
        await running.stop()
        await server.stop(None)
