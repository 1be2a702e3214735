"""Request messages with fields for `request:` rules: the `owned.Owned` type, a protoset whose
`test.<Service>` services take it on the echo backend's Echo, Sum, Chat and Count methods,
real messages serialized from that type, and their gRPC framing.

    // test/owned_types.proto (package owned; a service `test.Owned` and a message
    // `test.Owned` could not both be named so)
    message Inner { string owner_id = 1; }
    message Owned {
      string user_id = 1; Inner filter = 2; int64 tenant = 3;
      repeated string tags = 4; bytes blob = 5;
    }
    // test/owned.proto (package test) imports it: service Owned { rpc Echo(owned.Owned) ... }

The messages travel as raw bytes (the echo backend echoes raw bytes), built from a private
descriptor pool so nothing is registered in the process-wide one. `RecordingBackend` is the
echo backend keeping each request message its methods received; `raw_grpc_call` sends
hand-framed messages (a compressed flag, a cut message) over plain HTTP/2.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from tests.support.echo_backend import EchoBackend, start_echo_backend
from tests.support.h2client import H2Response, grpc_request_headers, h2_exchange

Field = descriptor_pb2.FieldDescriptorProto
TYPES_FILE = "test/owned_types.proto"
SERVICES_FILE = "test/owned.proto"
#: The full name of the request (and response) type.
OWNED_TYPE = "owned.Owned"
#: The echo backend's methods an `Owned` service names, with (client, server) streaming.
OWNED_METHODS = {
    "Echo": (False, False),
    "Sum": (True, False),
    "Chat": (True, True),
    "Count": (False, True),
}


def types_file() -> descriptor_pb2.FileDescriptorProto:
    """`test/owned_types.proto`: `owned.Inner` and `owned.Owned`."""
    fd = descriptor_pb2.FileDescriptorProto(name=TYPES_FILE, package="owned", syntax="proto3")
    inner = fd.message_type.add(name="Inner")
    inner.field.add(name="owner_id", number=1, type=Field.TYPE_STRING, label=Field.LABEL_OPTIONAL)
    owned = fd.message_type.add(name="Owned")
    for name, number, kind, label, type_name in (
        ("user_id", 1, Field.TYPE_STRING, Field.LABEL_OPTIONAL, None),
        ("filter", 2, Field.TYPE_MESSAGE, Field.LABEL_OPTIONAL, ".owned.Inner"),
        ("tenant", 3, Field.TYPE_INT64, Field.LABEL_OPTIONAL, None),
        ("tags", 4, Field.TYPE_STRING, Field.LABEL_REPEATED, None),
        ("blob", 5, Field.TYPE_BYTES, Field.LABEL_OPTIONAL, None),
    ):
        field = owned.field.add(name=name, number=number, type=kind, label=label)
        if type_name is not None:
            field.type_name = type_name
    return fd


def services_file(services: Iterable[str] = ("Owned",)) -> descriptor_pb2.FileDescriptorProto:
    """`test/owned.proto`: each service in `services` (package `test`) with the methods of
    `OWNED_METHODS`, every one taking and returning `owned.Owned`."""
    fd = descriptor_pb2.FileDescriptorProto(
        name=SERVICES_FILE, package="test", syntax="proto3", dependency=[TYPES_FILE]
    )
    for service in services:
        svc = fd.service.add(name=service)
        for method, (client_streaming, server_streaming) in OWNED_METHODS.items():
            svc.method.add(
                name=method,
                input_type=f".{OWNED_TYPE}",
                output_type=f".{OWNED_TYPE}",
                client_streaming=client_streaming,
                server_streaming=server_streaming,
            )
    return fd


def owned_protoset(path: Path, services: Iterable[str] = ("Owned",)) -> Path:
    """Write a FileDescriptorSet of both files (services first, as sets may come) to `path`."""
    fds = descriptor_pb2.FileDescriptorSet(file=[services_file(services), types_file()])
    path.write_bytes(fds.SerializeToString())
    return path


def _owned_class() -> Any:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(types_file())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(OWNED_TYPE))


#: The generated class of `owned.Owned` (from a private pool).
Owned = _owned_class()


def owned(
    user_id: str = "",
    owner_id: str | None = None,
    tenant: int = 0,
    tags: Iterable[str] = (),
    blob: bytes = b"",
) -> bytes:
    """A serialized `owned.Owned`; `owner_id` sets `filter.owner_id`."""
    message = Owned(user_id=user_id, tenant=tenant, tags=list(tags), blob=blob)
    if owner_id is not None:
        message.filter.owner_id = owner_id
    return message.SerializeToString()


def parsed(data: bytes) -> Any:
    return Owned.FromString(data)


def frame(payload: bytes, compressed: bool = False) -> bytes:
    """One gRPC message as on the wire: the compressed flag, 4-byte length, payload."""
    return (b"\x01" if compressed else b"\x00") + len(payload).to_bytes(4, "big") + payload


def gzipped(payload: bytes) -> bytes:
    return gzip.compress(payload)


def deflated(payload: bytes) -> bytes:
    """`grpc-encoding: deflate`: a zlib stream."""
    return zlib.compress(payload)


# --- a backend that records the messages -------------------------------------------------


class RecordingBackend(EchoBackend):
    """The echo backend, keeping every request message Echo, Sum, Chat and Count receive
    (`received[method name]`, in order), and setting `ended[method name]` once that
    method's handler is over (returned, failed or cancelled). Count answers its request
    twice."""

    def __init__(self) -> None:
        super().__init__()
        self.received: dict[str, list[bytes]] = {name: [] for name in OWNED_METHODS}
        self.ended: dict[str, asyncio.Event] = {name: asyncio.Event() for name in OWNED_METHODS}

    async def _echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            self.received["Echo"].append(request)
            return await super()._echo(request, context)
        finally:
            self.ended["Echo"].set()

    async def _sum(self, requests, context: grpc.aio.ServicerContext) -> bytes:
        count = size = 0
        try:
            async for message in requests:
                self.received["Sum"].append(message)
                count += 1
                size += len(message)
            return f'{{"messages": {count}, "bytes": {size}}}'.encode()
        finally:
            self.ended["Sum"].set()

    async def _chat(self, requests, context: grpc.aio.ServicerContext):
        try:
            async for message in requests:
                self.received["Chat"].append(message)
                yield b"echo:" + message
        finally:
            self.ended["Chat"].set()

    async def _count(self, request: bytes, context: grpc.aio.ServicerContext):
        try:
            self.received["Count"].append(request)
            for _ in range(2):
                yield request
        finally:
            self.ended["Count"].set()


async def start_recording_backend(max_message_bytes: int = 64 * 1024 * 1024) -> RecordingBackend:
    backend = RecordingBackend()
    await start_echo_backend(max_message_bytes=max_message_bytes, backend=backend)
    return backend


# --- hand-framed calls over HTTP/2 ---------------------------------------------------------


async def raw_grpc_call(
    port: int,
    path: str,
    body: bytes | list[bytes],
    token: str | None = None,
    extra: Iterable[tuple[bytes, bytes]] = (),
    timeout: float = 10.0,
) -> H2Response:
    """One gRPC request whose DATA is exactly `body` (framed by the caller; at most one
    flow-control window; a list: one DATA frame each, all written at once), ended after
    it; the response's headers, trailers and data."""
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    headers = grpc_request_headers(port, path) + list(extra)
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    parts = body if isinstance(body, list) else [body]
    return await h2_exchange(port, config, headers, parts, timeout)
