"""Many gRPC calls on one raw HTTP/2 connection, frame by frame (hyperframe + hpack).

For tests that must see exactly what the server sends: its SETTINGS, each stream's
RST_STREAM code or grpc-status, and the GOAWAY, after which it keeps reading (a graceful
GOAWAY leaves the open streams running; the `h2` library would close the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
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

from tests.support.h2client import grpc_frame, grpc_request_headers

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_CONCURRENT_STREAMS = SettingsFrame.MAX_CONCURRENT_STREAMS
PROTOCOL_ERROR = 0x1
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
        self.ack_settings = True

    @classmethod
    async def open(
        cls, port: int, timeout: float = 10.0, ack_settings: bool = True
    ) -> RawConnection:
        """Connected, with the server's SETTINGS received and (unless `ack_settings` is
        false: a client that has not caught up yet) acknowledged."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        conn = cls(port, reader, writer)
        conn.ack_settings = ack_settings
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
            if self.ack_settings:
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


# --- abuse: floods, resets, endless header blocks -----------------------------------------

PING, SETTINGS_TYPE, ACK = 0x6, 0x4, 0x1
ENABLE_PUSH = SettingsFrame.ENABLE_PUSH
#: The peer's SETTINGS_MAX_FRAME_SIZE until it says otherwise (RFC 9113 6.5.2).
DEFAULT_MAX_FRAME_SIZE = 16_384


def never_indexed(fields: list[tuple[bytes, bytes]]) -> list[NeverIndexedHeaderTuple]:
    """Fields HPACK sends as literals that never enter the dynamic table: a header block
    the server drops half-way leaves both sides' tables in step."""
    return [NeverIndexedHeaderTuple(k, v) for k, v in fields]


class AbuseConnection(RawConnection):
    """A `RawConnection` for abuse: its reader buffers what it reads (so it can be
    cancelled at any point without losing a frame, and runs as a background task while the
    test writes), counts every frame by type, and skips the thousands of PING and SETTINGS
    acknowledgements of a flood without parsing them one by one."""

    def __init__(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        super().__init__(port, reader, writer)
        self.received: Counter[str] = Counter()  # frames read, by frame class name
        self.ping_acks = 0
        self.settings_acks = 0
        self.acked_pings: set[bytes] = set()  # opaque data of PING ACKs, but flood ones
        self._buffer = bytearray()
        self._pos = 0
        self._settles = 0

    # reading

    async def _read_until(self, done) -> None:
        while not done() and not self.closed:
            if self._parse_one():
                continue
            try:
                chunk = await self.reader.read(1 << 20)
            except ConnectionError:
                chunk = b""
            if not chunk:
                self.closed = True
                return
            if self._pos:
                del self._buffer[: self._pos]
                self._pos = 0
            self._buffer += chunk
            await self._drain()

    def _parse_one(self) -> bool:
        """Take one whole frame from the buffer, if there is one."""
        buf, pos = self._buffer, self._pos
        if len(buf) - pos < 9:
            return False
        length = int.from_bytes(buf[pos : pos + 3], "big")
        end = pos + 9 + length
        if len(buf) < end:
            return False
        kind, flags = buf[pos + 3], buf[pos + 4]
        if kind == PING and flags & ACK:
            self.received["PingFrame"] += 1
            self.ping_acks += 1
            self._pongs += 1
            opaque = bytes(buf[pos + 9 : end])
            if not opaque.startswith(b"flood"):
                self.acked_pings.add(opaque)
        elif kind == SETTINGS_TYPE and flags & ACK:
            self.received["SettingsFrame"] += 1
            self.settings_acks += 1
        else:
            frame, _ = Frame.parse_frame_header(memoryview(bytes(buf[pos : pos + 9])))
            frame.parse_body(memoryview(bytes(buf[pos + 9 : end])))
            self.received[type(frame).__name__] += 1
            self._on(frame)
        self._pos = end
        return True

    async def _drain(self) -> bool:
        """Flush what was written; False once the connection is gone."""
        try:
            await self.writer.drain()
        except ConnectionError:
            self.closed = True
        return not self.closed

    # writing

    def register(self, count: int = 1) -> list[int]:
        """Reserve `count` client stream ids (each known to the reader from now on)."""
        ids = list(range(self._next_id, self._next_id + 2 * count, 2))
        self._next_id += 2 * count
        for stream_id in ids:
            self.streams[stream_id] = Stream()
        return ids

    def request_block(self, path: str, extra: list[tuple[bytes, bytes]] = ()) -> bytes:
        """The HPACK block of a gRPC request's fields (never indexed, see `never_indexed`)."""
        return self.encoder.encode(
            never_indexed(grpc_request_headers(self.port, path) + list(extra)), huffman=False
        )

    def opened_and_reset(self, path: str, count: int) -> bytes:
        """`count` complete unary requests (HEADERS, DATA with END_STREAM), each followed at
        once by RST_STREAM CANCEL: the frames of a rapid reset."""
        out = bytearray()
        for stream_id in self.register(count):
            block = self.request_block(path, [(b"x-abuse", b"rapid-reset")])
            out += HeadersFrame(stream_id, block, flags=["END_HEADERS"]).serialize()
            out += DataFrame(stream_id, grpc_frame(b"{}"), flags=["END_STREAM"]).serialize()
            out += RstStreamFrame(stream_id, error_code=CANCEL).serialize()
        return bytes(out)

    async def write_chunk(self, data: bytes, drain_timeout: float) -> bool:
        """Write and drain; False when the server has closed the connection or stopped
        reading (the drain still blocked after `drain_timeout` seconds)."""
        if self.closed or self.writer.is_closing():
            self.closed = True
            return False
        self.writer.write(data)
        try:
            return await asyncio.wait_for(self._drain(), drain_timeout)
        except TimeoutError:
            return False

    @contextlib.asynccontextmanager
    async def reading(self):
        """Read (and answer) the server's frames in the background meanwhile."""
        task = asyncio.create_task(self._read_until(lambda: False))
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def settle(self, timeout: float) -> None:
        """Read until a PING of ours is acknowledged or the connection closes (all frames
        sent before are then processed)."""
        self._settles += 1
        opaque = b"settle" + (self._settles % 65536).to_bytes(2, "big")
        if not self.closed and not self.writer.is_closing():
            self.writer.write(PingFrame(0, opaque).serialize())
            await self._drain()
        await self.read_until(lambda: opaque in self.acked_pings, timeout)

    @property
    def gone(self) -> bool:
        """The server closed the connection or said GOAWAY."""
        return self.closed or self.goaway is not None


def header_block_frames(stream_id: int, block: bytes, end_stream: bool = False) -> list[bytes]:
    """A header block as HEADERS plus CONTINUATION frames of at most the default frame size,
    the last with END_HEADERS."""
    size = DEFAULT_MAX_FRAME_SIZE
    pieces = [block[i : i + size] for i in range(0, len(block), size)] or [b""]
    first = HeadersFrame(stream_id, pieces[0], flags=["END_STREAM"] if end_stream else [])
    frames = [first] + [ContinuationFrame(stream_id, piece) for piece in pieces[1:]]
    frames[-1].flags.add("END_HEADERS")
    return [frame.serialize() for frame in frames]


def literal_field(encoder: Encoder, name: bytes, size: int) -> bytes:
    """One never-indexed literal header field of about `size` bytes, HPACK-encoded."""
    return encoder.encode([NeverIndexedHeaderTuple(name, b"a" * size)], huffman=False)


async def read_to_eof(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as
    closed); TimeoutError if it is still open after `timeout` seconds."""

    async def read() -> bytes:
        data = bytearray()
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                return bytes(data)
            if not chunk:
                return bytes(data)
            data += chunk

    return await asyncio.wait_for(read(), timeout)


def parse_frames(data: bytes) -> list[Frame]:
    """The whole HTTP/2 frames in `data` (AssertionError on a partial or malformed one)."""
    frames, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= 9, f"a partial frame header: {data[pos:]!r}"
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        assert len(data) - pos - 9 >= length, "a partial frame body"
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        frames.append(frame)
        pos += 9 + length
    return frames
