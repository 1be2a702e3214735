"""The HTTP/2 client side of `h2gen`: frames, literal HPACK header blocks, pre-encoded
requests whose bytes differ only in their stream id, and `Conn`, one non-blocking
connection that honours flow control both ways and acknowledges PINGs and SETTINGS.
A mode (`h2gen.Unary`, `Bidi`, `Hold`) receives each connection's events through
`data`, `end`, `reset` and `window`.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import select
import socket
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM = ACK = 0x1
END_HEADERS, PADDED = 0x4, 0x8
BIG_WINDOW = 2**31 - 1


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + sid.to_bytes(4, "big") + payload


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes((value,))
    out, value = [top], value - top
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes((*out, value))


def _hpack_string(text: str) -> bytes:
    raw = text.encode()
    return _hpack_int(len(raw), 7) + raw  # no Huffman coding


def header_block(path: str, authority: str, extra: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, new names (RFC 7541 6.2.2)."""
    fields = [
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
        ("content-type", "application/grpc"), ("te", "trailers"), *extra,
    ]  # fmt: skip
    return b"".join(b"\x00" + _hpack_string(n) + _hpack_string(v) for n, v in fields)


CLIENT_SETTINGS = frame(
    SETTINGS, 0, 0, (2).to_bytes(2, "big") + (0).to_bytes(4, "big")  # ENABLE_PUSH 0
    + (4).to_bytes(2, "big") + BIG_WINDOW.to_bytes(4, "big"),  # INITIAL_WINDOW_SIZE
)  # fmt: skip
OPENING = PREFACE + CLIENT_SETTINGS + frame(WINDOW_UPDATE, 0, 0, (BIG_WINDOW - 65535).to_bytes(4))


class Request:
    """The bytes of one request, stream id patched in."""

    def __init__(self, block: bytes, body: bytes) -> None:
        if len(block) > 16384:
            raise SystemExit("h2gen: the header block exceeds one frame")
        self.body_len = len(body)
        self._headers = frame(HEADERS, END_HEADERS, 0, block)
        self._unary = bytearray(self._headers + frame(DATA, END_STREAM, 0, body))
        self._open = bytearray(self._headers + frame(DATA, 0, 0, body))
        self._message = bytearray(frame(DATA, 0, 0, body))
        self._data_sid = len(self._headers) + 5

    def unary(self, sid: int) -> bytes:
        return self._patch(self._unary, sid, self._data_sid)

    def open(self, sid: int) -> bytes:
        return self._patch(self._open, sid, self._data_sid)

    def message(self, sid: int) -> bytes:
        return self._patch(self._message, sid)

    @staticmethod
    def _patch(template: bytearray, sid: int, second: int | None = None) -> bytes:
        raw = sid.to_bytes(4, "big")
        template[5:9] = raw
        if second is not None:
            template[second : second + 4] = raw
        return bytes(template)


class Conn:
    """One client connection: non-blocking socket, frame parsing, flow control."""

    def __init__(self, port: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock = sock
        self.rbuf = b""
        self.wbuf = bytearray()
        self.max_streams = 2**31  # until the server's SETTINGS say otherwise
        self.peer_window = 65535  # the server's initial stream window
        self.window = 65535  # our connection send window
        self.streams: dict = {}
        self.next_sid = 1
        self.settings = False  # the server's SETTINGS received
        self.acked = False  # ours acknowledged
        self.unacked = 0  # DATA bytes received since our last WINDOW_UPDATE
        self.write(OPENING)

    def new_sid(self) -> int:
        sid = self.next_sid
        self.next_sid += 2
        return sid

    def write(self, data: bytes) -> None:
        if self.wbuf:
            self.wbuf += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.wbuf += data[sent:]

    def flush(self) -> None:
        try:
            sent = self.sock.send(self.wbuf)
        except BlockingIOError:
            return
        del self.wbuf[:sent]

    def read(self, mode) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("the server closed the connection")
        buf = self.rbuf + data if self.rbuf else data
        pos, size = 0, len(buf)
        while size - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            end = pos + 9 + length
            if end > size:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            if kind == DATA:
                self.unacked += length
                n = length - 1 - buf[pos + 9] if flags & PADDED else length
                mode.data(self, sid, n, flags & END_STREAM)
            elif kind == HEADERS:
                if flags & END_STREAM:
                    mode.end(self, sid)
            elif kind == RST_STREAM:
                mode.reset(self, sid, int.from_bytes(buf[pos + 9 : pos + 13], "big"))
            elif kind == SETTINGS:
                if flags & ACK:
                    self.acked = True
                else:
                    self._settings(buf[pos + 9 : end], mode)
            elif kind == PING:
                if not flags & ACK:
                    self.write(frame(PING, ACK, 0, buf[pos + 9 : end]))
            elif kind == GOAWAY:
                code = int.from_bytes(buf[pos + 13 : pos + 17], "big")
                raise ConnectionError(f"GOAWAY {code}: {buf[pos + 17 : end]!r}")
            elif kind == WINDOW_UPDATE:
                inc = int.from_bytes(buf[pos + 9 : pos + 13], "big") & 0x7FFFFFFF
                if sid == 0:
                    self.window += inc
                mode.window(self, sid, inc)
            pos = end
        self.rbuf = buf[pos:]
        if self.unacked >= 1 << 24:
            self.write(frame(WINDOW_UPDATE, 0, 0, self.unacked.to_bytes(4, "big")))
            self.unacked = 0

    def _settings(self, payload: bytes, mode) -> None:
        for i in range(0, len(payload) - 5, 6):
            ident = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if ident == 3:
                self.max_streams = value
            elif ident == 4:
                mode.window(self, -1, value - self.peer_window)  # every open stream
                self.peer_window = value
        self.settings = True
        self.write(frame(SETTINGS, ACK, 0))


class Ignore:
    """Frame callbacks while connecting."""

    def data(self, conn, sid, n, end):
        pass

    def end(self, conn, sid):
        pass

    def reset(self, conn, sid, code):
        pass

    def window(self, conn, sid, inc):
        pass


def precise_timers() -> None:
    """Timer slack 1 ns (PR_SET_TIMERSLACK): select() wakes when asked, not 50 µs late."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def connect(port: int, count: int, timeout: float = 30.0) -> list[Conn]:
    """`count` connections, each past the preface and the SETTINGS exchange."""
    conns = [Conn(port) for _ in range(count)]
    ignore = Ignore()
    poller = select.epoll()
    by_fd = {c.sock.fileno(): c for c in conns}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    waiting = set(by_fd)
    deadline = time.monotonic() + timeout
    while waiting:
        if time.monotonic() > deadline:
            raise SystemExit(f"h2gen: {len(waiting)} of {count} connections got no SETTINGS")
        for c in conns:
            if c.wbuf:
                c.flush()
        for fd, _ in poller.poll(0.1):
            conn = by_fd[fd]
            conn.read(ignore)
            if conn.settings and conn.acked:
                waiting.discard(fd)
    poller.close()
    return conns
