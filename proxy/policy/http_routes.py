"""HTTP route rules (`http:` in the policy) for plain HTTP traffic seen through Envoy.

A route key is `METHOD /path/pattern`: METHOD is an HTTP method (`GET`) or `*` (any);
a path segment is literal text, `*` or `{name}` (exactly one non-empty segment), or `**`
(zero or more segments, last only). The most specific route wins, whatever its place in
the file: paths compare segment by segment (literal > `*`/`{name}` > `**`, and a pattern
that ends beats one that continues with `**`), then a named method beats `*`. Two keys
that would match exactly the same requests are a policy error, so there are no ties.

Request paths are checked before matching (`split_path`): percent-escapes are decoded
once, one trailing `/` is ignored (`/a/b/` matches as `/a/b`), and anything a backend
might read differently from us — dot segments, empty segments, encoded `/` or `\\`,
`;` parameters, control bytes — is refused, not guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

from authproxy.decide.reasons import Denied, Reason

if TYPE_CHECKING:
    from authproxy.policy.model import Rule

ANY_METHOD = "*"
ONE = "*"  # one segment
REST = "**"  # zero or more segments, last only

_METHOD = re.compile(r"[A-Z]{1,20}(?:-[A-Z]{1,20})?")
_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
# RFC 3986 pchar without "%" (patterns hold decoded text) and without ";" (refused below).
_LITERAL = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@]+")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: A path `split_path` accepts as it is: segments of unreserved characters and sub-delims
#: (no "%", ";", "\\", controls or non-ASCII), none of them "." or "..", no empty ones.
_PLAIN_PATH = re.compile(r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9\-._~!$&'()*+,=:@]+)+/?")
#: Longest request path considered; Envoy's default limit for all headers is 60 KiB.
MAX_PATH = 8192

# Specificity of a pattern position; a higher tuple is more specific.
_END, _LIT, _SEG, _REST = 4, 3, 2, 1


@dataclass(frozen=True, slots=True)
class HttpRoute:
    method: str  # "GET", or "*" for any method
    segments: tuple[str, ...]  # literal text, ONE, or REST (last only)
    rule: Rule
    rank: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        rank = [
            _LIT if s not in (ONE, REST) else _SEG if s == ONE else _REST for s in self.segments
        ]
        if not self.segments or self.segments[-1] != REST:
            rank.append(_END)
        object.__setattr__(self, "rank", tuple(rank))

    def matches(self, method: str, path: tuple[str, ...]) -> bool:
        if self.method != ANY_METHOD and self.method != method:
            return False
        pattern = self.segments
        if pattern and pattern[-1] == REST:
            pattern = pattern[:-1]
            if len(path) < len(pattern):
                return False
        elif len(path) != len(pattern):
            return False
        return all(p in (ONE, s) for p, s in zip(pattern, path, strict=False))


class HttpRoutes:
    """The `http:` routes of a policy, tried from most to least specific.

    A route of literal segments only is the most specific route for the one path it
    matches (every other route that matches it has a wildcard or `**` where it has text,
    or continues where it ends), so those are looked up by (method, path) first — a named
    method before `*`, as the order below has it — and only the rest are tried in order.
    """

    def __init__(self, routes: Iterable[HttpRoute] = ()) -> None:
        self.routes = tuple(
            sorted(routes, key=lambda r: (r.rank, r.method != ANY_METHOD), reverse=True)
        )
        self._exact: dict[tuple[str, tuple[str, ...]], Rule] = {}
        patterns = []
        for route in self.routes:
            if ONE in route.segments or REST in route.segments:
                patterns.append(route)
            else:
                self._exact.setdefault((route.method, route.segments), route.rule)
        self._patterns = tuple(patterns)

    def __len__(self) -> int:
        return len(self.routes)

    def match(self, method: str, path: tuple[str, ...]) -> Rule | None:
        if self._exact:
            rule = self._exact.get((method, path))
            if rule is None:
                rule = self._exact.get((ANY_METHOD, path))
            if rule is not None:
                return rule
        for route in self._patterns:
            if route.matches(method, path):
                return route.rule
        return None


def parse_route_key(key: str) -> tuple[str, tuple[str, ...]]:
    """(method, segments) of a `METHOD /path` key; ValueError says what is wrong."""
    method, sep, path = key.partition(" ")
    if not sep or not path:
        raise ValueError("expected 'METHOD /path', like 'GET /api/messages/{room}'")
    if method != ANY_METHOD and not _METHOD.fullmatch(method):
        raise ValueError(f"method {method!r} must be an uppercase HTTP method or '*'")
    if not path.startswith("/"):
        raise ValueError("the path must start with '/'")
    if path == "/":
        return method, ()
    segments = []
    parts = path[1:].split("/")
    for i, part in enumerate(parts):
        if part == REST:
            if i != len(parts) - 1:
                raise ValueError("'**' may only be the last segment")
            segments.append(REST)
        elif part == ONE or _PARAM.fullmatch(part):
            segments.append(ONE)
        elif part in (".", ".."):
            raise ValueError(f"dot segment {part!r} is not allowed")
        elif not part:
            raise ValueError("empty path segment ('//' or a trailing '/')")
        elif "*" in part or "{" in part or "}" in part or not _LITERAL.fullmatch(part):
            raise ValueError(
                f"segment {part!r}: use literal text, '*', '{{name}}' or '**'"
                " (no '%', ';', or partial wildcards)"
            )
        else:
            segments.append(part)
    return method, tuple(segments)


def split_path(path: str) -> tuple[str, ...]:
    """The decoded segments of a request path (query already removed); raises `Denied`."""
    if len(path) > MAX_PATH:
        raise _malformed(f"path is {len(path)} characters; limit {MAX_PATH}")
    if not path.startswith("/"):
        raise _malformed("path must start with '/'")
    if path == "/":
        return ()
    if _PLAIN_PATH.fullmatch(path):  # nothing to decode or refuse
        return tuple(path[1:].removesuffix("/").split("/"))
    if "\\" in path or ";" in path:
        raise _malformed("path must not contain '\\' or ';'")
    if _ESCAPE.search(path):
        raise _malformed("path has an invalid percent-escape")
    segments = []
    for raw in path[1:].removesuffix("/").split("/"):
        try:
            segment = unquote(raw, errors="strict") if "%" in raw else raw
        except UnicodeDecodeError:
            raise _malformed("path has percent-escapes that are not UTF-8") from None
        if not segment:
            raise _malformed("path has an empty segment ('//')")
        if segment in (".", "..") or any(c in segment for c in "/\\;") or not segment.isprintable():
            raise _malformed(
                "path has a dot segment, an encoded '/', '\\' or ';', or control bytes"
            )
        segments.append(segment)
    return tuple(segments)


def _malformed(problem: str) -> Denied:
    return Denied(Reason.REQUEST_MALFORMED, problem)
