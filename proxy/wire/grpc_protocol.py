"""gRPC over HTTP/2, as bytes on the wire (the gRPC "PROTOCOL-HTTP2" document): the
`grpc-timeout` header, `grpc-message` percent-encoding, trailers-only responses, `-bin`
values, and the 5-byte length prefix of each message (for the size limit)."""

from __future__ import annotations

import base64
import math
from urllib.parse import quote, unquote

import grpc

Header = tuple[bytes, bytes]

_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
#: Units from the coarsest that can state a duration within 8 digits.
_ENCODE = (("n", 1e9), ("u", 1e6), ("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600))
_MAX_DIGITS = 99_999_999

RESPONSE_START = ((b":status", b"200"), (b"content-type", b"application/grpc"))


def parse_timeout(value: bytes) -> float | None:
    """Seconds from a `grpc-timeout` value (`100m`, `5S`); None when it is malformed."""
    if not 2 <= len(value) <= 9:
        return None
    digits, unit = value[:-1], value[-1:]
    scale = _UNITS.get(unit)
    if scale is None or not digits.isdigit():
        return None
    return int(digits) * scale


def format_timeout(seconds: float) -> bytes:
    """A `grpc-timeout` value for `seconds` (at least 1 ns), in the finest unit that fits."""
    seconds = max(seconds, 1e-9)
    for unit, per_second in _ENCODE:
        amount = math.ceil(seconds * per_second)
        if amount <= _MAX_DIGITS:
            return f"{amount}{unit}".encode()
    return f"{_MAX_DIGITS}H".encode()


def encode_message(text: str) -> bytes:
    """`grpc-message`: percent-encoded UTF-8 (printable ASCII except `%` stays)."""
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


def decode_message(value: bytes) -> str:
    return unquote(value.decode("ascii", "replace"), errors="replace")


def status_headers(
    code: grpc.StatusCode, message: str, extra: tuple[tuple[str, bytes | str], ...] = ()
) -> list[Header]:
    """`grpc-status`, `grpc-message` and further metadata (`-bin` values base64) as
    trailers, or after `RESPONSE_START` as a trailers-only response."""
    out: list[Header] = [(b"grpc-status", str(code.value[0]).encode())]
    if message:
        out.append((b"grpc-message", encode_message(message)))
    for key, value in extra:
        if key.endswith("-bin") and isinstance(value, bytes):
            out.append((key.encode(), base64.b64encode(value).rstrip(b"=")))
        else:
            out.append((key.encode(), value.encode() if isinstance(value, str) else value))
    return out


def trailers_only(code: grpc.StatusCode, message: str, extra=()) -> list[Header]:
    """A whole response that is only a status (HEADERS with END_STREAM)."""
    return [*RESPONSE_START, *status_headers(code, message, extra)]


class MessageSizes:
    """Follows the 5-byte prefixes in one direction of a stream and tells when a message
    declares more than `limit` bytes. Costs a few operations per DATA frame."""

    __slots__ = ("_header", "_remaining", "limit", "messages")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._remaining = 0  # bytes of the current message still to come
        self._header = b""  # a prefix split across frames
        self.messages = 0  # messages started

    def feed(self, data: bytes) -> int | None:
        """Account for `data`; the declared size of the first message over the limit, or
        None."""
        end = len(data)
        at = 0
        remaining = self._remaining
        while True:
            if remaining:  # the rest of a message's bytes
                if remaining >= end - at:
                    self._remaining = remaining - (end - at)
                    return None
                at += remaining
                remaining = 0
            if at == end:
                self._remaining = 0
                return None
            header = self._header
            if header or end - at < 5:  # a prefix split across frames
                take = 5 - len(header)
                header += data[at : at + take]
                at += take
                if len(header) < 5:
                    self._header = header
                    self._remaining = 0
                    return None
                self._header = b""
                size = int.from_bytes(header[1:5], "big")
            else:
                size = int.from_bytes(data[at + 1 : at + 5], "big")
                at += 5
            self.messages += 1
            if size > self.limit:
                self._remaining = 0
                return size
            remaining = size


class MessageReader:
    """Collects one direction of a stream into whole messages, for a front end that must
    see each message before any of its bytes go on: `feed` returns the messages completed
    (compressed flag, payload) and their bytes as framed, and keeps a partial one. The
    size limit is `MessageSizes`' (checked before the bytes reach here)."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = b""

    @property
    def held(self) -> int:
        """Bytes of a message not yet complete."""
        return len(self._held)

    def take_held(self) -> bytes:
        """The partial message's bytes, no longer held."""
        held, self._held = self._held, b""
        return held

    def feed(self, data: bytes) -> tuple[list[tuple[bool, bytes]], bytes]:
        buffer = self._held + data if self._held else data
        messages: list[tuple[bool, bytes]] = []
        at = 0
        while len(buffer) - at >= 5:
            size = int.from_bytes(buffer[at + 1 : at + 5], "big")
            end = at + 5 + size
            if end > len(buffer):
                break
            messages.append((buffer[at] != 0, buffer[at + 5 : end]))
            at = end
        self._held = buffer[at:]
        return messages, buffer[:at]
