"""A started ext_authz `CheckServer` for the tests of its gRPC and HTTP/2 behaviour
(`test_ext_authz_grpc_h2.py`, `test_ext_authz_grpc_lifecycle.py`): the server on
loopback with a grpc channel to it, a raw HTTP/2 connection that keeps each stream's
DATA and sends requests in parts, and a pipeline step that holds decisions in flight.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2_grpc
from hyperframe.frame import DataFrame, Frame, HeadersFrame

from authproxy.decide.pipeline import Authorizer
from authproxy.ext_authz.grpc_check import SERVICE_NAME, CheckServer
from authproxy.keys.issuer import TokenIssuer
from authproxy.runtime.serve import build_authorizer
from authproxy.state.store import MemoryState
from tests.support.ext_authz import check_request, outcome
from tests.support.h2_streams import AbuseConnection
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import config_for

CHECK = f"/{SERVICE_NAME}/Check"


@dataclass
class Served:
    server: CheckServer
    channel: grpc.aio.Channel
    authorizer: Authorizer

    @property
    def port(self) -> int:
        return self.server.port

    async def check(self, request: external_auth_pb2.CheckRequest, **kwargs) -> str:
        stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)
        return outcome(await stub.Check(request, timeout=30, **kwargs))

    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)


def new_authorizer(tmp_path: Path, keys: Keys) -> Authorizer:
    cfg = config_for(tmp_path, keys, TEST_POLICY)
    return build_authorizer(cfg, MemoryState(subject_ttl=cfg.subject_revocation_ttl))


@asynccontextmanager
async def serving(tmp_path: Path, keys: Keys, **kwargs) -> AsyncIterator[Served]:
    """A started CheckServer on loopback (TEST_POLICY) and a grpc channel to it."""
    server = CheckServer(new_authorizer(tmp_path, keys), "127.0.0.1:0", **kwargs)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Served(server, channel, server.service.authorizer)
    finally:
        await channel.close()
        await server.stop(0)


def access_check(issuer: TokenIssuer) -> external_auth_pb2.CheckRequest:
    token = issuer.mint("access", "alice", ttl=300).token
    return check_request("/test.Access/Echo", token=token)


class Held:
    """A step of the real pipeline (`Authorizer.state_checks`, the hook the revocation
    check uses) that holds every token-checked decision until `release` is set."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.entered = 0
        self.all_in = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, rule, verified) -> None:
        self.entered += 1
        if self.entered >= self.expected:
            self.all_in.set()
        await self.release.wait()

    def install(self, authorizer: Authorizer) -> None:
        authorizer.state_checks = (*authorizer.state_checks, self)


class Frames(AbuseConnection):
    """A raw HTTP/2 client connection that also keeps each stream's DATA, and writes
    requests in parts: HEADERS first, the body (any bytes) later."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.data: dict[int, bytes] = defaultdict(bytes)

    def _on(self, frame: Frame) -> None:
        if isinstance(frame, DataFrame):
            self.data[frame.stream_id] += frame.data
        super()._on(frame)

    def open_stream(self, path: str, extra: list[tuple[bytes, bytes]] = ()) -> int:
        (stream_id,) = self.register()
        block = self.request_block(path, extra)
        self.writer.write(HeadersFrame(stream_id, block, flags=["END_HEADERS"]).serialize())
        return stream_id

    def send_body(self, stream_id: int, body: bytes) -> None:
        """`body` as it is (gRPC prefixes included), then END_STREAM."""
        self.writer.write(DataFrame(stream_id, body, flags=["END_STREAM"]).serialize())

    def request(self, path: str, body: bytes, extra: list[tuple[bytes, bytes]] = ()) -> int:
        stream_id = self.open_stream(path, extra)
        self.send_body(stream_id, body)
        return stream_id

    async def answer(self, stream_id: int) -> tuple[int, str]:
        """(grpc-status, grpc-message) of a stream, once it ended."""
        await self.read_until(lambda: self.streams[stream_id].done, 30)
        fields = self.streams[stream_id].fields
        return int(fields["grpc-status"]), fields.get("grpc-message", "")


@asynccontextmanager
async def frames(port: int, ack_settings: bool = True) -> AsyncIterator[Frames]:
    conn = await Frames.open(port, ack_settings=ack_settings)
    try:
        yield conn
    finally:
        await conn.close()
