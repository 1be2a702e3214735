"""A generic gRPC backend for tests: it serves any method, on raw bytes, and reports what
it received. The behaviour is chosen by the method name (after the last `/`), so one
backend serves `/test.Public/Report`, `/test.Access/Report`, ...

Methods:
- Report   (unary)   -> JSON {"metadata": [[k, v], ...], "time_remaining": s, "size": n}
- Echo     (unary)   -> the request bytes
- Count    (server streaming) request JSON {"n": N} -> N messages b"0", b"1", ...
- Sum      (client streaming) -> JSON {"messages": N, "bytes": B}
- Chat     (bidi)    -> every message back, prefixed with b"echo:"
- Fail     (unary)   request JSON {"code": "NOT_FOUND", "message": ...} -> that status, with a
                     response header, a custom trailer, a -bin trailer and status details
- Hang     (unary)   waits until cancelled; records the cancellation
- Held     (unary)   waits for `release`, then answers b"held"
- HeldCount (server streaming) waits for `release`, then sends b"0", b"1"
- Compressed (unary) -> the request bytes, gzip-compressed by the backend
- BigStream (server streaming) request JSON {"messages": N, "size": S} -> N messages of S
                     bytes, message i being `big_message(i, S)`; counts what it sent
                     (`big_sent`, after each write completes) and sets `big_done` at the end
- Sized    (unary)   request JSON {"size": N} -> N bytes (`big_message(0, N)`)
- Mirror   (unary)   -> the request bytes; every request pair whose key starts with `x-m-`
                     comes back as a response header and again as a trailer, in order
- Barrier  (unary)   request JSON {"n": N} -> b"ok" once N Barrier calls are in the backend
                     at the same time (`barrier_arrived` counts them)
- AbortStream (server streaming) request JSON {"messages": K, "code": ..., "message": ...}
                     -> K messages b"0", b"1", ..., then that status with trailers
- HangStream (bidi)  sends b"first", then waits until cancelled (`stream_cancelled`)
"""

from __future__ import annotations

import asyncio
import json

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

UNARY = ("Report", "Echo", "Fail", "Hang", "Held", "Compressed")
#: Server-streaming and bidi methods beyond Count/Sum/Chat (not in the test protoset: the
#: proxy does not know their kinds).
SERVER_STREAMING = ("Count", "HeldCount", "BigStream", "AbortStream")
BIDI = ("Chat", "HangStream")


def big_message(index: int, size: int) -> bytes:
    """Message `index` of a BigStream: its index (4 bytes, big endian) repeated, then cut to
    `size` bytes; any message out of order or any byte changed shows."""
    return (index.to_bytes(4, "big") * (size // 4 + 1))[:size]


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else "bin:" + value.hex()


class EchoBackend(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[tuple[str, str | bytes], ...]]] = []
        self.echoed: list[int] = []  # sizes of the requests `Echo` received
        self.cancelled = asyncio.Event()
        self.hang_started = asyncio.Event()
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.big_sent = 0  # bytes of BigStream messages whose write completed
        self.big_done = asyncio.Event()
        self.barrier_arrived = 0
        self.barrier_full = asyncio.Event()
        self.stream_started = asyncio.Event()
        self.stream_cancelled = asyncio.Event()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        name = details.method.rsplit("/", 1)[-1]  # type: ignore[attr-defined]
        method = details.method  # type: ignore[attr-defined]
        behaviour = getattr(self, f"_{name.lower()}", None)
        if behaviour is None:
            return None
        self.calls.append((method, tuple(details.invocation_metadata or ())))  # type: ignore[attr-defined]
        if name in SERVER_STREAMING:
            return grpc.unary_stream_rpc_method_handler(behaviour)
        if name == "Sum":
            return grpc.stream_unary_rpc_method_handler(behaviour)
        if name in BIDI:
            return grpc.stream_stream_rpc_method_handler(behaviour)
        return grpc.unary_unary_rpc_method_handler(behaviour)

    @property
    def last_metadata(self) -> dict[str, list[str | bytes]]:
        result: dict[str, list[str | bytes]] = {}
        for key, value in self.calls[-1][1]:
            result.setdefault(key, []).append(value)
        return result

    async def _report(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        md = [[k, _text(v)] for k, v in context.invocation_metadata() or ()]
        report = {"metadata": md, "time_remaining": context.time_remaining(), "size": len(request)}
        return json.dumps(report).encode()

    async def _echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.echoed.append(len(request))
        await context.send_initial_metadata((("x-backend-header", "hello"),))
        context.set_trailing_metadata(
            (("x-backend-trailer", "bye"), ("x-trailer-bin", b"\x00\xff"))
        )
        return request

    async def _compressed(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_compression(grpc.Compression.Gzip)
        return request

    async def _count(self, request: bytes, context: grpc.aio.ServicerContext):
        n = json.loads(request)["n"]
        for i in range(n):
            yield str(i).encode()

    async def _sum(self, requests, context: grpc.aio.ServicerContext) -> bytes:
        count = size = 0
        async for message in requests:
            count += 1
            size += len(message)
        return json.dumps({"messages": count, "bytes": size}).encode()

    async def _chat(self, requests, context: grpc.aio.ServicerContext):
        await context.send_initial_metadata((("x-chat", "open"),))
        async for message in requests:
            yield b"echo:" + message
        context.set_trailing_metadata((("x-chat-end", "done"),))

    async def _fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        spec = json.loads(request)
        code = grpc.StatusCode[spec["code"]]
        info = error_details_pb2.ErrorInfo(reason="BACKEND_REASON", domain="backend.test")
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=code.value[0], message=spec["message"], details=[detail])
        await context.send_initial_metadata((("x-fail-header", "h"),))
        await context.abort(
            code,
            spec["message"],
            trailing_metadata=(
                ("grpc-status-details-bin", status.SerializeToString()),
                ("x-fail-trailer", "t"),
                ("x-fail-bin", b"\x01\x02"),
            ),
        )
        return b""

    async def _hang(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.hang_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b""

    async def _held(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.held.set()
        await self.release.wait()
        return b"held"

    async def _heldcount(self, request: bytes, context: grpc.aio.ServicerContext):
        self.held.set()
        await self.release.wait()
        for i in range(2):
            yield str(i).encode()

    async def _bigstream(self, request: bytes, context: grpc.aio.ServicerContext):
        spec = json.loads(request)
        size = spec["size"]
        for i in range(spec["messages"]):
            yield big_message(i, size)
            self.big_sent += size  # the write is done (the generator resumes after it)
        self.big_done.set()

    async def _sized(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return big_message(0, json.loads(request)["size"])

    async def _mirror(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        pairs = tuple(
            (k, v) for k, v in context.invocation_metadata() or () if k.startswith("x-m-")
        )
        await context.send_initial_metadata(pairs)
        context.set_trailing_metadata(pairs)
        return request

    async def _barrier(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.barrier_arrived += 1
        if self.barrier_arrived >= json.loads(request)["n"]:
            self.barrier_full.set()
        await self.barrier_full.wait()
        return b"ok"

    async def _abortstream(self, request: bytes, context: grpc.aio.ServicerContext):
        spec = json.loads(request)
        for i in range(spec["messages"]):
            yield str(i).encode()
        await context.abort(
            grpc.StatusCode[spec["code"]],
            spec["message"],
            trailing_metadata=(("x-abort-trailer", "t"), ("x-abort-bin", b"\x00\x01\xff")),
        )

    async def _hangstream(self, requests, context: grpc.aio.ServicerContext):
        try:
            yield b"first"
            self.stream_started.set()
            await asyncio.sleep(3600)
        except (asyncio.CancelledError, GeneratorExit):
            self.stream_cancelled.set()
            raise


async def start_echo_backend(
    port: int = 0, max_message_bytes: int = 64 * 1024 * 1024, backend: EchoBackend | None = None
):
    """`backend` (default: a new `EchoBackend`) served on loopback `port` (0: a free one)."""
    backend = backend or EchoBackend()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((backend,))
    backend.port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    backend.server = server
    return backend
