"""The benchmark's baseline servers, each run in a process of its own so its CPU time can
be read from /proc:

    python -m bench.servers backend|passthrough|noop-check|noop-http --port P [--upstream H:P]

- `backend`: the no-auth echo backend. `/bench.Svc/Echo` (unary) answers the request
  bytes; `/bench.Svc/Chat` (bidi) answers every message as it comes. Raw bytes, no
  serializers, one grpc.aio server: the cheapest honest gRPC service in Python.
- `passthrough`: the forwarding floor. The proxy's own forwarding (`proxy.upstream.Upstream`,
  the same server options, unary methods on the unary path, the rest on the stream path)
  with no decision at all: only hop-by-hop headers are dropped.
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

from proxy.metadata import HOP_BY_HOP
from proxy.serve import DEFAULT_MAX_MESSAGE_BYTES
from proxy.sidecar import server_options
from proxy.upstream import Upstream

UNARY_METHOD = "/bench.Svc/Echo"
STREAM_METHOD = "/bench.Svc/Chat"


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


class Passthrough(grpc.GenericRpcHandler):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        handler = self._handlers.get(method)
        if handler is None:
            handler = self._handlers[method] = self._handler_for(method)
        return handler

    def _handler_for(self, method: str) -> grpc.RpcMethodHandler:
        upstream = self.upstream

        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await upstream.unary(method, request, _forwarded(context), context)

        async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            await upstream.stream(method, requests, _forwarded(context), context)

        if method == UNARY_METHOD:
            return grpc.unary_unary_rpc_method_handler(unary)
        return grpc.stream_stream_rpc_method_handler(stream)


def _forwarded(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
    return tuple(
        (k, v)
        for k, v in context.invocation_metadata() or ()
        if k not in HOP_BY_HOP and not k.startswith(":")
    )


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
    server = grpc.aio.server(options=server_options(DEFAULT_MAX_MESSAGE_BYTES))
    upstream = None
    if kind == "backend":
        server.add_generic_rpc_handlers((EchoBackend(),))
    elif kind == "passthrough":
        assert upstream_target is not None, "passthrough needs --upstream"
        upstream = Upstream(upstream_target, DEFAULT_MAX_MESSAGE_BYTES)
        server.add_generic_rpc_handlers((Passthrough(upstream),))
    else:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoOpCheck(), server)
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"cannot listen on {address}")
    await server.start()
    await stopping.wait()
    await server.stop(None)
    if upstream is not None:
        await upstream.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("backend", "passthrough", "noop-check", "noop-http"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream")
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.port, args.upstream))
