"""The gRPC sidecar front end: a generic handler that decides, then relays.

Every call: ask the `Authorizer` (one pipeline for all front ends) with the method path
and the request metadata; on deny, end the call with the decision's status, message and
`ErrorInfo`; on allow, rewrite the metadata and relay the call to the backend. Unary
methods (known from the `MethodCatalog`) take the unary path; everything else takes the
generic stream path, which carries all four kinds. Streams authorized with a token are
watched by the `StreamGuard`, which ends them when the token expires or is revoked.

The listener is h2c, or TLS with a `tls.ServerTls` (mTLS when it has a client CA; then
each call's client-certificate identity, `tls.peer_principal`, goes to the pipeline).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from time import perf_counter

import grpc
from prometheus_client import Histogram

from .catalog import Kind, MethodCatalog
from .decision import Decision
from .drain import Drain
from .grpc_status import deny_details
from .metadata import InvalidMetadata, Metadata, upstream_metadata
from .peer_identity import peer_principal
from .pipeline import Authorizer
from .stream_guard import StreamGuard
from .tls import ServerTls
from .upstream import Ended, Upstream

log = logging.getLogger("authproxy.sidecar")


#: grpc core cancels (CANCELLED, not retried) calls at random once more than 1000 wait in
#: the server's queue for the application to take them, and all above 3000; a grpc.aio
#: server takes them one at a time, so a burst fills it. The queue is bounded instead by
#: the streams each connection may open (`max_concurrent_streams`).
_QUEUE_LIMIT = 2**31 - 1


def server_options(
    max_message_bytes: int, reuse_port: bool = False, max_concurrent_streams: int | None = None
) -> list[tuple[str, int]]:
    """`reuse_port`: SO_REUSEPORT, so several worker processes listen on one port (the
    kernel spreads the connections); off, a port another process holds is an error.
    `max_concurrent_streams`: advertised in SETTINGS_MAX_CONCURRENT_STREAMS; gRPC clients
    queue calls beyond it, and a stream opened anyway is reset with REFUSED_STREAM, which
    clients retry (None: no limit)."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Let oversized tokens reach the pipeline (TOKEN_TOO_LARGE) instead of a core error.
        ("grpc.max_metadata_size", 64 * 1024),
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.server.max_pending_requests", _QUEUE_LIMIT),
        ("grpc.server.max_pending_requests_hard_limit", _QUEUE_LIMIT),
    ]
    if max_concurrent_streams is not None:
        options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
        # Count open HTTP/2 streams, as the client does: with core's default (streams the
        # application still holds), a client keeping to the limit is refused at random.
        options.append(("grpc.http.overload_protection", 0))
    return options


class SidecarHandler(grpc.GenericRpcHandler):
    def __init__(
        self,
        authorizer: Authorizer,
        upstream: Upstream,
        catalog: MethodCatalog,
        guard: StreamGuard | None = None,
        upstream_seconds: Histogram | None = None,
        peer_identity: bool = False,
    ) -> None:
        """`peer_identity`: the listener verifies client certificates (mTLS); each call's
        certificate identity goes to the pipeline as its principal (`peers:` rules,
        `x-auth-peer`)."""
        self.authorizer = authorizer
        self.peer_identity = peer_identity
        self.upstream = upstream
        self.catalog = catalog
        self.guard = guard
        # The two children, resolved once: no label lookup per call.
        self._unary_seconds = upstream_seconds.labels("unary") if upstream_seconds else None
        self._stream_seconds = upstream_seconds.labels("stream") if upstream_seconds else None
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        #: Stopping the listener (`drain.py`): refuses new calls, counts the running ones.
        self.drain = Drain()
        self._refused = grpc.stream_stream_rpc_method_handler(
            self.drain.counted(self.drain.refused)
        )

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if self.drain.refusing:
            return self._refused
        method: str = details.method  # type: ignore[attr-defined]
        handler = self._handlers.get(method)
        if handler is not None:
            return handler
        kind = self.catalog.kinds.get(method)
        counted = self.drain.counted
        if kind is Kind.UNARY:
            handler = grpc.unary_unary_rpc_method_handler(counted(self._unary_for(method)))
        else:
            handler = grpc.stream_stream_rpc_method_handler(counted(self._stream_for(method)))
        if kind is not None:  # cache only methods the backend serves: bounded by its API
            self._handlers[method] = handler
        return handler

    async def _authorize(
        self, method: str, context: grpc.aio.ServicerContext
    ) -> tuple[Decision, Metadata]:
        """Decide; abort the call on deny, else return the decision and the metadata for
        the backend."""
        incoming = context.invocation_metadata() or ()
        if self.peer_identity:
            decision = await self.authorizer.decide(
                method, incoming, context.peer(), principal=peer_principal(context)
            )
        else:
            decision = await self.authorizer.decide(method, incoming, context.peer())
        if not decision.allowed:
            await _deny(decision, context)
        try:
            # The current policy's strip list (a reload in between only changes which
            # extra headers are removed, never the decision).
            strip = self.authorizer.policy.strip_headers
            return decision, upstream_metadata(incoming, decision, strip)
        except InvalidMetadata as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # unreachable: abort raises

    def _unary_for(self, method: str):
        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            _, metadata = await self._authorize(method, context)
            started = perf_counter()
            try:
                return await self.upstream.unary(method, request, metadata, context)
            finally:
                if self._unary_seconds is not None:
                    self._unary_seconds.observe(perf_counter() - started)

        return unary

    def _stream_for(self, method: str):
        async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            decision, metadata = await self._authorize(method, context)
            started = perf_counter()
            if self.guard is None:
                await self.upstream.stream(method, requests, metadata, context)
                return
            watch = self.guard.watch(decision, method, context.invocation_metadata() or ())
            try:
                await self.upstream.stream(method, requests, metadata, context, progress=watch)
            except (asyncio.CancelledError, Ended) as stopped:
                if watch.ended is None:
                    raise  # the client went away
                # The guard ended the stream (the relay and the backend call are cancelled).
                if isinstance(stopped, asyncio.CancelledError):
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                reason, message, by = watch.ended
                ending = by or decision  # a new policy's rule and version, when it refused
                await _deny(
                    ending._replace(allowed=False, reason=reason, message=message, shadow=False),
                    context,
                )
            finally:
                self.guard.release(watch)
                if self._stream_seconds is not None:
                    self._stream_seconds.observe(perf_counter() - started)

        return stream


async def _deny(decision: Decision, context: grpc.aio.ServicerContext) -> None:
    """End the call with the deny's status, message and details (raises AbortError)."""
    message, trailers = deny_details(decision)
    await context.abort(decision.status, message, trailing_metadata=trailers)


def build_server(
    handler: SidecarHandler,
    listen: str,
    max_message_bytes: int,
    tls: ServerTls | None = None,
    reuse_port: bool = False,
    max_concurrent_streams: int | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with the sidecar handler bound to `listen`: h2c, or with `tls`
    TLS (h2 by ALPN; mTLS when `tls` has a client CA). Returns the port. `reuse_port`,
    `max_concurrent_streams`: see `server_options`. Stop it with `handler.drain.stop`."""
    options = server_options(max_message_bytes, reuse_port, max_concurrent_streams)
    server = handler.drain.watch(lambda: grpc.aio.server(options=options))
    server.add_generic_rpc_handlers((handler,))
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, tls.server_credentials())
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, port
