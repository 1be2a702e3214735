"""JWS-level attacks after RFC 8725, through the real proxy: alg none, key confusion,
keys and key URLs in the header, kid tricks, duplicate members, numeric claims."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from authproxy.keys.issuer import SigningKey
from tests.support.attacks import (
    Case,
    assert_denied,
    attacker,
    es_attacker,
)
from tests.support.echo_backend import EchoBackend
from tests.support.jws import Raw, b64url, claims, craft, pairs, signed
from tests.support.keys import Keys
from tests.support.running_proxy import RunningProxy

# --- alg none ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_in_every_spelling(
    proxy: RunningProxy, backend: EchoBackend, keys: Keys, alg
):
    cases = []
    for kid_label, header in (
        ("no-kid", {"alg": alg}),
        ("es256-kid", {"alg": alg, "kid": keys.es256.kid}),
        ("rs256-kid", {"alg": alg, "kid": keys.rs256.kid}),
    ):
        body = craft(header, claims(), signature="x").rsplit(".", 1)[0]
        real_sig = craft(header, claims(), key=keys.es256.key, alg="ES256")
        cases += [
            # An unsigned token is refused as such (before the empty signature is noticed).
            Case(f"{kid_label}/empty-signature", "ALGORITHM_NOT_ALLOWED", f"{body}."),
            Case(f"{kid_label}/no-signature-part", "TOKEN_MALFORMED", body),
            Case(
                f"{kid_label}/junk-signature",
                "ALGORITHM_NOT_ALLOWED",
                f"{body}.{b64url(b'x' * 32)}",
            ),
            Case(f"{kid_label}/real-es256-signature", "ALGORITHM_NOT_ALLOWED", real_sig),
        ]
    await assert_denied(proxy, backend, cases)


async def test_alg_lookalikes_are_not_none_and_not_accepted(
    proxy: RunningProxy, backend: EchoBackend, keys: Keys
):
    kid = keys.es256.kid
    sig = b64url(b"x" * 64)
    cases = [
        Case(
            "none-with-space",
            "ALGORITHM_NOT_ALLOWED",
            craft({"alg": "none ", "kid": kid}, claims(), signature=sig),
        ),
        Case(
            "empty-alg", "TOKEN_MALFORMED", craft({"alg": "", "kid": kid}, claims(), signature=sig)
        ),
        Case(
            "alg-null", "TOKEN_MALFORMED", craft({"alg": None, "kid": kid}, claims(), signature=sig)
        ),
        Case(
            "alg-list",
            "TOKEN_MALFORMED",
            craft({"alg": ["ES256"], "kid": kid}, claims(), signature=sig),
        ),
        Case("no-alg", "TOKEN_MALFORMED", craft({"kid": kid}, claims(), signature=sig)),
        Case(
            "es256-lowercase",
            "ALGORITHM_NOT_ALLOWED",
            craft({"alg": "es256", "kid": kid}, claims(), key=keys.es256.key, alg="ES256"),
        ),
        Case("crit-header", "TOKEN_MALFORMED", signed(keys.es256, claims(), crit=["exp"], exp=1)),
        Case("b64-false", "TOKEN_MALFORMED", signed(keys.es256, claims(), b64=False, crit=["b64"])),
    ]
    await assert_denied(proxy, backend, cases)


# --- HS/RS key confusion -------------------------------------------------------------------


def _public_key_as_bytes(sk: SigningKey) -> dict[str, bytes]:
    public = sk.key.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "pem": pem,
        "pem-no-newline": pem.rstrip(b"\n"),
        "der": der,
        "jwk-json": json.dumps(sk.public_jwk()).encode(),
        "jwk-json-compact": json.dumps(sk.public_jwk(), separators=(",", ":")).encode(),
    }


@pytest.mark.parametrize("target", ["rs256", "es256"])
async def test_hmac_signed_with_the_public_key(
    proxy: RunningProxy, backend: EchoBackend, keys: Keys, target
):
    """The classic HS256-with-the-RSA-public-key attack: the key named by kid never accepts
    HS*; without a kid only the real HMAC key is tried, and the forged MAC does not match."""
    sk: SigningKey = getattr(keys, target)
    cases = []
    for form, secret in _public_key_as_bytes(sk).items():
        for kid_label, header, reason in (
            ("target-kid", {"alg": "HS256", "kid": sk.kid}, "ALGORITHM_NOT_ALLOWED"),
            ("no-kid", {"alg": "HS256"}, "BAD_SIGNATURE"),
            ("hmac-kid", {"alg": "HS256", "kid": "refresh-hmac"}, "BAD_SIGNATURE"),
            ("hs512-no-kid", {"alg": "HS512"}, "ALGORITHM_NOT_ALLOWED"),  # no 64-byte secret
            ("hs384-target-kid", {"alg": "HS384", "kid": sk.kid}, "ALGORITHM_NOT_ALLOWED"),
        ):
            token = craft(header, claims(), key=secret)
            cases.append(Case(f"{form}/{kid_label}", reason, token))
    await assert_denied(proxy, backend, cases)


# --- keys and key URLs carried by the token ----------------------------------------------


@pytest.fixture
async def url_recorder() -> AsyncIterator[dict[str, Any]]:
    """A local 'attacker' URL that counts every connection made to it."""
    seen = {"connections": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    seen["url"] = f"http://127.0.0.1:{port}"
    yield seen
    server.close()
    await server.wait_closed()


async def test_keys_and_key_urls_in_the_header_are_ignored(
    proxy: RunningProxy, backend: EchoBackend, keys: Keys, url_recorder
):
    a = attacker()
    url = url_recorder["url"]
    jwk_with_real_kid = {**a["ec_jwk"], "kid": keys.es256.kid, "alg": "ES256", "use": "sig"}
    embedded = {
        "jwk": {"jwk": a["ec_jwk"]},
        "jwk-with-real-kid": {"jwk": jwk_with_real_kid},
        "jku": {"jku": f"{url}/jwks.json"},
        "x5u": {"x5u": f"{url}/cert.pem"},
        "x5c": {"x5c": a["x5c"]},
        "all": {"jwk": a["ec_jwk"], "jku": f"{url}/jwks.json", "x5u": f"{url}/c", "x5c": a["x5c"]},
    }
    cases = []
    for name, params in embedded.items():
        for kid_label, kid, reason in (
            ("no-kid", None, "BAD_SIGNATURE"),  # tried against the real ES256 key only
            ("real-kid", keys.es256.kid, "BAD_SIGNATURE"),
            ("attacker-kid", "attacker", "KEY_NOT_FOUND"),
        ):
            header = {**params, **({"kid": kid} if kid else {})}
            cases.append(Case(f"{name}/{kid_label}", reason, es_attacker(header)))
    rsa_token = craft({"alg": "RS256", "jwk": a["rsa_jwk"]}, claims(), key=a["rsa"])
    cases.append(Case("rsa-jwk/no-kid", "BAD_SIGNATURE", rsa_token))
    await assert_denied(proxy, backend, cases)
    await asyncio.sleep(0.05)
    assert url_recorder["connections"] == 0  # the proxy never fetched a key URL


# --- kid tricks ------------------------------------------------------------------------------


async def test_kid_tricks(proxy: RunningProxy, backend: EchoBackend, keys: Keys):
    a = attacker()
    payload = claims()
    cases = [
        # The kid of another configured key, with the attacker's signature.
        Case("rs256-kid/es256-alg", "ALGORITHM_NOT_ALLOWED", es_attacker({"kid": keys.rs256.kid})),
        Case(
            "rs256-kid/attacker-rsa",
            "BAD_SIGNATURE",
            craft({"alg": "RS256", "kid": keys.rs256.kid}, payload, key=a["rsa"]),
        ),
        Case("es256-kid/attacker-ec", "BAD_SIGNATURE", es_attacker({"kid": keys.es256.kid})),
        Case(
            "hmac-kid/attacker-secret",
            "BAD_SIGNATURE",
            craft({"alg": "HS256", "kid": "refresh-hmac"}, payload, key=a["hmac"]),
        ),
        Case(
            "hmac-kid/empty-secret",
            "BAD_SIGNATURE",
            craft({"alg": "HS256", "kid": "refresh-hmac"}, payload, key=b""),
        ),
        # Lookup strings: kids are dictionary keys, never paths or queries.
        Case("path-traversal", "KEY_NOT_FOUND", es_attacker({"kid": "../../dev/null"})),
        Case(
            "path-traversal/hs256-empty",
            "KEY_NOT_FOUND",
            craft({"alg": "HS256", "kid": "../../../../../../dev/null"}, payload, key=b""),
        ),
        Case("absolute-path", "KEY_NOT_FOUND", es_attacker({"kid": "/etc/passwd"})),
        Case("sql", "KEY_NOT_FOUND", es_attacker({"kid": "' OR 1=1 --"})),
        Case("sql-union", "KEY_NOT_FOUND", es_attacker({"kid": "x' UNION SELECT 'key"})),
        Case("empty-string", "KEY_NOT_FOUND", es_attacker({"kid": ""})),
        Case("very-long", "KEY_NOT_FOUND", es_attacker({"kid": "k" * 1000})),
        Case("real-kid-plus-space", "KEY_NOT_FOUND", es_attacker({"kid": keys.es256.kid + " "})),
        Case(
            "real-kid-uppercased",
            "KEY_NOT_FOUND",
            es_attacker({"kid": keys.es256.kid.upper() + "!"}),
        ),
        Case("nul-in-kid", "KEY_NOT_FOUND", es_attacker({"kid": keys.es256.kid + "\x00"})),
        Case("crlf-in-kid", "KEY_NOT_FOUND", es_attacker({"kid": "x\r\nx-auth-subject: root"})),
        # Not a string at all.
        Case("number", "TOKEN_MALFORMED", es_attacker({"kid": 1})),
        Case("object", "TOKEN_MALFORMED", es_attacker({"kid": {"kid": keys.es256.kid}})),
        Case("list", "TOKEN_MALFORMED", es_attacker({"kid": [keys.es256.kid]})),
        Case("bool", "TOKEN_MALFORMED", es_attacker({"kid": True})),
        # PyJWT refuses a kid that is present but not a string, null included.
        Case("null", "TOKEN_MALFORMED", es_attacker({"kid": None})),
    ]
    await assert_denied(proxy, backend, cases)


# --- duplicate JSON members --------------------------------------------------------------


async def test_duplicate_members_in_header_and_payload(
    proxy: RunningProxy, backend: EchoBackend, keys: Keys
):
    es = keys.es256
    kid = es.kid

    def es_signed(header: Any, payload: Any) -> str:
        return craft(header, payload, key=es.key, alg="ES256")

    cases = [
        Case(
            "header/alg-then-none",
            "TOKEN_MALFORMED",
            es_signed([("alg", "ES256"), ("kid", kid), ("alg", "none")], claims()),
        ),
        Case(
            "header/none-then-alg",
            "TOKEN_MALFORMED",
            es_signed([("alg", "none"), ("kid", kid), ("alg", "ES256")], claims()),
        ),
        Case(
            "header/two-kids",
            "TOKEN_MALFORMED",
            es_signed([("alg", "ES256"), ("kid", "attacker"), ("kid", kid)], claims()),
        ),
        Case("payload/sub", "TOKEN_MALFORMED", signed(es, [*pairs(), ("sub", "admin")])),
        Case(
            "payload/type-refresh-then-access",
            "TOKEN_MALFORMED",
            signed(es, [*pairs(type="refresh"), ("type", "access")]),
        ),
        Case(
            "payload/type-access-then-refresh",
            "TOKEN_MALFORMED",
            signed(es, [*pairs(), ("type", "refresh")]),
        ),
        Case(
            "payload/aud",
            "TOKEN_MALFORMED",
            signed(es, [*pairs(aud="elsewhere"), ("aud", "api-access")]),
        ),
        Case("payload/exp", "TOKEN_MALFORMED", signed(es, [*pairs(exp=1), ("exp", 99999999999)])),
        Case(
            "payload/roles",
            "TOKEN_MALFORMED",
            signed(es, [*pairs(roles=["user"]), ("roles", ["admin"])]),
        ),
        Case(
            "payload/nested",
            "TOKEN_MALFORMED",
            signed(es, [*pairs(), ("ctx", Raw('{"a":1,"a":2}'))]),
        ),
    ]
    await assert_denied(proxy, backend, cases)


# --- numeric claims ------------------------------------------------------------------------


async def test_time_claims_must_be_finite_numbers(
    proxy: RunningProxy, backend: EchoBackend, keys: Keys
):
    es = keys.es256
    cases = [
        Case("exp-string", "INVALID_CLAIM", signed(es, pairs(exp="9999999999"))),
        Case("nbf-string", "INVALID_CLAIM", signed(es, pairs(nbf="0"))),
        Case("iat-string", "INVALID_CLAIM", signed(es, pairs(iat="0"))),
        Case("exp-true", "INVALID_CLAIM", signed(es, pairs(exp=True))),
        Case("exp-false", "INVALID_CLAIM", signed(es, pairs(exp=False))),
        Case("nbf-true", "INVALID_CLAIM", signed(es, pairs(nbf=True))),
        Case("exp-list", "INVALID_CLAIM", signed(es, pairs(exp=[9999999999]))),
        Case("exp-object", "INVALID_CLAIM", signed(es, pairs(exp={"$numberLong": "9999999999"}))),
        Case("exp-null", "MISSING_CLAIM", signed(es, pairs(exp=Raw("null")))),
        Case("exp-missing", "MISSING_CLAIM", signed(es, claims(exp=None))),
        Case("exp-NaN", "TOKEN_MALFORMED", signed(es, pairs(exp=Raw("NaN")))),
        Case("exp-Infinity", "TOKEN_MALFORMED", signed(es, pairs(exp=Raw("Infinity")))),
        Case("nbf-minus-Infinity", "TOKEN_MALFORMED", signed(es, pairs(nbf=Raw("-Infinity")))),
        Case("exp-1e400", "INVALID_CLAIM", signed(es, pairs(exp=Raw("1e400")))),  # parses as inf
        Case("nbf-minus-1e400", "INVALID_CLAIM", signed(es, pairs(nbf=Raw("-1e400")))),
        Case("iat-1e400", "INVALID_CLAIM", signed(es, pairs(iat=Raw("1e400")))),
        Case("exp-5000-digits", "TOKEN_MALFORMED", signed(es, pairs(exp=Raw("9" * 5000)))),
    ]
    await assert_denied(proxy, backend, cases)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_time_claim_too_big_for_a_float_is_refused(
    proxy: RunningProxy, backend: EchoBackend, keys: Keys, claim
):
    """A 400-digit integer is valid JSON and a Python int, but not a float: INVALID_CLAIM.
    (At commit abcd4e4, `math.isfinite` raised OverflowError in proxy/keys/verify.py
    `_require_time` and the call ended UNKNOWN with the exception text.)"""
    token = signed(keys.es256, pairs(**{claim: Raw("9" * 400)}))
    await assert_denied(proxy, backend, [Case(claim, "INVALID_CLAIM", token)])
