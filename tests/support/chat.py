"""`Chat`: one open bidi stream through the sidecar, as a client holds it: say something
and hear it back, half-close, or wait for the proxy to end it (and see why)."""

from __future__ import annotations

import asyncio
import time

import grpc

from tests.support.running_proxy import error_info
from tests.support.tokens import bearer


class Chat:
    """One open bidi stream through the proxy: say something, hear it back."""

    def __init__(self, channel: grpc.aio.Channel, method: str, token: str | None) -> None:
        md = bearer(token) if token else ()
        self.call = channel.stream_stream(method)(metadata=md, timeout=30)

    async def roundtrip(self, text: bytes = b"hi") -> bytes:
        await self.call.write(text)
        return await self.call.read()

    async def finish(self) -> grpc.StatusCode:
        """Half-close and wait for the status."""
        await self.call.done_writing()
        return await self.call.code()

    async def ended(self, within: float) -> tuple[grpc.StatusCode, str | None, float]:
        """(status, ErrorInfo reason, when) once the proxy ends the stream."""
        try:
            async with asyncio.timeout(within):
                while True:
                    message = await self.call.read()
                    if message is grpc.aio.EOF:
                        break
        except grpc.aio.AioRpcError as e:
            info = error_info(e)
            return e.code(), info.reason if info is not None else None, time.time()
        except TimeoutError:
            return grpc.StatusCode.OK, "still open", time.time()
        return await self.call.code(), None, time.time()
