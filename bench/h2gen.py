"""A small gRPC load generator on raw HTTP/2 sockets, one process per run, so its CPU
stays out of the servers' and out of the benchmark's event loop:

    python -m bench.h2gen unary --port P --path M --body FILE [--header 'k: v']...
        --rate R --seconds S [--warm W] [--connections C]
    python -m bench.h2gen bidi --port P --path M --body FILE [--header 'k: v']...
        --streams N [--connections C] --seconds S [--warm W]
    python -m bench.h2gen hold --port P --path M --body FILE [--header 'k: v']...
        --connections C

`--body` is one gRPC length-prefixed message (a unary call's whole body, or one bidi
message). Requests carry `:method POST`, `content-type: application/grpc`,
`te: trailers` and the `--header`s, as literal HPACK fields that never touch the
server's dynamic table, so every request is the same bytes but its stream id.

- `unary`: open loop, evenly spaced. Call i is due at t0 + i/R whatever the answers do,
  and goes out on connection i mod C (or the next one with a free stream). The process
  waits in `select()` (microsecond timeouts; timer slack set to 1 ns) until the next
  call is due, so departures are spaced 1/R apart, not released in bursts by a
  millisecond timer (h2load's `--rps` fires every client's timer together, at most
  every 10 ms; its timing scripts re-arm every client's timer from the same loop time,
  so clients that once fire together stay together). A call counts as answered when its
  stream ends after at least one whole response message (5 bytes or more of DATA): a
  gRPC error without a message is trailers-only, so it counts as failed. The first
  `--warm` seconds are sent but not reported. The result holds, for the reported calls,
  each departure (µs after t0, taken just before `send()`), each answered call's latency
  (departure to the read that ended its stream), the time from the first reported
  departure to the last answer (`answered_seconds`), how many were late (sent over 1 ms
  after their due time: every connection was at the server's stream limit), failed or
  unanswered, and this process's CPU µs per call.
- `bidi`: N streams spread over C connections, each ping-ponging: one message out, its
  echo back, the next message out. Prints `start` when the warm-up ends and `stop` S
  seconds later (the caller reads the servers' CPU time at these lines); the result is
  the echoes between the two and this process's CPU per echo.
- `hold` (for memory): C connections that complete the connection preface and the
  SETTINGS exchange (the server's SETTINGS received, ours acknowledged), then prints
  `idle C`. On a stdin line `streams N` it opens N bidi streams packed into those
  connections (up to the server's SETTINGS_MAX_CONCURRENT_STREAMS, at most 100 each),
  each sending one message and reading its echo, then prints `streams N`; the streams
  stay open. Exits when stdin closes.

The last stdout line is `result <json>`. Flow control is honoured both ways (the
server's connection and stream windows; ours are opened to 2^31-1 and topped up),
PINGs and SETTINGS are acknowledged, a GOAWAY or a reset stream in `bidi`/`hold` is an
error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import resource
import select
import socket
import sys
import time
from pathlib import Path

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM = ACK = 0x1
END_HEADERS, PADDED = 0x4, 0x8
BIG_WINDOW = 2**31 - 1
#: A late call: sent this long after it was due.
LATE_S = 0.001
#: Most streams `hold` opens on one connection.
HOLD_STREAMS_PER_CONNECTION = 100


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


class _Ignore:
    """Frame callbacks while connecting."""

    def data(self, conn, sid, n, end):
        pass

    def end(self, conn, sid):
        pass

    def reset(self, conn, sid, code):
        pass

    def window(self, conn, sid, inc):
        pass


def _precise_timers() -> None:
    """Timer slack 1 ns (PR_SET_TIMERSLACK): select() wakes when asked, not 50 µs late."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def connect(port: int, count: int, timeout: float = 30.0) -> list[Conn]:
    """`count` connections, each past the preface and the SETTINGS exchange."""
    conns = [Conn(port) for _ in range(count)]
    ignore = _Ignore()
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


class Unary:
    """Open-loop unary calls, evenly spaced."""

    def __init__(self, conns: list[Conn], request: Request, rate: float, seconds: float,
                 warm: float) -> None:  # fmt: skip
        self.conns = conns
        self.request = request
        self.interval = 1.0 / rate
        self.total = round((warm + seconds) * rate)
        self.first = round(warm * rate)
        self.sent_at = [0.0] * self.total
        self.done_at = [0.0] * self.total
        self.got = [0] * self.total
        self.state = bytearray(self.total)  # 0 waiting, 1 answered, 2 failed
        self.pending = 0
        self.now = 0.0

    def data(self, conn, sid, n, end):
        i = conn.streams.get(sid)
        if i is not None:
            self.got[i] += n
            if end:
                self.end(conn, sid)

    def end(self, conn, sid):
        i = conn.streams.pop(sid, None)
        if i is not None:
            self.done_at[i] = self.now
            self.state[i] = 1 if self.got[i] >= 5 else 2
            self.pending -= 1

    def reset(self, conn, sid, code):
        i = conn.streams.pop(sid, None)
        if i is not None:
            self.state[i] = 2
            self.pending -= 1

    def window(self, conn, sid, inc):
        pass  # one message per stream, within the server's initial window (checked)

    def _send(self, i: int) -> bool:
        size = self.request.body_len
        count = len(self.conns)
        for k in range(count):
            conn = self.conns[(i + k) % count]
            if len(conn.streams) < conn.max_streams and conn.window >= size:
                sid = conn.new_sid()
                conn.streams[sid] = i
                conn.window -= size
                data = self.request.unary(sid)
                self.sent_at[i] = time.perf_counter()
                conn.write(data)
                self.pending += 1
                return True
        return False

    def run(self, drain: float) -> dict:
        if self.request.body_len > min(c.peer_window for c in self.conns):
            raise SystemExit("h2gen: the body exceeds the server's stream window")
        conns, by_sock = self.conns, {c.sock: c for c in self.conns}
        socks = list(by_sock)
        interval, total = self.interval, self.total
        perf = time.perf_counter
        t0 = perf() + 0.01
        cpu0 = _cpu()
        i = 0
        drain_until = None
        while True:
            now = perf()
            blocked = False
            while i < total and t0 + i * interval <= now:
                if not self._send(i):
                    blocked = True  # every connection at its stream limit: wait for answers
                    break
                i += 1
            if i >= total:
                if not self.pending:
                    break
                if drain_until is None:
                    drain_until = now + drain
                timeout = drain_until - now
                if timeout <= 0:
                    break
            elif blocked:
                timeout = 0.05
            else:
                timeout = max(0.0, t0 + i * interval - perf())
            writers = [c.sock for c in conns if c.wbuf]
            readable, writable, _ = select.select(socks, writers, (), timeout)
            if readable:
                self.now = perf()
                for sock in readable:
                    by_sock[sock].read(self)
            for sock in writable:
                by_sock[sock].flush()
        cpu = _cpu() - cpu0
        measured = range(self.first, i)
        answered = [j for j in measured if self.state[j] == 1]
        # From the first reported departure to the last answer: longer than the schedule
        # when the server fell behind and answered a backlog after the last call left.
        span = max(self.done_at[j] for j in answered) - self.sent_at[self.first] if answered else 0
        late = sum(1 for j in measured if self.sent_at[j] - (t0 + j * interval) > LATE_S)
        return {
            "offered": 1.0 / interval,
            "seconds": (total - self.first) * interval,
            "answered_seconds": max(span, (total - self.first) * interval),
            "sent": len(measured),
            "not_sent": total - i,
            "departures_us": [round((self.sent_at[j] - t0) * 1e6) for j in measured],
            "latency_us": [round((self.done_at[j] - self.sent_at[j]) * 1e6) for j in answered],
            "failed": sum(1 for j in measured if self.state[j] == 2),
            "unanswered": sum(1 for j in measured if self.state[j] == 0),
            "late": late,
            "cpu_us_per_call": cpu / max(1, i) * 1e6,
        }


class _Stream:
    __slots__ = ("got", "owed", "window")

    def __init__(self, window: int) -> None:
        self.got = 0
        self.owed = 0  # messages waiting for window
        self.window = window


class Bidi:
    """Ping-pong on many bidi streams: each echo sends the stream's next message."""

    def __init__(self, conns: list[Conn], request: Request, streams: int) -> None:
        self.conns = conns
        self.request = request
        self.size = request.body_len
        self.echoes = 0
        self.stopping = False
        for k in range(streams):
            conn = conns[k % len(conns)]
            if len(conn.streams) >= conn.max_streams:
                raise SystemExit("h2gen: more streams than the server allows")
            sid = conn.new_sid()
            conn.streams[sid] = _Stream(conn.peer_window)
            self._send(conn, sid, conn.streams[sid], first=True)

    def _send(self, conn: Conn, sid: int, st: _Stream, first: bool = False) -> None:
        if conn.window < self.size or st.window < self.size:
            st.owed += 1
            return
        conn.window -= self.size
        st.window -= self.size
        conn.write(self.request.open(sid) if first else self.request.message(sid))

    def data(self, conn, sid, n, end):
        st = conn.streams.get(sid)
        if st is None:
            return
        if end:
            self.end(conn, sid)
        st.got += n
        while st.got >= self.size:
            st.got -= self.size
            self.echoes += 1
            self._send(conn, sid, st)

    def end(self, conn, sid):
        if not self.stopping:
            raise SystemExit(f"h2gen: the server ended bidi stream {sid} (an error status?)")

    def reset(self, conn, sid, code):
        if not self.stopping:
            raise SystemExit(f"h2gen: the server reset bidi stream {sid} (code {code})")

    def window(self, conn, sid, inc):
        if sid == -1:
            for st in conn.streams.values():
                st.window += inc
        elif sid and sid in conn.streams:
            conn.streams[sid].window += inc
        for owed_sid, st in conn.streams.items():
            while st.owed and conn.window >= self.size and st.window >= self.size:
                st.owed -= 1
                self._send(conn, owed_sid, st)

    def run(self, warm: float, seconds: float) -> dict:
        by_sock = {c.sock: c for c in self.conns}
        socks = list(by_sock)
        perf = time.perf_counter
        marks = [perf() + warm, perf() + warm + seconds]
        counts: list[int] = []
        cpus: list[float] = []
        while marks:
            timeout = marks[0] - perf()
            if timeout <= 0:
                counts.append(self.echoes)
                cpus.append(_cpu())
                print("start" if len(counts) == 1 else "stop", flush=True)
                marks.pop(0)
                continue
            writers = [c.sock for c in self.conns if c.wbuf]
            readable, writable, _ = select.select(socks, writers, (), timeout)
            for sock in readable:
                by_sock[sock].read(self)
            for sock in writable:
                by_sock[sock].flush()
        self.stopping = True
        echoes = counts[1] - counts[0]
        return {
            "echoes": echoes,
            "seconds": seconds,
            "cpu_us_per_echo": (cpus[1] - cpus[0]) / max(1, echoes) * 1e6,
        }


class Hold:
    """Idle connections, then open streams, held until stdin closes."""

    def __init__(self, conns: list[Conn], request: Request) -> None:
        self.conns = conns
        self.request = request
        self.waiting = 0
        self.opened = 0

    def data(self, conn, sid, n, end):
        st = conn.streams.get(sid)
        if st is None:
            return
        if end:
            self.end(conn, sid)
        before = st.got
        st.got += n
        if before < self.request.body_len <= st.got:
            self.waiting -= 1
            if not self.waiting:
                print(f"streams {self.opened}", flush=True)

    def end(self, conn, sid):
        raise SystemExit(f"h2gen: the server ended held stream {sid} (an error status?)")

    def reset(self, conn, sid, code):
        raise SystemExit(f"h2gen: the server reset held stream {sid} (code {code})")

    def window(self, conn, sid, inc):
        pass  # one message per stream

    def open_streams(self, count: int) -> None:
        self.waiting += count
        self.opened += count
        left = count
        for conn in self.conns:
            room = min(conn.max_streams, HOLD_STREAMS_PER_CONNECTION) - len(conn.streams)
            for _ in range(max(0, min(room, left))):
                sid = conn.new_sid()
                conn.streams[sid] = _Stream(conn.peer_window)
                conn.write(self.request.open(sid))
                left -= 1
            if not left:
                return
        raise SystemExit(f"h2gen: no room for {left} more streams on {len(self.conns)} connections")

    def run(self) -> dict:
        poller = select.epoll()
        by_fd = {c.sock.fileno(): c for c in self.conns}
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        stdin = sys.stdin.fileno()
        poller.register(stdin, select.EPOLLIN)
        print(f"idle {len(self.conns)}", flush=True)
        while True:
            for c in self.conns:
                if c.wbuf:
                    c.flush()
            for fd, _ in poller.poll(0.05):
                if fd == stdin:
                    line = sys.stdin.readline()
                    if not line:
                        return {"connections": len(self.conns), "streams": self.opened}
                    self.open_streams(int(line.split()[1]))
                else:
                    by_fd[fd].read(self)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.h2gen", description=__doc__.split("\n")[0]
    )
    parser.add_argument("mode", choices=("unary", "bidi", "hold"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--body", type=Path, required=True, help="one gRPC-framed message")
    parser.add_argument("--header", action="append", default=[], help="'name: value'")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warm", type=float, default=0.5)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=64)
    args = parser.parse_args(argv)
    extra = []
    for item in args.header:
        name, _, value = item.partition(":")
        extra.append((name.strip().lower(), value.strip()))
    block = header_block(args.path, f"127.0.0.1:{args.port}", extra)
    request = Request(block, args.body.read_bytes())
    _precise_timers()
    conns = connect(args.port, args.connections)
    if args.mode == "unary":
        result = Unary(conns, request, args.rate, args.seconds, args.warm).run(
            drain=max(5.0, args.seconds)
        )
    elif args.mode == "bidi":
        result = Bidi(conns, request, args.streams).run(args.warm, args.seconds)
    else:
        result = Hold(conns, request).run()
    print("result " + json.dumps(result), flush=True)
    for conn in conns:
        conn.sock.close()


if __name__ == "__main__":
    main()
