"""The backend connection and the two ways a call is relayed to it.

Messages travel as raw bytes (no serializers), so the proxy needs no proto knowledge.
Everything else is relayed faithfully: response headers, trailers, status code and
details (including `grpc-status-details-bin`), the remaining deadline, cancellation, and
half-close on client streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from .metadata import Metadata

log = logging.getLogger("authproxy.upstream")

#: Core messages for failures to reach the backend at all (connect, reset, DNS).
_CONNECT_FAILURES = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "socket closed",
    "connection reset",
    "dns resolution failed",
    "broken pipe",
    "end of tcp stream",
)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Recover quickly when the backend comes back instead of backing off for minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 0),
    ]


class Upstream:
    def __init__(self, target: str, max_message_bytes: int) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(target, options=channel_options(max_message_bytes))
        self.errors_total = 0

    async def close(self) -> None:
        await self.channel.close()

    async def unary(
        self, method: str, request: bytes, metadata: Metadata, context: grpc.aio.ServicerContext
    ) -> bytes:
        call = self.channel.unary_unary(method)(
            request, metadata=metadata, timeout=context.time_remaining()
        )
        try:
            response = await call
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(initial)
            trailing = await call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(trailing)
            return response
        except grpc.aio.AioRpcError as error:
            await self.relay_error(error, context, headers_sent=False)
            raise  # unreachable: relay_error aborts
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:  # e.g. the gRPC core refusing to send: never hang the client
            await self.relay_failure(error, context)
            raise
        finally:
            if not call.done():
                call.cancel()

    async def stream(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        metadata: Metadata,
        context: grpc.aio.ServicerContext,
    ) -> None:
        call = self.channel.stream_stream(method)(
            metadata=metadata, timeout=context.time_remaining()
        )
        pump = asyncio.create_task(_pump(requests, call))
        headers_sent = False
        try:
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(initial)
                headers_sent = True
            async for response in call:
                await context.write(response)
            trailing = await call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(trailing)
        except grpc.aio.AioRpcError as error:
            await self.relay_error(error, context, headers_sent)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:  # e.g. the gRPC core refusing to send: never hang the client
            await self.relay_failure(error, context)
        finally:
            pump.cancel()
            if not call.done():
                call.cancel()  # the client went away: cancel the backend call too
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump

    async def relay_error(
        self, error: grpc.aio.AioRpcError, context: grpc.aio.ServicerContext, headers_sent: bool
    ) -> None:
        """End the client's call with the backend's status, details, headers and trailers."""
        initial = error.initial_metadata()
        if initial and not headers_sent:
            await context.send_initial_metadata(initial)
        code = error.code()
        details = error.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and _is_connect_failure(details):
            self.errors_total += 1
            log.warning("upstream %s unavailable: %s", self.target, details)
            details = f"upstream {self.target} is unavailable: {details}"
        await context.abort(code, details, trailing_metadata=tuple(error.trailing_metadata() or ()))

    async def relay_failure(self, error: Exception, context: grpc.aio.ServicerContext) -> None:
        self.errors_total += 1
        log.error("relaying to upstream %s failed: %r", self.target, error)
        await context.abort(grpc.StatusCode.INTERNAL, "the proxy could not relay this call")


async def _pump(requests: AsyncIterator[bytes], call: grpc.aio.StreamStreamCall) -> None:
    """Copy client messages to the backend, then half-close."""
    try:
        async for message in requests:
            await call.write(message)
        await call.done_writing()
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        pass  # the backend ended the call; the response side reports its status


def _is_connect_failure(details: str) -> bool:
    lowered = details.lower()
    return any(marker in lowered for marker in _CONNECT_FAILURES)
