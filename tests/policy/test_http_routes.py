"""HTTP route keys, most-specific-wins matching, and request path checking."""

from __future__ import annotations

import random
import re
from itertools import permutations

import pytest

from authproxy.decide.reasons import Denied, Reason
from authproxy.policy.http_routes import (
    MAX_PATH,
    HttpRoute,
    HttpRoutes,
    parse_route_key,
    split_path,
)
from authproxy.policy.model import Rule


def routes(*keys: str) -> HttpRoutes:
    """Routes whose rule pattern is the key, so a match tells which route won."""
    return HttpRoutes(HttpRoute(*parse_route_key(key), Rule(key, "public")) for key in keys)


def winner(table: HttpRoutes, request: str) -> str | None:
    """The key of the route that matches `METHOD /path`, or None."""
    method, _, path = request.partition(" ")
    rule = table.match(method, split_path(path))
    return None if rule is None else rule.pattern


# --- parse_route_key ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "method", "segments"),
    [
        ("GET /api/messages/{room}", "GET", ("api", "messages", "*")),
        ("* /api/**", "*", ("api", "**")),
        ("POST /", "POST", ()),
        ("PATCH /items/*", "PATCH", ("items", "*")),
        ("M-SEARCH /*", "M-SEARCH", ("*",)),
        ("* /**", "*", ("**",)),
        ("GET /a/{x}/b/{y_2}", "GET", ("a", "*", "b", "*")),
        ("GET /v1/users:batchGet", "GET", ("v1", "users:batchGet")),
        ("GET /a.b~c/x@y/it's(1)", "GET", ("a.b~c", "x@y", "it's(1)")),
        ("GET /test.Admin/*", "GET", ("test.Admin", "*")),
        ("GET /...", "GET", ("...",)),  # three dots are a name, not a dot segment
    ],
)
def test_parse_route_key_accepts(key: str, method: str, segments: tuple[str, ...]) -> None:
    assert parse_route_key(key) == (method, segments)


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("GET", "expected 'METHOD /path'"),
        ("GET ", "expected 'METHOD /path'"),
        ("", "expected 'METHOD /path'"),
        ("/api/messages", "expected 'METHOD /path'"),
        ("get /a", "method 'get' must be an uppercase HTTP method or '*'"),
        ("Get /a", "method 'Get' must be an uppercase HTTP method"),
        ("GET1 /a", "method 'GET1' must be an uppercase HTTP method"),
        ("GET- /a", "method 'GET-' must be an uppercase HTTP method"),
        ("-GET /a", "method '-GET' must be an uppercase HTTP method"),
        ("** /a", "method '**' must be an uppercase HTTP method"),
        ("GET a/b", "the path must start with '/'"),
        ("GET  /a", "the path must start with '/'"),  # two spaces
        ("GET *", "the path must start with '/'"),
        ("GET /a/**/b", "'**' may only be the last segment"),
        ("GET /**/**", "'**' may only be the last segment"),
        ("GET /a//b", "empty path segment"),
        ("GET /a/", "empty path segment ('//' or a trailing '/')"),
        ("GET //", "empty path segment"),
        ("GET /a/./b", "dot segment '.' is not allowed"),
        ("GET /a/..", "dot segment '..' is not allowed"),
        ("GET /..", "dot segment '..' is not allowed"),
        ("GET /api/foo*", "segment 'foo*': use literal text"),
        ("GET /a**", "segment 'a**'"),
        ("GET /***", "segment '***'"),
        ("GET /a{b}", "segment 'a{b}'"),
        ("GET /{b}x", "segment '{b}x'"),
        ("GET /{}", "segment '{}'"),
        ("GET /{1x}", "segment '{1x}'"),
        ("GET /{a-b}", "segment '{a-b}'"),
        ("GET /a%20b", "segment 'a%20b'"),
        ("GET /%2e%2e", "segment '%2e%2e'"),
        ("GET /a;b", "segment 'a;b'"),
        ("GET /a;v=1/b", "segment 'a;v=1'"),
        ("GET /a b", "segment 'a b'"),
        ("GET /a?x=1", "segment 'a?x=1'"),
        ("GET /a\\b", "segment 'a\\\\b'"),
    ],
)
def test_parse_route_key_rejects(key: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_route_key(key)
    assert words in str(info.value)


@pytest.mark.parametrize("key", ["GET /api/foo*", "GET /a{b}", "GET /a%20b", "GET /a;b"])
def test_bad_literal_message_names_what_is_allowed(key: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_route_key(key)
    assert "(no '%', ';', or partial wildcards)" in str(info.value)


def test_param_and_star_parse_to_the_same_pattern() -> None:
    assert parse_route_key("GET /a/{x}") == parse_route_key("GET /a/*")
    assert parse_route_key("GET /a/{x}") == parse_route_key("GET /a/{y}")


# --- matching and precedence --------------------------------------------------------------


def test_literal_beats_one_segment_beats_rest() -> None:
    table = routes("GET /a/**", "GET /a/{name}", "GET /a/x")
    assert winner(table, "GET /a/x") == "GET /a/x"
    assert winner(table, "GET /a/y") == "GET /a/{name}"
    assert winner(table, "GET /a/x/y") == "GET /a/**"


def test_star_and_param_rank_the_same_and_below_a_literal() -> None:
    table = routes("GET /a/*/c", "GET /a/b/{x}")
    # Position 2 decides: literal 'b' beats '*', whatever comes later.
    assert winner(table, "GET /a/b/c") == "GET /a/b/{x}"
    assert winner(table, "GET /a/z/c") == "GET /a/*/c"
    # Even a later '**' does not undo an earlier literal.
    assert winner(routes("GET /a/*/c", "GET /a/b/**"), "GET /a/b/c") == "GET /a/b/**"


CHAIN = ["GET /a/b", "GET /a/b/**", "GET /a/*", "GET /a/**", "GET /**"]


@pytest.mark.parametrize("order", [CHAIN, CHAIN[::-1], CHAIN[2:] + CHAIN[:2]], ids=str)
def test_specificity_chain_for_one_path(order: list[str]) -> None:
    # /a/b beats /a/b/** beats /a/* beats /a/** beats /**: remove each winner in turn.
    remaining = list(order)
    for expected in CHAIN:
        assert winner(routes(*remaining), "GET /a/b") == expected
        remaining.remove(expected)
    assert winner(routes(*remaining), "GET /a/b") is None


@pytest.mark.parametrize(
    ("keys", "request_", "expected"),
    [
        (("* /a/b", "GET /a/b"), "GET /a/b", "GET /a/b"),
        (("GET /a/b", "* /a/b"), "GET /a/b", "GET /a/b"),
        (("* /a/b", "GET /a/b"), "POST /a/b", "* /a/b"),
        (("* /a/*", "DELETE /a/{id}"), "DELETE /a/1", "DELETE /a/{id}"),
        (("* /a/*", "DELETE /a/{id}"), "GET /a/1", "* /a/*"),
        (("* /**", "GET /**"), "GET /", "GET /**"),
        (("* /**", "GET /**"), "HEAD /", "* /**"),
    ],
)
def test_named_method_beats_any_method_at_equal_path(
    keys: tuple[str, ...], request_: str, expected: str
) -> None:
    assert winner(routes(*keys), request_) == expected


@pytest.mark.parametrize(
    ("keys", "request_", "expected"),
    [
        (("GET /a/**", "* /a/b"), "GET /a/b", "* /a/b"),
        (("GET /a/*", "* /a/b"), "GET /a/b", "* /a/b"),
        (("GET /**", "* /a"), "GET /a", "* /a"),
        (("GET /a/**", "* /a/b/**"), "GET /a/b/c", "* /a/b/**"),
        (("GET /a/**", "* /a"), "GET /a", "* /a"),
    ],
)
def test_path_specificity_beats_method_specificity(
    keys: tuple[str, ...], request_: str, expected: str
) -> None:
    assert winner(routes(*keys), request_) == expected


ORDER_ROUTES = ("* /a/b", "GET /a/**", "GET /a/*", "* /**")
ORDER_EXPECTED = {
    "GET /a/b": "* /a/b",  # path beats method
    "POST /a/b": "* /a/b",
    "GET /a/c": "GET /a/*",
    "POST /a/c": "* /**",
    "GET /a": "GET /a/**",  # ** matches zero segments
    "GET /a/b/c": "GET /a/**",
    "POST /a": "* /**",
    "GET /": "* /**",
    "GET /b": "* /**",
}


@pytest.mark.parametrize("order", list(permutations(ORDER_ROUTES)), ids=str)
def test_result_is_independent_of_declaration_order(order: tuple[str, ...]) -> None:
    table = routes(*order)
    assert {request_: winner(table, request_) for request_ in ORDER_EXPECTED} == ORDER_EXPECTED


def test_every_order_of_a_larger_table_sorts_the_same() -> None:
    keys = ("GET /a/b", "* /a/b", "GET /a/{x}", "* /a/b/**", "GET /a/**", "* /**")
    expected = routes(*keys).routes
    for order in permutations(keys):
        assert routes(*order).routes == expected, order
    assert [r.rule.pattern for r in expected] == [
        "GET /a/b",
        "* /a/b",
        "* /a/b/**",
        "GET /a/{x}",
        "GET /a/**",
        "* /**",
    ]


@pytest.mark.parametrize(
    ("key", "request_", "matches"),
    [
        ("GET /a/**", "GET /a", True),  # zero segments
        ("GET /a/**", "GET /a/", True),  # trailing slash ignored
        ("GET /a/**", "GET /a/b/c/d", True),
        ("GET /a/**", "GET /ab", False),
        ("GET /a/**", "GET /", False),
        ("GET /a/b/**", "GET /a", False),
        ("GET /**", "GET /", True),
        ("GET /**", "GET /x/y", True),
        ("GET /{name}", "GET /", False),  # never the empty path
        ("GET /*", "GET /", False),
        ("GET /{name}", "GET /x/y", False),  # never more than one segment
        ("GET /*", "GET /x/y", False),
        ("GET /a/{name}", "GET /a", False),
        ("GET /a/*", "GET /a/b/c", False),
        ("GET /a/{name}", "GET /a/b", True),
        ("GET /a/*/c", "GET /a/b/c", True),
        ("GET /a/*/c", "GET /a/c", False),
        ("GET /", "GET /", True),
        ("GET /", "GET /a", False),
        ("GET /a", "GET /a/b", False),
        ("GET /a", "GET /A", False),  # case-sensitive
        ("GET /a", "get /a", False),
        ("GET /a", "POST /a", False),
        ("* /a", "PURGE /a", True),
    ],
)
def test_single_route_matching(key: str, request_: str, matches: bool) -> None:
    assert (winner(routes(key), request_) == key) is matches


def test_root_matches_only_root_and_rest() -> None:
    table = routes("GET /", "GET /*", "GET /{x}", "GET /**")
    assert winner(table, "GET /") == "GET /"
    table = routes("GET /*", "GET /{y}/**", "GET /**")
    assert winner(table, "GET /") == "GET /**"
    assert winner(routes("GET /*", "GET /{y}/**"), "GET /") is None


def test_escaped_request_segments_match_decoded_literals() -> None:
    table = routes("GET /api/messages/{room}", "GET /api/messages/general")
    assert winner(table, "GET /api/messages/gen%65ral") == "GET /api/messages/general"
    assert winner(table, "GET /%61pi/messages/caf%C3%A9") == "GET /api/messages/{room}"


@pytest.mark.parametrize(
    ("keys", "request_"),
    [
        ((), "GET /"),
        (("GET /a",), "GET /b"),
        (("GET /a",), "POST /a"),
        (("GET /a/*", "POST /**"), "GET /a"),
        (("GET /",), "GET /a"),
    ],
)
def test_no_match_is_none(keys: tuple[str, ...], request_: str) -> None:
    assert winner(routes(*keys), request_) is None


def test_len_counts_routes() -> None:
    assert len(HttpRoutes()) == 0
    assert len(routes("GET /a", "* /a", "GET /**")) == 3


# --- split_path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "segments"),
    [
        ("/", ()),
        ("/a", ("a",)),
        ("/a/b", ("a", "b")),
        ("/a/b/", ("a", "b")),  # one trailing slash ignored
        ("/a/", ("a",)),
        ("/%2561", ("%61",)),  # decoded once: %25 -> '%', never again
        ("/a%252Fb", ("a%2Fb",)),  # a double-encoded slash is text, not a separator
        ("/%252e%252e", ("%2e%2e",)),
        ("/%61%62", ("ab",)),
        ("/test.Admin/Ec%68o", ("test.Admin", "Echo")),
        ("/test%2EAdmin/Echo", ("test.Admin", "Echo")),
        ("/a%20b", ("a b",)),
        ("/caf%C3%A9", ("café",)),
        ("/caf%c3%a9", ("café",)),
        ("/%7E", ("~",)),
        ("/...", ("...",)),
        ("/.a/a.", (".a", "a.")),
        ("/a+b", ("a+b",)),  # '+' is not a space in a path
        ("/" + "a" * (MAX_PATH - 1), ("a" * (MAX_PATH - 1),)),  # exactly the limit
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_split_path(path: str, segments: tuple[str, ...]) -> None:
    assert split_path(path) == segments


@pytest.mark.parametrize(
    "path",
    [
        # dot segments, plain or escaped
        "/..",
        "/.",
        "/a/../b",
        "/a/./b",
        "/a/..",
        "/a/.",
        "/a/../",
        "/%2e%2e",
        "/%2E%2E/a",
        "/a/.%2e",
        "/a/%2e",
        # encoded separators
        "/a%2Fb",
        "/a%2fb",
        "/a/%2F",
        "/a%5Cb",
        "/a%5cb",
        "/a\\b",
        "/\\",
        # parameters
        "/a;b",
        "/a/b;jsessionid=1",
        "/a%3Bb",
        "/a%3bb",
        # empty segments
        "//",
        "//a",
        "/a//b",
        "/a/b//",
        # invalid escapes
        "/%zz",
        "/a%4",
        "/a%",
        "/%%41",
        "/%g0",
        # escapes that are not UTF-8
        "/%ff",
        "/%C3",
        "/%C3%28",
        "/%80",
        # control characters, escaped or raw
        "/%00",
        "/%0a",
        "/%0D",
        "/%09",
        "/%7F",
        "/a\x00b",
        "/a\nb",
        "/a\tb",
        # not a path
        "",
        "a/b",
        "*",
        "?x=1",
        "%2Fa",
        # too long
        "/" + "a" * MAX_PATH,
        "/a/" + "b/" * MAX_PATH,
    ],
    ids=lambda v: repr(v) if len(v) < 40 else f"long-{len(v)}",
)
def test_split_path_rejects(path: str) -> None:
    with pytest.raises(Denied) as info:
        split_path(path)
    assert info.value.reason is Reason.REQUEST_MALFORMED


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/" + "a" * MAX_PATH, f"limit {MAX_PATH}"),
        ("a", "must start with '/'"),
        ("/a;b", "must not contain"),
        ("/a%4", "invalid percent-escape"),
        ("/%ff", "not UTF-8"),
        ("/a//b", "empty segment"),
        ("/%2e%2e", "dot segment"),
        ("/a%2Fb", "encoded '/'"),
        ("/%00", "control bytes"),
    ],
)
def test_split_path_says_what_is_wrong(path: str, words: str) -> None:
    with pytest.raises(Denied) as info:
        split_path(path)
    assert words in info.value.message


# --- the fast paths agree with the general ones ---------------------------------------------


def _linear_match(table: HttpRoutes, method: str, path: tuple[str, ...]) -> str | None:
    """Every route tried in order: what `match` answers without its exact-path lookup."""
    for route in table.routes:
        if route.matches(method, path):
            return route.rule.pattern
    return None


def test_exact_path_lookup_answers_what_trying_every_route_answers() -> None:
    table = routes(
        "GET /a/b",
        "* /a/b",
        "POST /a/*",
        "* /a/**",
        "GET /a/b/**",
        "* /",
        "GET /x/{id}",
        "DELETE /x/y",
        "* /x/y/z",
        "GET /**",
    )
    segments = ["a", "b", "c", "x", "y", "z", "q"]
    paths = [()] + [(s,) for s in segments]
    paths += [(s, t) for s in segments for t in segments]
    paths += [(s, t, u) for s in "axq" for t in "by" for u in "cz"]
    for method in ("GET", "POST", "DELETE", "PUT"):
        for path in paths:
            got = table.match(method, path)
            assert (got.pattern if got else None) == _linear_match(table, method, path), (
                method,
                path,
            )


def _split_path_general(path: str) -> tuple[str, ...] | str:
    """`split_path` without its fast path for plain paths (the reference), or the reason."""
    from urllib.parse import unquote

    if not path.startswith("/"):
        return "refused"
    if path == "/":
        return ()
    if "\\" in path or ";" in path or re.search(r"%(?![0-9A-Fa-f]{2})", path):
        return "refused"
    segments = []
    for raw in path[1:].removesuffix("/").split("/"):
        try:
            segment = unquote(raw, errors="strict") if "%" in raw else raw
        except UnicodeDecodeError:
            return "refused"
        if (
            not segment
            or segment in (".", "..")
            or any(c in segment for c in "/\\;")
            or not segment.isprintable()
        ):
            return "refused"
        segments.append(segment)
    return tuple(segments)


def test_split_path_fast_path_agrees_with_the_general_rules() -> None:
    rng = random.Random(7)
    alphabet = ["/", "/", "a", "b", ".", "..", "%2e", "%2F", "%41", "~", "-", ";", "\\", "é", " "]
    for _ in range(20_000):
        path = "/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        try:
            got: tuple[str, ...] | str = split_path(path)
        except Denied:
            got = "refused"
        assert got == _split_path_general(path), path
