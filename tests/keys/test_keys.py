"""Verification keys: JWKS/PEM/HMAC sources, per-key algorithm allowlists, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from authproxy.decide.reasons import Denied, Reason
from authproxy.keys.keyset import (
    RSA_ALGS,
    KeyLoadError,
    KeySet,
    b64url,
    hmac_key,
    jwk_thumbprint,
    key_from_jwk,
    keys_from_jwks,
    load_hmac_env,
    load_jwks_file,
    load_pem_public_key,
    public_jwk,
    split_kid,
)
from authproxy.keys.verify import TokenVerifier
from tests.support.tokens import ec_key, ed_key, rsa_key, sign_raw

#: RFC 7638 section 3.1: the example RSA key and its SHA-256 thumbprint.
RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FD"
        "W2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4v"
        "MQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def rsa_jwk(**extra: Any) -> dict[str, Any]:
    return {**public_jwk(rsa_key().public_key()), **extra}


def ec_jwk(curve: ec.EllipticCurve | None = None, **extra: Any) -> dict[str, Any]:
    key = ec_key() if curve is None else ec.generate_private_key(curve)
    return {**public_jwk(key.public_key()), **extra}


def ed_jwk(**extra: Any) -> dict[str, Any]:
    return {**public_jwk(ed_key().public_key()), **extra}


def oct_jwk(size: int, **extra: Any) -> dict[str, Any]:
    return {"kty": "oct", "k": b64url(b"s" * size), **extra}


def algs(jwk: dict[str, Any]) -> set[str]:
    key = key_from_jwk(jwk, "keys.json")
    assert key is not None
    return set(key.algorithms)


def write_json(path: Path, doc: Any) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


# --- algorithm allowlists ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: rsa_jwk(kid="r"), set(RSA_ALGS)),
        (lambda: ec_jwk(kid="e"), {"ES256"}),
        (lambda: ec_jwk(ec.SECP384R1(), kid="e"), {"ES384"}),
        (lambda: ed_jwk(kid="d"), {"EdDSA"}),
        (lambda: oct_jwk(32, kid="h"), {"HS256"}),
        (lambda: oct_jwk(48, kid="h"), {"HS256", "HS384"}),
        (lambda: oct_jwk(64, kid="h"), {"HS256", "HS384", "HS512"}),
        (lambda: rsa_jwk(kid="r", alg="PS256"), {"PS256"}),
        (lambda: oct_jwk(64, kid="h", alg="HS384"), {"HS384"}),
        (lambda: ec_jwk(kid="e", alg="ES256"), {"ES256"}),
    ],
    ids=[
        "rsa",
        "p256",
        "p384",
        "ed25519",
        "oct32",
        "oct48",
        "oct64",
        "rsa-ps256",
        "oct-hs384",
        "ec-alg",
    ],
)
def test_algorithms_follow_the_key(make: Any, expected: set[str]) -> None:
    allowed = algs(make())
    assert allowed == expected
    assert not {a for a in allowed if a.lower() == "none"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: rsa_jwk(kid="r", alg="ES256"),
        lambda: rsa_jwk(kid="r", alg="HS256"),
        lambda: rsa_jwk(kid="r", alg="none"),
        lambda: ec_jwk(kid="e", alg="RS256"),
        lambda: ec_jwk(kid="e", alg="ES384"),
        lambda: ed_jwk(kid="d", alg="ES256"),
        lambda: oct_jwk(32, kid="h", alg="HS512"),
        lambda: oct_jwk(64, kid="h", alg="RS256"),
        lambda: rsa_jwk(kid="r", alg=256),
    ],
    ids=[
        "rsa-es",
        "rsa-hs",
        "rsa-none",
        "ec-rs",
        "p256-es384",
        "ed-es",
        "oct32-hs512",
        "oct-rs",
        "alg-number",
    ],
)
def test_declared_alg_incompatible_with_key(make: Any) -> None:
    with pytest.raises(KeyLoadError, match=r"^keys\.json \(kid '\w'\): 'alg'"):
        key_from_jwk(make(), "keys.json")


# --- skipped and refused keys ------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [{"use": "enc"}, {"key_ops": ["encrypt"]}, {"key_ops": ["sign"]}, {"key_ops": "verify"}],
    ids=["use-enc", "ops-encrypt", "ops-sign", "ops-not-list"],
)
def test_keys_not_for_verification_are_skipped(tmp_path: Path, extra: dict[str, Any]) -> None:
    path = write_json(
        tmp_path / "jwks.json", {"keys": [ec_jwk(kid="skip", **extra), ed_jwk(kid="keep")]}
    )
    assert [k.kid for k in load_jwks_file(path)] == ["keep"]


def test_keys_for_verification_are_kept() -> None:
    assert algs(ec_jwk(kid="e", use="sig", key_ops=["verify", "sign"])) == {"ES256"}


def test_small_rsa_key_is_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(KeyLoadError, match="1024 bits"):
        key_from_jwk({**public_jwk(small.public_key()), "kid": "small"}, "keys.json")


@pytest.mark.parametrize("size", [0, 16, 31])
def test_short_hmac_secret_is_refused(size: int) -> None:
    with pytest.raises(KeyLoadError, match=f"HMAC secret has {size} bytes"):
        key_from_jwk(oct_jwk(size, kid="h"), "keys.json")
    with pytest.raises(KeyLoadError, match="at least 32"):
        hmac_key(b"x" * size, "h", "$SECRET")


def rsa_private_jwk(**extra: Any) -> dict[str, Any]:
    """The full private JWK of the test RSA key, as PyJWT exports it (`key_ops: [sign]`)."""
    jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key()))
    assert "d" in jwk
    return {**jwk, **extra}


@pytest.mark.parametrize(
    "jwk",
    [
        lambda: {k: v for k, v in rsa_private_jwk(kid="r").items() if k != "key_ops"},
        lambda: ec_jwk(kid="e", d="AAAA"),
        lambda: ed_jwk(kid="d", d="AAAA"),
        lambda: rsa_jwk(kid="r", p="AAAA"),
    ],
    ids=["rsa-full", "ec-d", "okp-d", "rsa-p"],
)
def test_private_key_material_is_refused(tmp_path: Path, jwk: Any) -> None:
    path = write_json(tmp_path / "jwks.json", {"keys": [jwk()]})
    with pytest.raises(KeyLoadError, match="private key material") as info:
        load_jwks_file(path)
    assert str(info.value).startswith(f"{path}[0]")


@pytest.mark.parametrize("extra", [{}, {"use": "enc"}], ids=["as-exported", "use-enc"])
def test_private_key_material_is_refused_even_when_not_for_verification(
    tmp_path: Path, extra: dict[str, Any]
) -> None:
    # A private JWK as PyJWT exports it carries `key_ops: ["sign"]`; it must still be refused
    # (the README: "Refused at startup: ... private key material in a JWKS"), not skipped.
    path = write_json(tmp_path / "jwks.json", {"keys": [rsa_private_jwk(kid="r", **extra)]})
    with pytest.raises(KeyLoadError, match="private key material"):
        load_jwks_file(path)


def test_duplicate_kid_across_sources(tmp_path: Path) -> None:
    a = write_json(tmp_path / "a.json", {"keys": [ec_jwk(kid="same")]})
    b = write_json(tmp_path / "b.json", {"keys": [ed_jwk(kid="same")]})
    with pytest.raises(KeyLoadError) as info:
        KeySet(load_jwks_file(a) + load_jwks_file(b))
    message = str(info.value)
    assert "'same'" in message and "a.json" in message and "b.json" in message


def test_duplicate_kid_between_jwks_and_hmac(tmp_path: Path) -> None:
    a = write_json(tmp_path / "a.json", {"keys": [ec_jwk(kid="k1")]})
    with pytest.raises(KeyLoadError, match="'k1'"):
        KeySet([*load_jwks_file(a), hmac_key(b"s" * 32, "k1", "$K1")])


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", "not a valid JSON document"),
        (b'{"keys": [], "keys": []}', "duplicate key 'keys'"),
        (b'{"keys": [{"kty": "OKP", "kty": "oct", "crv": "Ed25519", "x": "AA"}]}', "duplicate"),
        (b"\xff\xfe", "not a valid JSON document"),
        (b"[]", "expected a JWKS"),
        (b'{"keys": {}}', "'keys' must be a list"),
        (b'{"keys": [1]}', "must be a JSON object"),
        (b'{"keys": [{"kty": "XYZ"}]}', "unsupported key type"),
        (b'{"keys": [{"kty": "EC", "crv": "P-999", "x": "A", "y": "A", "kid": "k"}]}', "curve"),
        (b'{"keys": [{"kty": "RSA", "kid": 5}]}', "'kid' must be a non-empty string"),
        (b'{"keys": [{"kty": "RSA", "kid": "k", "n": "AQAB", "e": "AQAB"}]}', "'k'"),
        (b'{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "k"}]}', "invalid"),
    ],
    ids=[
        "garbage",
        "dup-top",
        "dup-in-key",
        "not-utf8",
        "array",
        "keys-object",
        "key-number",
        "kty",
        "curve",
        "kid-number",
        "rsa-tiny",
        "ec-off-curve",
    ],
)
def test_bad_jwks_names_the_file(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(content)
    with pytest.raises(KeyLoadError) as info:
        load_jwks_file(str(path))
    assert str(info.value).startswith(str(path))
    assert words in str(info.value)


def test_missing_jwks_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.json")
    with pytest.raises(KeyLoadError, match="cannot read JWKS") as info:
        load_jwks_file(path)
    assert str(info.value).startswith(path)


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "RSA", "e": "AQAB"},
        {"kty": "EC", "crv": "P-256", "y": "AA"},
        {"kty": "OKP", "crv": "Ed25519"},
        {"kty": "oct"},
    ],
    ids=["rsa-no-n", "ec-no-x", "okp-no-x", "oct-no-k"],
)
def test_incomplete_jwk_without_kid_is_a_key_load_error(tmp_path: Path, jwk: Any) -> None:
    # Without a kid, the loader computes the RFC 7638 thumbprint, which needs these members.
    path = write_json(tmp_path / "jwks.json", {"keys": [jwk]})
    with pytest.raises(KeyLoadError) as info:
        load_jwks_file(path)
    assert str(info.value).startswith(path)


# --- kid, PEM, HMAC env ------------------------------------------------------------------


def test_rfc7638_thumbprint() -> None:
    assert jwk_thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT
    without_kid = {k: v for k, v in RFC7638_JWK.items() if k != "kid"}
    key = key_from_jwk(without_kid, "rfc.json")
    assert key is not None and key.kid == RFC7638_THUMBPRINT
    assert set(key.algorithms) == {"RS256"}


def test_kid_defaults_to_thumbprint_in_a_jwks(tmp_path: Path) -> None:
    jwk = ec_jwk()
    path = write_json(tmp_path / "jwks.json", jwk)  # a single JWK is accepted too
    (key,) = load_jwks_file(path)
    assert key.kid == jwk_thumbprint(jwk)
    assert key.source == f"{path}[0]"


@pytest.mark.parametrize("make", [rsa_key, ec_key, ed_key], ids=["rsa", "ec", "ed25519"])
def test_pem_public_key(tmp_path: Path, make: Any) -> None:
    public = make().public_key()
    path = tmp_path / "pub.pem"
    path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    key = load_pem_public_key(str(path))
    assert key.kid == jwk_thumbprint(public_jwk(public))
    assert key.source == str(path)
    assert set(key.algorithms) == algs({**public_jwk(public), "kid": "x"})
    assert load_pem_public_key(str(path), "named").kid == "named"


def test_pem_public_key_verifies_tokens(tmp_path: Path) -> None:
    path = tmp_path / "pub.pem"
    path.write_bytes(
        ec_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    verifier = TokenVerifier(KeySet([load_pem_public_key(str(path), "pem")]))
    good = sign_raw({"alg": "ES256", "kid": "pem"}, {"exp": 2**40}, ec_key(), "ES256")
    assert verifier.signature(good).kid == "pem"
    with pytest.raises(Denied) as info:
        verifier.signature(sign_raw({"alg": "HS256", "kid": "pem"}, {"exp": 1}, b"k" * 32, "HS256"))
    assert info.value.reason == Reason.ALGORITHM_NOT_ALLOWED


def test_pem_private_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "private.pem"
    path.write_bytes(
        ec_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyLoadError, match="private key") as info:
        load_pem_public_key(str(path))
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("content", "words"), [(None, "cannot read"), (b"not a pem", "not a PEM public key")]
)
def test_bad_pem_names_the_file(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "pub.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KeyLoadError, match=words) as info:
        load_pem_public_key(str(path))
    assert str(info.value).startswith(str(path))


def test_hmac_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_REFRESH_SECRET", "x" * 40)
    key = load_hmac_env("TEST_REFRESH_SECRET", "refresh-hmac")
    assert (key.kid, key.kty, key.source) == ("refresh-hmac", "oct", "$TEST_REFRESH_SECRET")
    assert set(key.algorithms) == {"HS256"}
    assert load_hmac_env("TEST_REFRESH_SECRET").kid == "TEST_REFRESH_SECRET"


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_hmac_env_missing(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    monkeypatch.delenv("TEST_NO_SECRET", raising=False)
    if value is not None:
        monkeypatch.setenv("TEST_NO_SECRET", value)
    with pytest.raises(KeyLoadError, match="TEST_NO_SECRET"):
        load_hmac_env("TEST_NO_SECRET")


def test_hmac_env_too_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_SHORT_SECRET", "x" * 31)
    with pytest.raises(KeyLoadError, match=r"^\$TEST_SHORT_SECRET.*31 bytes"):
        load_hmac_env("TEST_SHORT_SECRET")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("kid=path.pem", ("kid", "path.pem")),
        ("path.pem", (None, "path.pem")),
        ("refresh-hmac=REFRESH_SECRET", ("refresh-hmac", "REFRESH_SECRET")),
        ("a=b=c", ("a", "b=c")),
        ("=path", (None, "=path")),
        ("kid=", (None, "kid=")),
    ],
)
def test_split_kid(spec: str, expected: tuple[str | None, str]) -> None:
    assert split_kid(spec) == expected


def _ec_jwk(kid: str) -> dict:
    return {**public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()), "kid": kid}


def test_a_remote_set_never_yields_a_symmetric_key() -> None:
    """An `oct` key in a published key set is a secret everyone can read: a token signed
    with it proves nothing, so remote sets skip it (local files may hold HMAC keys)."""
    doc = {"keys": [{"kty": "oct", "k": b64url(b"s" * 32), "kid": "shared"}, _ec_jwk("ec")]}
    data = json.dumps(doc).encode()
    remote = keys_from_jwks(data, "https://idp/jwks", strict=False)
    assert [k.kid for k in remote] == ["ec"]
    local = keys_from_jwks(data, "jwks.json", strict=True)
    assert sorted(k.kid for k in local) == ["ec", "shared"]


def test_a_remote_set_skips_unusable_keys_but_needs_one_usable() -> None:
    private = {**_ec_jwk("leaky"), "d": "AAAA"}
    data = json.dumps({"keys": [private, {"kty": "XYZ"}, _ec_jwk("good")]}).encode()
    assert [k.kid for k in keys_from_jwks(data, "https://idp/jwks", strict=False)] == ["good"]
    with pytest.raises(KeyLoadError, match="contains private key material"):
        keys_from_jwks(data, "jwks.json", strict=True)
    only_bad = json.dumps({"keys": [private]}).encode()
    with pytest.raises(KeyLoadError, match="no usable verification key"):
        keys_from_jwks(only_bad, "https://idp/jwks", strict=False)


def test_retire_at_must_be_a_number() -> None:
    with pytest.raises(KeyLoadError, match="'retire_at' must be a number"):
        key_from_jwk({**_ec_jwk("k"), "retire_at": "tomorrow"}, "jwks.json")
    assert key_from_jwk({**_ec_jwk("k"), "retire_at": 5}, "jwks.json").retire_at == 5.0
