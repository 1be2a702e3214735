"""`ResettingBackend`: a bare HTTP/2 server (hyperframe + hpack) standing in for a gRPC
backend that answers every request with headers and one message, then resets the stream
instead of sending trailers."""

from __future__ import annotations

import asyncio
import contextlib

from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.support.h2_streams import CANCEL, PREFACE
from tests.support.h2client import grpc_frame


class ResettingBackend:
    """A bare HTTP/2 server standing in for a gRPC backend: every request gets response
    headers and one gRPC message `first`, then RST_STREAM with `code` (no trailers), as a
    backend whose side cancels or fails a stream does. `requests` counts the requests."""

    def __init__(self, code: int = CANCEL) -> None:
        self.code = code
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> ResettingBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        encoder, decoder = Encoder(), Decoder()
        try:
            assert await reader.readexactly(len(PREFACE)) == PREFACE
            writer.write(SettingsFrame(0).serialize())
            block: bytes | None = None
            while True:
                header = await reader.readexactly(9)
                frame, length = Frame.parse_frame_header(header)
                frame.parse_body(memoryview(await reader.readexactly(length)))
                if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                    writer.write(SettingsFrame(0, flags=["ACK"]).serialize())
                elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
                    writer.write(PingFrame(0, frame.opaque_data, flags=["ACK"]).serialize())
                elif isinstance(frame, (HeadersFrame, ContinuationFrame)):
                    block = (block or b"") + frame.data
                    if "END_HEADERS" in frame.flags:
                        decoder.decode(block)
                        block = None
                        self.requests += 1
                        self._respond(frame.stream_id, encoder, writer)
                elif isinstance(frame, DataFrame) and frame.flow_controlled_length:
                    writer.write(WindowUpdateFrame(0, frame.flow_controlled_length).serialize())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, AssertionError):
            pass
        finally:
            writer.close()

    def _respond(self, stream_id: int, encoder: Encoder, writer: asyncio.StreamWriter) -> None:
        fields = [(b":status", b"200"), (b"content-type", b"application/grpc")]
        writer.write(
            HeadersFrame(stream_id, encoder.encode(fields), flags=["END_HEADERS"]).serialize()
            + DataFrame(stream_id, grpc_frame(b"first")).serialize()
            + RstStreamFrame(stream_id, error_code=self.code).serialize()
        )
