"""A minimal raw HTTP/2 gRPC client (the `h2` library over an asyncio socket).

The grpc client library validates metadata before sending (lowercase names, printable
values), so requests that break those rules are built here by hand: HEADERS with exactly
the fields given, in the given case, then one DATA frame carrying a gRPC message.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
from hpack import HeaderTuple


def grpc_request_headers(port: int, path: str = "/test.Access/Report") -> list[tuple[bytes, bytes]]:
    """The fields every gRPC request carries; callers append their own."""
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", f"127.0.0.1:{port}".encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


def grpc_frame(message: bytes) -> bytes:
    """The 5-byte gRPC length prefix (uncompressed) followed by the message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass
class H2Response:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytes = b""
    reset_code: int | None = None  # RST_STREAM error code, if the stream was reset
    goaway_code: int | None = None  # GOAWAY error code, if the connection was closed
    ended: bool = False  # END_STREAM seen

    def get(self, name: bytes) -> bytes | None:
        """The first value of a response header or trailer field."""
        for k, v in [*self.headers, *self.trailers]:
            if k == name:
                return v
        return None

    @property
    def grpc_status(self) -> int | None:
        value = self.get(b"grpc-status")
        return None if value is None else int(value)


async def h2_call(
    port: int,
    headers: list[tuple[bytes, bytes]],
    message: bytes = b"{}",
    timeout: float = 5.0,
) -> H2Response:
    """One gRPC request on a fresh connection; the response headers, trailers and data.

    Outbound validation and normalisation are off, so the fields go out exactly as given
    (uppercase names, control characters, repeats)."""
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
    )
    return await h2_exchange(port, config, headers, [grpc_frame(message)], timeout)


async def h2_exchange(
    port: int,
    config: h2.config.H2Configuration,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    timeout: float,
) -> H2Response:
    """One request on a fresh connection: `headers`, then each of `chunks` as DATA (split
    at the peer's frame size; all within one flow-control window, written at once; the
    last ends the stream); the response's headers, trailers and data."""
    conn = h2.connection.H2Connection(config=config)
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    response = H2Response()
    try:
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [HeaderTuple(k, v) for k, v in headers])
        size = conn.max_outbound_frame_size
        total = sum(map(len, chunks))
        assert total <= conn.local_flow_control_window(stream_id), "a body within one window"
        frames = [c[at : at + size] for c in chunks for at in range(0, len(c), size)] or [b""]
        for index, frame in enumerate(frames):
            conn.send_data(stream_id, frame, end_stream=index == len(frames) - 1)
        writer.write(conn.data_to_send())
        await asyncio.wait_for(read_response(conn, reader, writer, stream_id, response), timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    return response


async def read_response(conn, reader, writer, stream_id: int, response: H2Response) -> None:
    """Read `stream_id`'s response into `response` until the stream ends or is reset."""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return
        for event in conn.receive_data(chunk):
            if isinstance(event, h2.events.ResponseReceived):
                response.headers.extend(event.headers)
            elif isinstance(event, h2.events.TrailersReceived):
                response.trailers.extend(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                response.data += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                response.reset_code = int(event.error_code)
                return
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                response.ended = True
                writer.write(conn.data_to_send())
                return
            elif isinstance(event, h2.events.ConnectionTerminated):
                response.goaway_code = int(event.error_code)
                return
        writer.write(conn.data_to_send())
        await writer.drain()
