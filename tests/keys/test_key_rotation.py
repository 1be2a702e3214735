"""Rotating signing keys, the issuer's side: `authproxy keygen --rotate` (new key, old public
keys kept published with a `retire_at`, keys past it pruned, files replaced atomically),
the admin listener publishing the loaded public keys (`/.well-known/jwks.json`,
`/public-key`), the example backend reloading its signing key, and the whole rotation end
to end through the real proxy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import pytest

from authproxy.cli import main as cli
from authproxy.keys import keygen as keygen_mod
from authproxy.keys.issuer import SigningKey, TokenIssuer, load_signing_key
from authproxy.keys.keygen import RETIRE_AT, keygen, rotate
from authproxy.keys.keyset import KeySet, load_jwks_file
from authproxy.policy.loader import parse_policy
from authproxy.runtime.admin import AdminServer
from authproxy.runtime.serve import ServeConfig
from authproxy.state import atomic_file
from authproxy.state.store import MemoryState
from examples.backend.api.v1 import api_pb2
from tests.support.example_backend import (
    PASSWORD,
    UNAUTH,
    Proxied,
    bearer,
    reason_of,
    rpc_error,
    running_behind_proxy,
    running_example,
)
from tests.support.keys import REFRESH_ENV, REFRESH_SECRET
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import running_proxy

DAY = 24 * 3600


def jwks_keys(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["keys"]


def header_kid(token: str) -> str:
    return jwt.get_unverified_header(token)["kid"]


def run_cli(*args: str) -> int:
    return cli.main(list(args))


def files(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "signing.pem", tmp_path / "jwks.json"


# --- keygen --rotate -------------------------------------------------------------------


def test_rotate_adds_a_key_and_the_old_one_retires_after_retire_after(tmp_path, capsys):
    pem, jwks = files(tmp_path)
    assert run_cli("keygen", "--private-key", str(pem), "--jwks", str(jwks)) == 0
    old = load_signing_key(pem)
    capsys.readouterr()

    before = time.time()
    assert run_cli(
        "keygen", "--rotate", "--retire-after", "2h", "--alg", "RS256",
        "--private-key", str(pem), "--jwks", str(jwks),
    ) == 0  # fmt: skip
    after = time.time()
    new = load_signing_key(pem)
    assert new.kid != old.kid and new.alg == "RS256"

    first, second = jwks_keys(jwks)  # the new key is the last one
    assert (first["kid"], second["kid"]) == (old.kid, new.kid)
    assert isinstance(first[RETIRE_AT], int)
    assert before + 2 * 3600 <= first[RETIRE_AT] <= after + 2 * 3600 + 1
    assert RETIRE_AT not in second
    assert not {"d", "p", "q"} & set(second)
    # Both still verify: the proxy's loader reads the file as before.
    assert {k.kid for k in load_jwks_file(str(jwks))} == {old.kid, new.kid}

    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"retiring {old.kid} at ") for line in out), out
    assert str(first[RETIRE_AT]) in "\n".join(out)
    assert new.kid in out[-1]


def test_rotate_defaults_to_retiring_after_24h_and_keeps_earlier_retire_times(tmp_path):
    pem, jwks = files(tmp_path)
    t0 = 1_800_000_000.0
    first = keygen("ES256", pem, jwks)
    second = rotate("ES256", pem, jwks, 3600, clock=lambda: t0).key
    result = rotate("EdDSA", pem, jwks, 7200, clock=lambda: t0 + 100)
    # Rotating again retires the second key; the first keeps the time it already had.
    assert result.retiring == [(second.kid, int(t0 + 100 + 7200))]
    assert result.still_retiring == [(first.kid, int(t0 + 3600))]
    assert [(k["kid"], k.get(RETIRE_AT)) for k in jwks_keys(jwks)] == [
        (first.kid, int(t0 + 3600)),
        (second.kid, int(t0 + 100 + 7200)),
        (result.key.kid, None),
    ]

    # From the command line, without --retire-after: 24 hours.
    before = time.time()
    assert run_cli("keygen", "--rotate", "--private-key", str(pem), "--jwks", str(jwks)) == 0
    retiring = {k["kid"]: k.get(RETIRE_AT) for k in jwks_keys(jwks)}
    assert before + DAY <= retiring[result.key.kid] <= time.time() + DAY + 1


def test_keys_past_retire_at_are_pruned_on_every_keygen_run(tmp_path, capsys):
    pem, jwks = files(tmp_path)
    t0 = 1_800_000_000.0
    first = keygen("ES256", pem, jwks)
    second = rotate("ES256", pem, jwks, 60, clock=lambda: t0).key
    # Before the retire time the old key stays; once it has passed, it is removed.
    third = rotate("ES256", pem, jwks, 60, clock=lambda: t0 + 59)
    assert third.pruned == [] and jwks_keys(jwks)[0]["kid"] == first.kid
    fourth = rotate("ES256", pem, jwks, 60, clock=lambda: t0 + 60)
    assert fourth.pruned == [(first.kid, int(t0 + 60))]
    assert [k["kid"] for k in jwks_keys(jwks)] == [second.kid, third.key.kid, fourth.key.kid]

    # A plain keygen (here: another key's file) prunes too, and says so.
    now = int(time.time())
    keys = jwks_keys(jwks)
    keys[0][RETIRE_AT] = now - 10  # second: past
    keys[1][RETIRE_AT] = now + 3600  # third: still published
    jwks.write_text(json.dumps({"keys": keys}))
    other = tmp_path / "other.pem"
    capsys.readouterr()
    assert run_cli("keygen", "--private-key", str(other), "--jwks", str(jwks)) == 0
    out = capsys.readouterr().out
    assert f"pruned {second.kid} from {jwks}" in out
    kids = [k["kid"] for k in jwks_keys(jwks)]
    assert kids == [third.key.kid, fourth.key.kid, load_signing_key(other).kid]


def test_files_are_replaced_atomically_and_the_key_stays_0600(tmp_path, monkeypatch):
    pem, jwks = files(tmp_path)
    assert run_cli("keygen", "--private-key", str(pem), "--jwks", str(jwks)) == 0
    pem.chmod(0o644)  # rotation tightens it again
    jwks.chmod(0o640)  # and keeps the JWKS's mode
    inodes = {pem: pem.stat().st_ino, jwks: jwks.stat().st_ino}

    replaced: list[tuple[Path, Path, int, bytes]] = []
    real_replace = os.replace

    def spy(src, dst):
        src, dst = Path(src), Path(dst)
        replaced.append((src, dst, stat.S_IMODE(src.stat().st_mode), src.read_bytes()))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_file.os, "replace", spy)
    assert run_cli("keygen", "--rotate", "--private-key", str(pem), "--jwks", str(jwks)) == 0

    # The JWKS first (the new public key is published before anything signs with it),
    # then the key; each a complete temporary file in the same directory, renamed.
    assert [dst for _, dst, _, _ in replaced] == [jwks, pem]
    for src, dst, mode, data in replaced:
        assert src.parent == dst.parent and src != dst
        assert data == dst.read_bytes()
        assert mode == (0o600 if dst == pem else 0o640)
    assert all(path.stat().st_ino != inode for path, inode in inodes.items())
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jwks.json", "signing.pem"]


def test_a_failed_write_leaves_the_old_files_and_no_temporary_file(tmp_path, monkeypatch):
    pem, jwks = files(tmp_path)
    keygen("ES256", pem, jwks)
    old_pem, old_jwks = pem.read_bytes(), jwks.read_bytes()

    def broken(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(atomic_file.os, "replace", broken)
    assert run_cli("keygen", "--rotate", "--private-key", str(pem), "--jwks", str(jwks)) == 2
    assert (pem.read_bytes(), jwks.read_bytes()) == (old_pem, old_jwks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jwks.json", "signing.pem"]


def test_keygen_refuses_to_overwrite_a_key_without_rotate_or_force(tmp_path, capsys):
    pem, jwks = files(tmp_path)
    keygen("ES256", pem, jwks)
    old_pem, old_jwks = pem.read_bytes(), jwks.read_bytes()

    assert run_cli("keygen", "--private-key", str(pem), "--jwks", str(jwks)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"authproxy: error: {pem} exists;") and "--rotate" in err
    assert "--force" in err and "Traceback" not in err
    assert (pem.read_bytes(), jwks.read_bytes()) == (old_pem, old_jwks)

    # --force overwrites (no rotation: nothing retires), and the key is 0600 again.
    pem.chmod(0o644)
    assert run_cli("keygen", "--force", "--private-key", str(pem), "--jwks", str(jwks)) == 0
    assert pem.read_bytes() != old_pem
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert [RETIRE_AT in k for k in jwks_keys(jwks)] == [False, False]


def test_rotate_without_an_existing_key_is_a_clear_error(tmp_path, capsys):
    pem, jwks = files(tmp_path)
    assert run_cli("keygen", "--rotate", "--private-key", str(pem), "--jwks", str(jwks)) == 2
    err = capsys.readouterr().err
    assert err.count("authproxy: error:") == 1
    assert f"{pem} does not exist" in err and "without --rotate" in err
    assert not pem.exists() and not jwks.exists()


def test_rotate_refuses_an_unreadable_key_a_used_kid_and_a_bad_retire_at(tmp_path, capsys):
    pem, jwks = files(tmp_path)
    key = keygen("ES256", pem, jwks, kid="main")
    args = ["--private-key", str(pem), "--jwks", str(jwks)]

    assert run_cli("keygen", "--rotate", "--kid", "main", *args) == 2
    assert "already has a key with kid 'main'" in capsys.readouterr().err

    keys = jwks_keys(jwks)
    keys[0][RETIRE_AT] = "tomorrow"
    jwks.write_text(json.dumps({"keys": keys}))
    assert run_cli("keygen", "--rotate", *args) == 2
    assert "'retire_at' must be a number" in capsys.readouterr().err
    jwks.write_text(json.dumps({"keys": [key.public_jwk()]}))

    pem.write_text("not a key")
    assert run_cli("keygen", "--rotate", *args) == 2
    assert "--force" in capsys.readouterr().err
    assert pem.read_text() == "not a key"


def test_flags_that_do_not_go_together(tmp_path, capsys):
    pem, jwks = files(tmp_path)
    keygen("ES256", pem, jwks)
    args = ["--private-key", str(pem), "--jwks", str(jwks)]
    assert run_cli("keygen", "--force", "--retire-after", "1h", *args) == 2
    assert "--retire-after applies only with --rotate" in capsys.readouterr().err
    for bad in (["--rotate", "--force"], ["--rotate", "--retire-after", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            run_cli("keygen", *bad, *args)
        assert exit_info.value.code == 2


def test_rotate_warns_when_the_current_key_is_not_published(tmp_path, capsys):
    pem, jwks = files(tmp_path)
    old = keygen("ES256", pem, tmp_path / "elsewhere.json")
    assert run_cli("keygen", "--rotate", "--private-key", str(pem), "--jwks", str(jwks)) == 0
    assert f"warning: the key {pem} held until now ({old.kid}) is not in {jwks}" in (
        capsys.readouterr().out
    )
    assert [k["kid"] for k in jwks_keys(jwks)] == [load_signing_key(pem).kid]


# --- the admin listener publishes keys ------------------------------------------------------


async def http(url: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, dict(response.headers), await response.read()


@asynccontextmanager
async def admin_of(tmp_path: Path, jwks: list[str], **fields: Any) -> AsyncIterator[str]:
    """A real proxy (ext_authz HTTP front end) with the admin listener; its base URL."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    os.environ[REFRESH_ENV] = REFRESH_SECRET.decode()
    cfg = ServeConfig(
        policy=str(policy),
        ext_authz_http="127.0.0.1:0",
        admin="127.0.0.1:0",
        jwks=jwks,
        hmac_secret_envs=[f"refresh-hmac={REFRESH_ENV}"],
        shutdown_grace=0.5,
        watch_policy=False,
        **fields,
    )
    async with running_proxy(cfg) as running:
        yield running.admin_base


def rotated_keys(tmp_path: Path) -> tuple[Path, SigningKey, SigningKey]:
    """A JWKS with an old ES256 key (retiring in an hour) and a new RS256 key."""
    pem, jwks = files(tmp_path)
    old = keygen("ES256", pem, jwks)
    return jwks, old, rotate("RS256", pem, jwks, 3600).key


def mint(key: SigningKey) -> str:
    issuer = TokenIssuer(parse_policy(TEST_POLICY), {"access": key})
    return issuer.mint("access", "alice", ttl=300).token


def decode_with(pem: bytes, token: str) -> dict[str, Any]:
    return jwt.decode(
        token, pem, algorithms=["ES256", "RS256", "EdDSA"], audience="api-access",
        issuer="test-issuer",
    )  # fmt: skip


async def test_jwks_endpoint_publishes_the_public_keys_the_proxy_loaded(tmp_path, monkeypatch):
    jwks, old, new = rotated_keys(tmp_path)
    monkeypatch.setenv("ROTATION_ADMIN_TOKEN", "rotation-admin-secret-0123456789")
    async with admin_of(tmp_path, [str(jwks)], admin_token_env="ROTATION_ADMIN_TOKEN") as base:
        # Open like /healthz although the revocation API needs a token here.
        status, headers, body = await http(f"{base}/.well-known/jwks.json")
        assert status == 200, body
        assert headers["Content-Type"].startswith("application/json")
        assert headers["Cache-Control"] == "public, max-age=300"
        published = json.loads(body)["keys"]
        assert [(k["kid"], k["alg"], k["use"]) for k in published] == [
            (old.kid, "ES256", "sig"),
            (new.kid, "RS256", "sig"),
        ]
        for jwk in published:  # public members only; no retire time; no HMAC secret
            assert not {"d", "p", "q", "dp", "dq", "qi", "k", RETIRE_AT} & set(jwk)
            assert jwk["kty"] in ("EC", "RSA")
        # What it publishes verifies tokens of both keys.
        verifier = KeySet(jwt_keys(published))
        assert {header_kid(mint(k)) for k in (old, new)} <= set(verifier.by_kid)


def jwt_keys(published: list[dict[str, Any]]) -> list[Any]:
    from authproxy.keys.keyset import key_from_jwk

    return [k for jwk in published if (k := key_from_jwk(jwk, "published"))]


async def test_public_key_endpoint_serves_the_newest_key_or_the_one_asked_for(tmp_path):
    jwks, old, new = rotated_keys(tmp_path)
    async with admin_of(tmp_path, [str(jwks)]) as base:
        status, headers, pem = await http(f"{base}/public-key")
        assert status == 200, pem
        assert headers["Content-Type"] == "application/x-pem-file"
        assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
        assert decode_with(pem, mint(new))["sub"] == "alice"
        stranger = SigningKey(new.kid, "RS256", keygen_mod.generate_private_key("RS256"))
        with pytest.raises(jwt.InvalidSignatureError):
            decode_with(pem, mint(stranger))

        status, _, old_pem = await http(f"{base}/public-key?kid={old.kid}")
        assert status == 200 and old_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
        assert decode_with(old_pem, mint(old))["sub"] == "alice"

        status, headers, body = await http(f"{base}/public-key?kid=nope")
        assert status == 404 and headers["Content-Type"].startswith("application/json")
        assert json.loads(body)["reason"] == "KEY_NOT_FOUND"
        assert "nope" in json.loads(body)["message"]
        # The HMAC secret is a key the proxy loaded, but never published.
        status, _, _ = await http(f"{base}/public-key?kid=refresh-hmac")
        assert status == 404


async def test_public_key_is_404_when_no_asymmetric_key_is_loaded(tmp_path):
    async with admin_of(tmp_path, []) as base:
        status, _, body = await http(f"{base}/.well-known/jwks.json")
        assert status == 200 and json.loads(body) == {"keys": []}
        status, headers, body = await http(f"{base}/public-key")
        assert status == 404 and headers["Content-Type"].startswith("application/json")
        assert json.loads(body)["reason"] == "KEY_NOT_FOUND"


class FakeStatus:
    def __init__(self, keys: list[Any]) -> None:
        self.keys = keys

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        return True, {}

    def policy_status(self) -> dict[str, Any]:
        return {}

    def metrics(self) -> bytes:
        return b""

    def published_jwks(self) -> dict[str, Any]:
        return {"keys": self.keys}


async def test_the_admin_listener_never_publishes_secrets_or_retire_times(tmp_path):
    _, old, new = rotated_keys(tmp_path)
    public = {**old.public_jwk(), RETIRE_AT: 123}  # type: ignore[dict-item]
    leaky = {**new.public_jwk(), "d": "secret"}  # type: ignore[dict-item]
    secret = {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}
    admin = AdminServer(MemoryState(), "127.0.0.1:0", status=FakeStatus([public, leaky, secret]))
    await admin.start()
    try:
        base = f"http://127.0.0.1:{admin.port}"
        _, _, body = await http(f"{base}/.well-known/jwks.json")
        assert json.loads(body) == {"keys": [old.public_jwk()]}
        status, _, pem = await http(f"{base}/public-key")  # the newest *public* key
        assert status == 200 and decode_with(pem, mint(old))["sub"] == "alice"
        for kid in (new.kid, "hmac"):
            assert (await http(f"{base}/public-key?kid={kid}"))[0] == 404
    finally:
        await admin.stop()


# --- the example backend reloads its signing key --------------------------------------------


async def value(read: Callable[[], Any]) -> Any:
    return read()


async def until(probe: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], within: float):
    """Call `probe()` until `ok(result)`; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if ok(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s; last: {result!r}")
        await asyncio.sleep(0.05)


async def test_the_example_backend_signs_with_a_rotated_key_and_keeps_it_on_a_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, "examples.backend.keys")
    pem, jwks = files(tmp_path)
    async with running_example(tmp_path, signing_key_path=str(pem)) as example:
        reload = example.backend.signing_key_reload
        assert reload is not None
        await until(lambda: value(lambda: reload._seen), lambda seen: seen is not None, 5)
        await example.signup("kim@example.com", enable_2fa=True)
        await example.signup("lee@example.com")
        old = load_signing_key(pem)

        async def kids() -> tuple[str, str]:
            two_fa = await example.login("kim@example.com")
            access = await example.login("lee@example.com")
            return header_kid(two_fa.temp_token), header_kid(access.access_token)

        assert await kids() == (old.kid, old.kid)
        assert run_cli("keygen", "--rotate", "--private-key", str(pem), "--jwks", str(jwks)) == 0
        new = load_signing_key(pem)
        await until(kids, lambda k: k == (new.kid, new.kid), 5)
        token = (await example.login("lee@example.com")).access_token
        (jwk,) = [k for k in jwks_keys(jwks) if k["kid"] == new.kid]
        verified = jwt.decode(
            token, jwt.PyJWK(jwk).key, algorithms=["ES256"], audience="api-access"
        )
        assert verified["sub"]

        # A bad file: the old key stays, one error line however often the directory stirs.
        caplog.clear()
        (tmp_path / "scratch").write_bytes(b"-----BEGIN PRIVATE KEY-----\nhalf")
        os.replace(tmp_path / "scratch", pem)
        await until(lambda: value(lambda: reload.errors), lambda n: n == 1, 5)
        for i in range(3):
            (tmp_path / f"unrelated-{i}").write_text("x")
            await asyncio.sleep(0.3)
        assert await kids() == (new.kid, new.kid)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and reload.errors == 1, errors
        message = errors[0].getMessage()
        assert str(pem) in message and f"still signing with kid {new.kid}" in message

        # A good key again is picked up.
        newer = keygen("EdDSA", tmp_path / "newer.pem", tmp_path / "other-jwks.json")
        os.replace(tmp_path / "newer.pem", pem)
        await until(kids, lambda k: k == (newer.kid, newer.kid), 5)


# --- end to end: rotate while the proxy and the backend run ---------------------------------


async def profile_or_reason(p: Proxied, token: str) -> str:
    try:
        await p.users.GetProfile(api_pb2.GetProfileRequest(), metadata=bearer(token))
    except grpc.aio.AioRpcError as e:
        return f"{e.code().name}/{reason_of(e)}"
    return "OK"


async def test_rotation_end_to_end_old_tokens_work_until_the_old_key_retires(tmp_path: Path):
    pem, jwks = files(tmp_path)
    async with running_behind_proxy(tmp_path, signing_key_path=str(pem)) as p:
        _, login = await p.account("rotating@example.com")
        old_kid = load_signing_key(pem).kid
        token_a = login.access_token
        assert header_kid(token_a) == old_kid
        assert await profile_or_reason(p, token_a) == "OK"

        args = ["--private-key", str(pem), "--jwks", str(jwks), "--retire-after", "3s"]
        assert run_cli("keygen", "--rotate", *args) == 0
        new_kid = load_signing_key(pem).kid
        retire_at = next(k[RETIRE_AT] for k in jwks_keys(jwks) if k["kid"] == old_kid)
        assert await profile_or_reason(p, token_a) == "OK"  # right after the rotation

        # The backend signs with the new key, and the proxy accepts it.
        async def new_token() -> tuple[str, str]:
            token = (await p.login("rotating@example.com", PASSWORD)).access_token
            if header_kid(token) != new_kid:
                return token, "old kid"
            return token, await profile_or_reason(p, token)

        token_b, _ = await until(new_token, lambda r: r[1] == "OK", 10)
        if time.time() < retire_at - 0.5:
            assert await profile_or_reason(p, token_a) == "OK"

        # Until retire_at A is accepted; after it, A is refused and B still works.
        async def a_state() -> tuple[float, str]:
            return time.time(), await profile_or_reason(p, token_a)

        at, state = await until(a_state, lambda r: r[1] != "OK", retire_at - time.time() + 5)
        assert state == f"{UNAUTH.name}/KEY_NOT_FOUND"
        assert at >= retire_at - 0.5, (at, retire_at)
        assert await profile_or_reason(p, token_b) == "OK"
        error = await rpc_error(
            p.users.GetProfile(api_pb2.GetProfileRequest(), metadata=bearer(token_a))
        )
        assert error.code() == UNAUTH and reason_of(error) == "KEY_NOT_FOUND"
