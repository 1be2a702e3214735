"""Raw HTTP/1.1 to the ext_authz HTTP front end, bytes as they are: `raw_http` (one
request, one answer), `Client` (one connection kept open: send, then read each `Answer`),
`get` (a request's bytes), and `front` / `with_limits` to reach the running front end."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from authproxy.ext_authz.http_check import CheckHttpServer
from tests.support.running_proxy import RunningProxy

WAIT = 5.0  # the longest any single wait may take


class Answer:
    def __init__(self, status_line: bytes, headers: list[tuple[str, str]], body: bytes) -> None:
        self.version, status, _ = status_line.decode("latin-1").split(" ", 2)
        self.status = int(status)
        self.headers = headers
        self.body = body

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    @property
    def reason(self) -> str:
        return json.loads(self.body)["reason"]


class Client:
    """One raw connection: what is sent is exactly what the server reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, head_request: bool = False) -> Answer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), WAIT)
        lines = head[:-4].split(b"\r\n")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower().decode(), value.strip().decode("latin-1")))
        length = int(next(v for k, v in headers if k == "content-length"))
        body = b""
        if length and not head_request:
            body = await asyncio.wait_for(self.reader.readexactly(length), WAIT)
        return Answer(lines[0], headers, body)

    async def closed(self) -> bool:
        """Whether the server closes the connection (EOF) within the bounded wait."""
        try:
            rest = await asyncio.wait_for(self.reader.read(1 << 16), WAIT)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return rest == b""

    def close(self) -> None:
        self.writer.close()


def get(
    path: str, *headers: str | tuple[str, str], method: str = "GET", version: str = "1.1"
) -> bytes:
    """One HTTP/1 request; each header a raw line or a (name, value) pair."""
    lines = [f"{method} {path} HTTP/{version}", "Host: authz"]
    lines += [h if isinstance(h, str) else f"{h[0]}: {h[1]}" for h in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def front(running: RunningProxy) -> CheckHttpServer:
    server = running.proxy.check_http
    assert server is not None
    return server


def with_limits(running: RunningProxy, **changes: float) -> None:
    """New limits for connections opened from now on."""
    server = front(running)
    server.limits = replace(server.limits, **changes)


async def raw_http(port: int, request: bytes, limit: int = 1 << 20) -> tuple[int, bytes, bytes]:
    """Send bytes as they are; (status, header block, body) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(limit), timeout=10)
        while data and b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            length = _content_length(head)
            if length is None or len(body) >= length:
                break
            more = await asyncio.wait_for(reader.read(limit), timeout=10)
            if not more:
                break
            data += more
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    return int(status_line.split(b" ")[1]), head, body


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def header_values(head: bytes, name: str) -> list[str]:
    """Every value of header `name` in a raw response header block."""
    out = []
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.encode():
            out.append(value.strip().decode("latin-1"))
    return out
