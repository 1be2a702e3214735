"""Token verification: one deny reason per way a token can be wrong, identity, and the cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from authproxy.decide.reasons import Denied, Reason
from authproxy.keys.verify import TokenVerifier
from tests.support.tokens import (
    METHOD_FOR,
    NOW,
    POLICY_YAML,
    Clock,
    authorizer,
    b64url,
    b64url_decode,
    bearer,
    claims,
    keyset,
    policy,
    rsa_key,
    signed,
    token,
    unsigned,
)

ACCESS = METHOD_FOR["access"]
Headers = list[tuple[str, str | bytes]]

PERMISSION = {
    Reason.INSUFFICIENT_ROLE,
    Reason.INSUFFICIENT_PERMISSION,
    Reason.INSUFFICIENT_SCOPE,
    Reason.METHOD_DENIED,
    Reason.METHOD_MALFORMED,
}


def hs256_with_rsa_public_key() -> str:
    """The key-confusion attack: HS256 keyed with the RSA public key PEM, kid of the RSA key."""
    pem = (
        rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    head = b64url(json.dumps({"alg": "HS256", "kid": "rsa"}))
    body = b64url(json.dumps(claims()))
    mac = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


def tampered() -> str:
    head, _, sig = token().split(".")
    return f"{head}.{b64url(json.dumps(claims(sub='admin')))}.{sig}"


def payload_with(extra: str, **overrides: object) -> str:
    """Claims JSON with a hand-written duplicate member appended."""
    return json.dumps(claims(**overrides))[:-1] + "," + extra + "}"


def raw(value: str | bytes) -> Callable[[], Headers]:
    return lambda: [("authorization", value)]


def tok(level: str = "access", **kw: object) -> Callable[[], Headers]:
    return lambda: bearer(token(level, **kw))


def case(
    name: str, reason: Reason, make: Callable[[], Headers], method: str = ACCESS, words: str = ""
) -> object:
    return pytest.param(method, make, reason, words, id=f"{reason.value}-{name}")


R = Reason
DENIALS = [
    case("no-header", R.TOKEN_MISSING, lambda: [("x-other", "1")]),
    case("other-headers-only", R.TOKEN_MISSING, lambda: [("cookie", "a=b")]),
    case("two-parts", R.TOKEN_MALFORMED, raw("Bearer abc.def"), words="3 dot-separated"),
    case("four-parts", R.TOKEN_MALFORMED, lambda: bearer(token() + ".x")),
    case("empty-segment", R.TOKEN_MALFORMED, raw("Bearer a..b")),
    case("not-base64url", R.TOKEN_MALFORMED, raw("Bearer ab+c.def.ghi"), words="base64url"),
    case("padding", R.TOKEN_MALFORMED, raw("Bearer abc=.def.ghi")),
    case("bad-length", R.TOKEN_MALFORMED, raw("Bearer a.bcde.fghi")),
    case("header-not-json", R.TOKEN_MALFORMED, lambda: bearer(unsigned("not json", {}, b"s"))),
    case("header-array", R.TOKEN_MALFORMED, lambda: bearer(signed("[1]", claims()))),
    case("header-no-alg", R.TOKEN_MALFORMED, lambda: bearer(signed('{"kid":"ec"}', claims()))),
    case("crit", R.TOKEN_MALFORMED, tok(header={"crit": ["exp"], "exp": 1}), words="'crit'"),
    case("b64", R.TOKEN_MALFORMED, tok(header={"b64": False}), words="'b64'"),
    case("kid-not-string", R.TOKEN_MALFORMED, tok(header={"kid": 7}), words="kid"),
    case("basic-scheme", R.TOKEN_MALFORMED, lambda: [("authorization", "Basic " + token())]),
    case("no-scheme", R.TOKEN_MALFORMED, lambda: [("authorization", token())]),
    case("empty-bearer", R.TOKEN_MALFORMED, raw("Bearer "), words="empty"),
    case("bare-bearer", R.TOKEN_MALFORMED, raw("Bearer")),
    case("binary-value", R.TOKEN_MALFORMED, raw(b"Bearer abc")),
    case("payload-array", R.TOKEN_MALFORMED, lambda: bearer(signed('{"alg":"ES256"}', "[1]"))),
    case("big-token", R.TOKEN_TOO_LARGE, tok(pad="x" * 9000), words="8192"),
    case("big-header", R.TOKEN_TOO_LARGE, raw("Bearer " + "a" * 9000)),
    case(
        "two-authorization",
        R.TOKEN_AMBIGUOUS,
        lambda: [*bearer(token()), ("Authorization", "Bearer " + token())],
    ),
    *[
        case(
            f"alg-{alg}",
            R.ALGORITHM_NOT_ALLOWED,
            lambda alg=alg: bearer(unsigned({"alg": alg, "kid": "ec"}, claims(), b"x")),
            words="'none'",
        )
        for alg in ("none", "None", "NONE", "nOnE")
    ],
    case("hs256-rsa-kid", R.ALGORITHM_NOT_ALLOWED, lambda: bearer(hs256_with_rsa_public_key())),
    case(
        "es384-on-es256-key",
        R.ALGORITHM_NOT_ALLOWED,
        lambda: bearer(unsigned({"alg": "ES384", "kid": "ec"}, claims(), b"x")),
        words="accepts ES256",
    ),
    case(
        "rs256-on-ed-key",
        R.ALGORITHM_NOT_ALLOWED,
        lambda: bearer(unsigned({"alg": "RS256", "kid": "ed"}, claims(), b"x")),
    ),
    case(
        "no-kid-no-key",
        R.ALGORITHM_NOT_ALLOWED,
        lambda: bearer(unsigned({"alg": "ES512"}, claims(), b"x")),
    ),
    case("unknown-kid", R.KEY_NOT_FOUND, tok(header={"kid": "who"}), words="'who'"),
    case(
        "key-not-for-level",
        R.KEY_NOT_FOUND,
        tok("refresh", signer="ec"),
        method=METHOD_FOR["refresh"],
        words="does not sign refresh tokens",
    ),
    case("tampered-payload", R.BAD_SIGNATURE, lambda: bearer(tampered())),
    case("impostor-same-kid", R.BAD_SIGNATURE, tok(signer="ec-other")),
    case(
        "impostor-no-kid",
        R.BAD_SIGNATURE,
        lambda: bearer(signed('{"alg":"ES256"}', claims(), "ec-other")),
    ),
    case("garbage-signature", R.BAD_SIGNATURE, lambda: bearer(token()[:-8] + "AAAAAAAA")),
    case("expired", R.TOKEN_EXPIRED, tok(exp=NOW - 31, iat=NOW - 600)),
    case("nbf-future", R.TOKEN_NOT_YET_VALID, tok(nbf=NOW + 31)),
    case("iat-future", R.TOKEN_NOT_YET_VALID, tok(iat=NOW + 31, exp=NOW + 900)),
    case("no-exp", R.MISSING_CLAIM, tok(exp=None), words="'exp'"),
    case("no-sub", R.MISSING_CLAIM, tok(sub=None), words="'sub'"),
    case("no-type", R.MISSING_CLAIM, tok(type=None), words="'type'"),
    case("no-aud", R.MISSING_CLAIM, tok(aud=None), words="'aud'"),
    case("no-iss", R.MISSING_CLAIM, tok(iss=None), words="'iss'"),
    case("exp-string", R.INVALID_CLAIM, tok(exp="9999999999"), words="'exp'"),
    case("exp-bool", R.INVALID_CLAIM, tok(exp=True)),
    case("nbf-string", R.INVALID_CLAIM, tok(nbf="0")),
    case("roles-string", R.INVALID_CLAIM, tok(roles="admin"), words="'roles'"),
    case("role-comma", R.INVALID_CLAIM, tok(roles=["admin,ops"])),
    case("role-empty", R.INVALID_CLAIM, tok(roles=[""])),
    case("sub-newline", R.INVALID_CLAIM, tok(sub="alice\nx-auth-subject: root")),
    case("sub-number", R.INVALID_CLAIM, tok(sub=42)),
    case("aud-number", R.INVALID_CLAIM, tok(aud=5)),
    case("permissions-dict", R.INVALID_CLAIM, tok(permissions={"a": 1})),
    case("scope-newline", R.INVALID_CLAIM, tok(scope=["read\r\n"])),
    case("jti-empty", R.INVALID_CLAIM, tok(jti="")),
    case(
        "refresh-for-access",
        R.WRONG_TOKEN_TYPE,
        tok("refresh"),
        words="this method needs an access token; got a refresh token",
    ),
    case(
        "2fa-for-refresh",
        R.WRONG_TOKEN_TYPE,
        tok("2fa", signer="hmac"),
        method=METHOD_FOR["refresh"],
        words="this method needs a refresh token; got a 2FA token",
    ),
    case(
        "access-for-2fa",
        R.WRONG_TOKEN_TYPE,
        tok("access"),
        method=METHOD_FOR["2fa"],
        words="this method needs a 2FA token; got an access token",
    ),
    case("unknown-type", R.WRONG_TOKEN_TYPE, tok(type="id"), words="of type 'id'"),
    case("aud-other", R.WRONG_AUDIENCE, tok(aud="token-refresh"), words="'api-access'"),
    case("aud-list-other", R.WRONG_AUDIENCE, tok(aud=["a", "b"])),
    case("iss-other", R.WRONG_ISSUER, tok(iss="evil"), words="'evil'"),
    case("no-roles", R.INSUFFICIENT_ROLE, tok(), method="/api.v1.User/Admin", words="admin, ops"),
    case("wrong-role", R.INSUFFICIENT_ROLE, tok(roles=["user"]), method="/api.v1.User/Admin"),
    case(
        "one-permission",
        R.INSUFFICIENT_PERMISSION,
        tok(permissions=["users.read", "admin"]),
        method="/api.v1.User/Write",
        words="users.write",
    ),
    case("scope-string", R.INSUFFICIENT_SCOPE, tok(scope="read"), method="/api.v1.User/Scoped"),
    case("scope-list", R.INSUFFICIENT_SCOPE, tok(scope=["write"]), method="/api.v1.User/Scoped"),
    case("scp-list", R.INSUFFICIENT_SCOPE, tok(scp=["read"]), method="/api.v1.User/Scoped"),
    case("deny-rule", R.METHOD_DENIED, tok(), method="/admin.v1.Ops/Shutdown"),
    case("default-deny", R.METHOD_DENIED, tok(), method="/api.v1.Unknown/Call"),
    *[
        case(f"method-{i}", R.METHOD_MALFORMED, tok(), method=m)
        for i, m in enumerate(
            ["", "api.v1.User/Get", "/api.v1.User/Get/x", "/api.v1.User/", "/ a.B/C"]
        )
    ],
]


@pytest.mark.parametrize(("method", "make", "reason", "words"), DENIALS)
async def test_denial_reasons(
    method: str, make: Callable[[], Headers], reason: Reason, words: str
) -> None:
    decision = await authorizer().decide(method, make())
    assert not decision.allowed
    assert decision.reason == reason, decision.message
    assert words in decision.message
    expected = (
        grpc.StatusCode.PERMISSION_DENIED
        if reason in PERMISSION
        else grpc.StatusCode.UNAUTHENTICATED
    )
    assert decision.status == expected
    # A deny names who was refused once the token verified (requirements), never before.
    verified = reason in (
        Reason.INSUFFICIENT_ROLE,
        Reason.INSUFFICIENT_PERMISSION,
        Reason.INSUFFICIENT_SCOPE,
    )
    assert (decision.identity is not None) == verified
    if verified:
        assert decision.identity.subject == "alice"


ALLOWED = [
    pytest.param("/api.v1.Auth/Login", [], id="public-without-token"),
    pytest.param(ACCESS, bearer(token(signer="rsa")), id="rs256"),
    pytest.param(ACCESS, bearer(token(signer="ed")), id="eddsa"),
    pytest.param(ACCESS, [("authorization", "bearer  " + token())], id="scheme-any-case"),
    pytest.param(ACCESS, bearer(signed('{"alg":"ES256"}', claims())), id="no-kid"),
    pytest.param(ACCESS, bearer(token(exp=NOW - 29, iat=NOW - 600)), id="expired-in-leeway"),
    pytest.param(ACCESS, bearer(token(nbf=NOW + 29)), id="nbf-in-leeway"),
    pytest.param(ACCESS, bearer(token(aud=["x", "api-access"])), id="aud-list"),
    pytest.param(METHOD_FOR["2fa"], bearer(token("2fa")), id="2fa"),
    pytest.param(METHOD_FOR["refresh"], bearer(token("refresh")), id="refresh-hmac"),
    pytest.param("/api.v1.User/Admin", bearer(token(roles=["ops"])), id="roles-any-of"),
    pytest.param(
        "/api.v1.User/Write",
        bearer(token(permissions=["users.write", "users.read", "x"])),
        id="permissions-all-of",
    ),
    pytest.param("/api.v1.User/Scoped", bearer(token(scope="write read")), id="scope-str"),
    pytest.param("/api.v1.User/Scoped", bearer(token(scope=["read", "write"])), id="scope-list"),
    pytest.param("/api.v1.User/Scoped", bearer(token(scp=["read", "write"])), id="scp"),
]


@pytest.mark.parametrize(("method", "headers"), ALLOWED)
async def test_allowed(method: str, headers: Headers) -> None:
    decision = await authorizer().decide(method, headers)
    assert decision.allowed, decision.message
    assert decision.reason is None
    assert decision.status == grpc.StatusCode.OK


@pytest.mark.parametrize(
    "bad",
    [
        {"iss": ["auth-service"]},  # unhashable: `iss not in spec.issuers` raises TypeError
        {"iss": {"a": 1}},
        {"exp": 10**400},  # math.isfinite(huge int) raises OverflowError
        {"nbf": 10**400},
        {"iat": -(10**400)},
    ],
    ids=["iss-list", "iss-object", "exp-huge-int", "nbf-huge-int", "iat-huge-int"],
)
async def test_odd_claims_of_a_signed_token_are_a_deny_not_a_crash(bad: dict) -> None:
    # `Authorizer.decide` promises never to raise for a bad request.
    decision = await authorizer().decide(ACCESS, bearer(token(**bad)))
    assert not decision.allowed
    assert decision.reason in (Reason.INVALID_CLAIM, Reason.WRONG_ISSUER)


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        ('{"alg":"none","alg":"ES256","kid":"ec"}', json.dumps(claims())),
        ('{"alg":"ES256","kid":"who","kid":"ec"}', json.dumps(claims())),
        ('{"alg":"ES256","kid":"ec"}', payload_with('"sub":"admin"')),
        ('{"alg":"ES256","kid":"ec"}', payload_with('"type":"access"', type="refresh")),
        ('{"alg":"ES256","kid":"ec"}', payload_with('"exp":9999999999')),
    ],
    ids=["header-alg", "header-kid", "payload-sub", "payload-type", "payload-exp"],
)
async def test_duplicate_json_keys_are_refused(header: str, payload: str) -> None:
    tok_ = signed(header, payload)
    # Python's own json would accept it (keeping the last value).
    json.loads(b64url_decode(tok_.split(".")[0]))
    decision = await authorizer().decide(ACCESS, bearer(tok_))
    assert decision.reason == Reason.TOKEN_MALFORMED
    assert "duplicate key" in decision.message


async def test_allowed_decision_carries_identity_headers() -> None:
    tok_ = token(roles=["admin", "ops"], permissions=["p1"], scope="read write")
    decision = await authorizer().decide(ACCESS, bearer(tok_))
    assert decision.allowed
    headers = dict(decision.identity.headers)
    assert headers["x-auth-subject"] == "alice"
    assert headers["x-auth-token-type"] == "access"
    assert headers["x-auth-roles"] == "admin,ops"
    assert headers["x-auth-permissions"] == "p1"
    assert headers["x-auth-scopes"] == "read,write"
    assert headers["x-auth-jti"] == "jti-1"
    assert headers["x-auth-issuer"] == "auth-service"
    payload = json.loads(b64url_decode(tok_.split(".")[1]))
    assert json.loads(base64.urlsafe_b64decode(headers["x-auth-claims"] + "==")) == payload
    assert all(k.startswith("x-auth-") for k in headers)


# --- the verified-token cache --------------------------------------------------------------


def verifier(clock: Clock, cache_size: int = 10_000) -> TokenVerifier:
    return TokenVerifier(keyset(), cache_size=cache_size, clock=clock)


def test_second_verify_is_a_cache_hit() -> None:
    pol, v = policy(), verifier(Clock())
    tok_ = token()
    first = v.verify(tok_, pol.tokens["access"], pol)
    assert (v.cache_hits, v.cache_misses) == (0, 1)
    second = v.verify(tok_, pol.tokens["access"], pol)
    assert (v.cache_hits, v.cache_misses) == (1, 1)
    assert second is first


def test_cached_token_is_rejected_once_expired() -> None:
    clock = Clock()
    pol, v = policy(), verifier(clock)
    tok_ = token(exp=NOW + 60)
    v.verify(tok_, pol.tokens["access"], pol)
    clock.advance(30)
    v.verify(tok_, pol.tokens["access"], pol)
    assert v.cache_hits == 1
    clock.advance(59)  # 29s past exp: within leeway
    v.verify(tok_, pol.tokens["access"], pol)
    clock.advance(2)  # 31s past exp
    with pytest.raises(Denied) as info:
        v.verify(tok_, pol.tokens["access"], pol)
    assert info.value.reason == Reason.TOKEN_EXPIRED


def test_cached_token_is_rejected_for_another_level() -> None:
    pol, v = policy(), verifier(Clock())
    tok_ = token("refresh")
    v.verify(tok_, pol.tokens["refresh"], pol)
    for level in ("access", "2fa"):
        with pytest.raises(Denied) as info:
            v.verify(tok_, pol.tokens[level], pol)
        assert info.value.reason == Reason.WRONG_TOKEN_TYPE
    assert v.cache_hits == 2


def test_cached_token_still_checks_allowed_keys() -> None:
    pol, v = policy(), verifier(Clock())
    tok_ = token("refresh", signer="ec")  # ec may sign, but not refresh tokens
    with pytest.raises(Denied):
        v.verify(tok_, pol.tokens["refresh"], pol)
    with pytest.raises(Denied) as info:
        v.verify(tok_, pol.tokens["refresh"], pol)
    assert info.value.reason == Reason.KEY_NOT_FOUND
    assert v.cache_hits == 1


def test_cache_is_bounded_by_cache_size() -> None:
    pol, v = policy(), verifier(Clock(), cache_size=2)
    spec = pol.tokens["access"]
    tokens = [token(jti=f"j{i}") for i in range(3)]
    for t in tokens:
        v.verify(t, spec, pol)
    assert v.cache_misses == 3
    v.verify(tokens[2], spec, pol)
    v.verify(tokens[1], spec, pol)
    assert v.cache_hits == 2
    v.verify(tokens[0], spec, pol)  # the oldest was evicted
    assert (v.cache_hits, v.cache_misses) == (2, 4)


def test_cache_size_zero_never_caches() -> None:
    pol, v = policy(), verifier(Clock(), cache_size=0)
    tok_ = token()
    for _ in range(3):
        v.verify(tok_, pol.tokens["access"], pol)
    assert (v.cache_hits, v.cache_misses) == (0, 3)


def test_a_token_stops_working_exactly_at_exp_plus_leeway() -> None:
    clock = Clock()
    pol, v = policy(), verifier(clock)
    spec = pol.tokens["access"]
    tok_ = token(exp=NOW + 60)
    v.verify(tok_, spec, pol)
    clock.now = NOW + 59.999  # the last cached pass before exp
    v.verify(tok_, spec, pol)
    assert v.cache_hits == 1
    clock.now = NOW + 60 + 30  # exactly exp + leeway: still accepted
    v.verify(tok_, spec, pol)
    clock.now = NOW + 60 + 30.001
    with pytest.raises(Denied) as info:
        v.verify(tok_, spec, pol)
    assert info.value.reason == Reason.TOKEN_EXPIRED


@pytest.mark.parametrize(
    ("claim", "words"), [("nbf", "not valid for another"), ("iat", "issued")], ids=["nbf", "iat"]
)
def test_a_cached_token_that_passed_still_has_its_times_checked(claim: str, words: str) -> None:
    """Only the clock changes between calls, so a cached token that passed re-checks its
    times: a clock set back (an NTP step) before `nbf`/`iat` - leeway refuses it again."""
    clock = Clock()
    pol, v = policy(), verifier(clock)
    spec = pol.tokens["access"]
    tok_ = token(**{claim: NOW + 20})  # within the 30 s leeway: valid now
    v.verify(tok_, spec, pol)
    v.verify(tok_, spec, pol)
    clock.now = NOW - 15  # now + leeway is 5 s short of the claim
    with pytest.raises(Denied) as info:
        v.verify(tok_, spec, pol)
    assert info.value.reason == Reason.TOKEN_NOT_YET_VALID
    assert words in info.value.message
    assert v.cache_hits == 2  # refused from the cache, not by a fresh verification
    clock.now = NOW
    assert v.verify(tok_, spec, pol) is not None


def test_a_cached_token_is_checked_afresh_for_a_reloaded_policy() -> None:
    """What a token passed is remembered per level of one policy: after a reload that
    changes the level's audience, the same cached token is judged by the new one."""
    clock = Clock()
    old, v = policy(), verifier(clock)
    tok_ = token()
    v.verify(tok_, old.tokens["access"], old)
    v.verify(tok_, old.tokens["access"], old)
    new = policy(
        POLICY_YAML.replace(
            "access:  {type: access, audience: api-access}",
            "access:  {type: access, audience: api-v2}",
        )
    )
    with pytest.raises(Denied) as info:
        v.verify(tok_, new.tokens["access"], new)
    assert info.value.reason == Reason.WRONG_AUDIENCE
    assert v.cache_hits == 2
    assert v.verify(tok_, old.tokens["access"], old) is not None  # the old level still holds


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_classic_unsigned_token_is_algorithm_not_allowed(alg: str) -> None:
    """`header.payload.` (empty signature) names the real problem, not a malformed token."""
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims()).encode())
    decision = await authorizer().decide(ACCESS, [("authorization", f"Bearer {header}.{payload}.")])
    assert decision.reason == Reason.ALGORITHM_NOT_ALLOWED
