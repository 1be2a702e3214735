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
import json
import select
import sys
import time
from pathlib import Path

from .h2wire import Conn, Request, connect, cpu_seconds, header_block, precise_timers

#: A late call: sent this long after it was due.
LATE_S = 0.001
#: Most streams `hold` opens on one connection.
HOLD_STREAMS_PER_CONNECTION = 100


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
        cpu0 = cpu_seconds()
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
        cpu = cpu_seconds() - cpu0
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
                cpus.append(cpu_seconds())
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
    precise_timers()
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
