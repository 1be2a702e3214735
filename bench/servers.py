"""The benchmark's baseline servers, each run in a process of its own so its CPU time can
be read from /proc:

    python -m bench.servers backend|passthrough|pipe|noop-check|noop-http --port P [--upstream H:P]

- `backend`: the no-auth echo backend. `/bench.Svc/Echo` (unary) answers the request
  bytes; `/bench.Svc/Chat` (bidi) answers every message as it comes. Raw bytes, no
  serializers, one grpc.aio server: the cheapest honest gRPC service in Python.
- `passthrough`: the relay's floor. The proxy's frame relay with a decision that costs
  nothing (`bench.passthrough`): no pipeline, no stream guard, no metrics.
- `pipe`: a byte pipe on asyncio, no HTTP/2 (`bench.pipe`): the floor of any relay in a
  Python process, for scale in the latency runs.
- `noop-check`: an Envoy ext_authz v3 Check server (grpc.aio) that answers OK to everything.
- `noop-http`: an aiohttp low-level server that answers 200 to everything.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2

from authproxy.runtime.config import DEFAULT_MAX_MESSAGE_BYTES

from . import pipe
from .passthrough import build_passthrough

UNARY_METHOD = "/bench.Svc/Echo"
STREAM_METHOD = "/bench.Svc/Chat"
#: grpc core cancels (CANCELLED) calls at random once more than 1000 wait in a server's
#: queue for the application to take them; a grpc.aio server takes them one at a time,
#: so a saturation run's burst would fill it. Bounded instead by the streams each
#: connection may open.
_QUEUE_LIMIT = 2**31 - 1
#: The grpc.aio servers' options: messages and header lists as large as the proxy relays.
GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.max_metadata_size", 64 * 1024),
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", _QUEUE_LIMIT),
    ("grpc.server.max_pending_requests_hard_limit", _QUEUE_LIMIT),
)


class EchoBackend(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self._unary = grpc.unary_unary_rpc_method_handler(self._echo)
        self._stream = grpc.stream_stream_rpc_method_handler(self._chat)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method  # type: ignore[attr-defined]
        if method == UNARY_METHOD:
            return self._unary
        if method == STREAM_METHOD:
            return self._stream
        return None

    async def _echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def _chat(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message


class NoOpCheck(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request, context):
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))


async def serve(kind: str, port: int, upstream_target: str | None) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    address = f"127.0.0.1:{port}"
    if kind == "noop-http":

        async def ok(request: web.BaseRequest) -> web.Response:
            return web.Response(status=200)

        runner = web.ServerRunner(web.Server(ok, access_log=None), handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await stopping.wait()
        await runner.cleanup()
        return
    if kind == "pipe":
        assert upstream_target is not None, "pipe needs --upstream"
        listener = await pipe.listen("127.0.0.1", port, upstream_target)
        await stopping.wait()
        listener.close()
        return
    if kind == "passthrough":
        assert upstream_target is not None, "passthrough needs --upstream"
        relay = build_passthrough(upstream_target)
        await relay.listen(f"127.0.0.1:{port}")
        await stopping.wait()
        await relay.stop(0)
        return
    server = grpc.aio.server(options=GRPC_OPTIONS)
    if kind == "backend":
        server.add_generic_rpc_handlers((EchoBackend(),))
    else:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoOpCheck(), server)
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"cannot listen on {address}")
    await server.start()
    await stopping.wait()
    await server.stop(None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "kind", choices=("backend", "passthrough", "pipe", "noop-check", "noop-http")
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream")
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.port, args.upstream))
