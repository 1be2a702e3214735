"""Many gRPC calls on one raw HTTP/2 connection, frame by frame (hyperframe + hpack).

For tests that must see exactly what the server sends: its SETTINGS, each stream's
RST_STREAM code or grpc-status, and the GOAWAY, after which it keeps reading (a graceful
GOAWAY leaves the open streams running; the `h2` library would close the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.security.h2client import grpc_frame, grpc_request_headers

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_CONCURRENT_STREAMS = SettingsFrame.MAX_CONCURRENT_STREAMS
REFUSED_STREAM, CANCEL = 7, 8


@dataclass
class Stream:
    fields: dict[str, str] = field(default_factory=dict)  # response headers and trailers
    reset: int | None = None  # RST_STREAM error code
    ended: bool = False

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    @property
    def outcome(self) -> tuple[str, int | None]:
        """("status", grpc-status), ("reset", code) or ("open", None). A reset after the
        trailers (grpc core sends RST_STREAM NO_ERROR after some) changes nothing."""
        if self.ended:
            status = self.fields.get("grpc-status")
            return "status", None if status is None else int(status)
        if self.reset is not None:
            return "reset", self.reset
        return "open", None


class RawConnection:
    """A client connection: `open`, `call` (any number), `ping`, then `read_until`."""

    def __init__(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.port, self.reader, self.writer = port, reader, writer
        self.encoder, self.decoder = Encoder(), Decoder()
        self.settings: dict[int, int] = {}  # the server's first SETTINGS
        self.streams: dict[int, Stream] = {}
        self.goaway: GoAwayFrame | None = None
        self.closed = False
        self._next_id = 1
        self._pongs = 0
        self._block: tuple[int, bytes, bool] | None = None  # a header block in CONTINUATIONs

    @classmethod
    async def open(cls, port: int, timeout: float = 10.0) -> RawConnection:
        """Connected, with the server's SETTINGS received and acknowledged."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        conn = cls(port, reader, writer)
        writer.write(PREFACE + SettingsFrame(0).serialize())
        await conn.read_until(lambda: bool(conn.settings), timeout)
        return conn

    def call(self, path: str, extra: list[tuple[bytes, bytes]] = (), message: bytes = b"{}") -> int:
        """Send one unary gRPC request (HEADERS, then DATA with END_STREAM); its stream id."""
        stream_id, self._next_id = self._next_id, self._next_id + 2
        block = self.encoder.encode(grpc_request_headers(self.port, path) + list(extra))
        headers = HeadersFrame(stream_id, block, flags=["END_HEADERS"])
        data = DataFrame(stream_id, grpc_frame(message), flags=["END_STREAM"])
        self.writer.write(headers.serialize() + data.serialize())
        self.streams[stream_id] = Stream()
        return stream_id

    async def ping(self, timeout: float = 10.0) -> None:
        """A PING round trip: the server has read every frame sent before it."""
        pongs = self._pongs
        self.writer.write(PingFrame(0, b"authprxy").serialize())
        await self.read_until(lambda: self._pongs > pongs, timeout)

    async def read_until(self, done, timeout: float) -> None:
        """Read frames until `done()` or the connection closes (TimeoutError after
        `timeout` seconds)."""
        await asyncio.wait_for(self._read_until(done), timeout)

    async def _read_until(self, done) -> None:
        while not done() and not self.closed:
            try:
                header = await self.reader.readexactly(9)
                frame, length = Frame.parse_frame_header(header)
                frame.parse_body(memoryview(await self.reader.readexactly(length)))
                self._on(frame)
                await self.writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                self.closed = True
                return

    def _on(self, frame: Frame) -> None:
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            self.settings = self.settings or dict(frame.settings)
            self.writer.write(SettingsFrame(0, flags=["ACK"]).serialize())
        elif isinstance(frame, PingFrame):
            if "ACK" in frame.flags:
                self._pongs += 1
            else:
                self.writer.write(PingFrame(0, frame.opaque_data, flags=["ACK"]).serialize())
        elif isinstance(frame, (HeadersFrame, ContinuationFrame)):
            self._on_header_block(frame)
        elif isinstance(frame, DataFrame) and frame.flow_controlled_length:
            self.writer.write(WindowUpdateFrame(0, frame.flow_controlled_length).serialize())
            if "END_STREAM" not in frame.flags:
                update = WindowUpdateFrame(frame.stream_id, frame.flow_controlled_length)
                self.writer.write(update.serialize())
        elif isinstance(frame, RstStreamFrame) and frame.stream_id in self.streams:
            self.streams[frame.stream_id].reset = frame.error_code
        elif isinstance(frame, GoAwayFrame):
            self.goaway = frame
        if isinstance(frame, DataFrame) and "END_STREAM" in frame.flags:
            self.streams[frame.stream_id].ended = True

    def _on_header_block(self, frame: HeadersFrame | ContinuationFrame) -> None:
        if isinstance(frame, HeadersFrame):
            self._block = (frame.stream_id, frame.data, "END_STREAM" in frame.flags)
        else:
            assert self._block is not None
            stream_id, data, end = self._block
            self._block = (stream_id, data + frame.data, end)
        if "END_HEADERS" not in frame.flags:
            return
        stream_id, data, end = self._block  # type: ignore[misc]
        self._block = None
        decoded = self.decoder.decode(data)  # always: the HPACK table is per connection
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.fields.update({str(k): str(v) for k, v in decoded})
            stream.ended = stream.ended or end

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)
