"""Which methods the backend serves and whether each one streams.

The sidecar relays any method frame by frame, without proto knowledge; every kind takes
the same path. Knowing a method's kind lets the stream guard skip known unary calls
(decided once, never watched), labels `authproxy_upstream_seconds` and tells the lint
which methods the backend serves. Kinds come from descriptor sets (`--descriptor-set`, a
protoset) and/or the backend's gRPC server reflection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authproxy.wire.message_types import MessageTypes

log = logging.getLogger("authproxy.catalog")


class Kind(Enum):
    UNARY = "unary"
    SERVER_STREAMING = "server_streaming"
    CLIENT_STREAMING = "client_streaming"
    BIDI_STREAMING = "bidi_streaming"


class CatalogError(Exception):
    pass


class MethodCatalog:
    def __init__(self) -> None:
        self.kinds: dict[str, Kind] = {}
        #: Each method's request type, for rules that read request fields.
        self.types = MessageTypes()

    def add_files(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> int:
        files = list(files)
        self.types.add_files(files)
        added = 0
        for fd in files:
            prefix = f"{fd.package}." if fd.package else ""
            for service in fd.service:
                for m in service.method:
                    kind = (
                        Kind.BIDI_STREAMING
                        if m.client_streaming and m.server_streaming
                        else Kind.CLIENT_STREAMING
                        if m.client_streaming
                        else Kind.SERVER_STREAMING
                        if m.server_streaming
                        else Kind.UNARY
                    )
                    self.kinds[f"/{prefix}{service.name}/{m.name}"] = kind
                    added += 1
        return added

    def add_descriptor_set(self, path: str) -> int:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise CatalogError(f"{path}: cannot read descriptor set: {e.strerror}") from None
        fds = descriptor_pb2.FileDescriptorSet()
        try:
            fds.ParseFromString(data)
        except Exception as e:  # protobuf raises DecodeError (a subclass of Exception)
            raise CatalogError(f"{path}: not a FileDescriptorSet: {e}") from None
        return self.add_files(fds.file)

    async def add_from_reflection(self, channel: grpc.aio.Channel, timeout: float = 5.0) -> int:
        """Ask the backend's server reflection for every service and its methods."""
        async with asyncio.timeout(timeout):
            files = await reflect_files(channel)
        return self.add_files(files)


async def reflect_files(channel: grpc.aio.Channel) -> list[descriptor_pb2.FileDescriptorProto]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    answer = await call.read()
    if answer.HasField("error_response"):
        raise CatalogError(f"reflection error: {answer.error_response.error_message}")
    services = [s.name for s in answer.list_services_response.service]
    seen: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for name in services:
        await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=name))
        answer = await call.read()
        if answer.HasField("error_response"):
            log.warning(
                "reflection has no descriptor for %s: %s", name, answer.error_response.error_message
            )
            continue
        for raw in answer.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            seen[fd.name] = fd
    await call.done_writing()
    return list(seen.values())


async def reflect_backend(address: str, timeout: float = 5.0) -> MethodCatalog:
    """The methods the backend at `address` (HOST:PORT, plain-text h2c) lists by server
    reflection. Raises `CatalogError`, one line naming the address, when the backend
    cannot be reached in `timeout` seconds or does not serve reflection."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CatalogError(f"backend {address!r} is not HOST:PORT")
    catalog = MethodCatalog()
    channel = grpc.aio.insecure_channel(address)
    try:
        await catalog.add_from_reflection(channel, timeout)
    except Exception as e:  # whatever went wrong: one line naming the address
        silent, problem = reflection_problem(e, timeout)
        outcome = "not answering" if silent else "failed"
        raise CatalogError(f"backend {address}: reflection {outcome} ({problem})") from None
    finally:
        await channel.close()
    return catalog


def reflection_problem(e: BaseException, timeout: float) -> tuple[bool, str]:
    """Why a reflection attempt failed, as one line (`UNAVAILABLE: failed to connect ...`),
    and whether it means the backend is not answering (down, unreachable, silent) rather
    than answering with an error. The one classification: the lint's error and the
    sidecar's retry log both word it so."""
    if isinstance(e, grpc.aio.AioRpcError):
        code = e.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return (
                False,
                "UNIMPLEMENTED: no gRPC server reflection service (grpc.reflection.v1alpha)",
            )
        silent = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return silent, f"{code.name}: {_one_line(e.details())}"
    if isinstance(e, TimeoutError):
        return True, f"no answer within {timeout:g}s"
    return False, _one_line(str(e)) or type(e).__name__


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())
