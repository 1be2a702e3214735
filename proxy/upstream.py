"""The backend connection and the two ways a call is relayed to it.

Messages travel as raw bytes (no serializers), so the proxy needs no proto knowledge.
Everything else is relayed faithfully: response headers, trailers, status code and
details (including `grpc-status-details-bin`), the remaining deadline, cancellation, and
half-close on client streams.

The channel is h2c, or TLS/mTLS with a `tls.UpstreamTls`; when its files change a new
channel takes the new calls and the old one is closed after its calls end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol

import grpc

from .metadata import Metadata
from .tls import UpstreamTls

log = logging.getLogger("authproxy.upstream")


class Ended(Exception):
    """The stream's `Progress` ended it before a response message was relayed."""


class Progress(Protocol):
    """Told where a relayed stream is (the stream guard's `Watch`)."""

    def requests_done(self) -> None:
        """The client half-closed and every request message reached the backend."""

    def may_respond(self) -> bool:
        """Before relaying a response message: False ends the stream without it."""
        ...

    def responded(self) -> None:
        """A response message was relayed."""


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


#: How long a channel replaced after a TLS reload may keep serving the calls and streams
#: that were already on it; calls still open after this are cancelled.
DRAIN_SECONDS = 24 * 3600.0


class Upstream:
    """The backend channel. With `tls`, the channel is TLS (or mTLS) and is rebuilt when
    the TLS files change: new calls use the new channel at once, calls in flight finish on
    the old one, which is closed when they have (at most `DRAIN_SECONDS`)."""

    def __init__(self, target: str, max_message_bytes: int, tls: UpstreamTls | None = None) -> None:
        self.target = target
        self.tls = tls
        self._options = channel_options(max_message_bytes)
        #: The current channel: every new call reads it, so a swap applies to the next call.
        self.channel = self._new_channel()
        self.errors_total = 0
        self._draining: set[asyncio.Task[None]] = set()
        self._old_channels: set[grpc.aio.Channel] = set()

    def _new_channel(self) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=self._options)
        return grpc.aio.secure_channel(
            self.target,
            self.tls.channel_credentials(),
            options=[*self._options, *self.tls.channel_options()],
        )

    def start(self) -> None:
        """Follow the TLS files (needs a running event loop); without TLS files, nothing."""
        if self.tls is not None:
            self.tls.watch(self._tls_files_changed)

    async def _tls_files_changed(self, _why: str) -> None:
        if self.tls is not None and self.tls.changed():
            self.swap_channel()

    def swap_channel(self) -> None:
        """Build a channel from the current TLS files and use it for new calls; the old
        one is closed once its calls are done."""
        old, self.channel = self.channel, self._new_channel()
        log.info("upstream %s: new channel with the reloaded TLS files", self.target)
        self._old_channels.add(old)
        task = asyncio.create_task(self._drain(old))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain(self, old: grpc.aio.Channel) -> None:
        await old.close(DRAIN_SECONDS)  # waits for its calls, then closes
        self._old_channels.discard(old)  # (when cancelled, `close` closes it)
        log.info("upstream %s: the channel replaced after a TLS reload is closed", self.target)

    async def close(self) -> None:
        if self.tls is not None:
            await self.tls.stop()
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)
        for old in list(self._old_channels):  # interrupted drains: close them now
            await old.close()
        self._old_channels.clear()
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
        except (grpc.aio.AbortError, asyncio.CancelledError, Ended):
            raise
        except Exception as error:  # e.g. the gRPC core refusing to send: never hang the client
            await self.relay_failure(error, context)
            raise
        finally:
            if not call.done():
                call.cancel()

    async def ready(self, timeout: float) -> bool:
        """Whether the backend's channel connects within `timeout` (readiness)."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            return False
        return True

    async def stream(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        metadata: Metadata,
        context: grpc.aio.ServicerContext,
        progress: Progress | None = None,
    ) -> None:
        """Relay a call of any kind as a stream; `progress` is told how far it got and may
        end it before a response message (raising `Ended`)."""
        call = self.channel.stream_stream(method)(
            metadata=metadata, timeout=context.time_remaining()
        )
        pump = asyncio.create_task(_pump(requests, call, progress))
        headers_sent = False
        try:
            initial = await call.initial_metadata()
            if initial:
                await _complete(context.send_initial_metadata(initial))
                headers_sent = True
            async for response in call:
                if progress is not None and not progress.may_respond():
                    raise Ended
                await _complete(context.write(response))
                if progress is not None:
                    progress.responded()
            trailing = await call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(trailing)
        except grpc.aio.AioRpcError as error:
            await self.relay_error(error, context, headers_sent)
        except (grpc.aio.AbortError, asyncio.CancelledError, Ended):
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
        """End the client's call with the backend's status, details, headers and trailers.

        CANCELLED becomes UNAVAILABLE: the client did not cancel (that ends the relay
        before it gets here), so the backend's side did: grpc core drops calls a busy
        server has queued too long or holds when it stops (grpc/grpc#41785), or the
        channel closed. Clients retry UNAVAILABLE; CANCELLED they would not."""
        initial = error.initial_metadata()
        if initial and not headers_sent:
            await context.send_initial_metadata(initial)
        code = error.code()
        details = error.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and _is_connect_failure(details):
            self.errors_total += 1
            log.warning("upstream %s unavailable: %s", self.target, details)
            details = f"upstream {self.target} is unavailable: {details}"
        elif code == grpc.StatusCode.CANCELLED:
            self.errors_total += 1  # counted; not logged one by one (a burst makes many)
            log.debug("upstream %s cancelled a call: %s", self.target, details)
            code = grpc.StatusCode.UNAVAILABLE
            details = (
                f"upstream {self.target} cancelled the call (overloaded or stopping): {details}"
            )
        await context.abort(code, details, trailing_metadata=tuple(error.trailing_metadata() or ()))

    async def relay_failure(self, error: Exception, context: grpc.aio.ServicerContext) -> None:
        self.errors_total += 1
        log.error("relaying to upstream %s failed: %r", self.target, error)
        await context.abort(grpc.StatusCode.INTERNAL, "the proxy could not relay this call")


async def _complete(operation: Awaitable[None]) -> None:
    """Send to the client, finishing the send even when the handler is cancelled meanwhile
    (the stream guard ending the stream): the cancellation is raised once the send is
    done, so the deny that follows is the call's only pending operation (gRPC refuses a
    second send batch while one is in flight, and the call would hang)."""
    send = asyncio.ensure_future(operation)
    try:
        await asyncio.shield(send)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await send
        raise


async def _pump(
    requests: AsyncIterator[bytes], call: grpc.aio.StreamStreamCall, progress: Progress | None
) -> None:
    """Copy client messages to the backend, then half-close."""
    try:
        async for message in requests:
            await call.write(message)
        await call.done_writing()
        if progress is not None:
            progress.requests_done()
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        pass  # the backend ended the call; the response side reports its status


def _is_connect_failure(details: str) -> bool:
    lowered = details.lower()
    return any(marker in lowered for marker in _CONNECT_FAILURES)
