"""The `authproxy` command, run as a real subprocess (`python -m authproxy ...`)."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from authproxy.decide.pipeline import Authorizer
from authproxy.keys.issuer import load_signing_key
from authproxy.keys.keyset import KeySet, hmac_key, jwk_thumbprint, load_jwks_file
from authproxy.keys.verify import TokenVerifier
from authproxy.policy.loader import load_policy
from tests.support.cli import ADDRESSES, POLICY, SECRET, assert_config_error, authproxy, serve

REPO = Path(__file__).resolve().parents[2]


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return authproxy(*args, cwd=cwd, env=env)


def test_version_names_the_installed_package(tmp_path: Path) -> None:
    from importlib.metadata import version

    result = run("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"authproxy {version('authproxy')}"


# --- policy check -------------------------------------------------------------------------


def test_policy_check_ok(tmp_path: Path) -> None:
    result = run("policy", "check", POLICY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{POLICY}: OK (version ")


def test_policy_check_reports_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmethods:\n  /a.B/C: public\n  /a.B/D: acess\n  nope: deny\n")
    result = run("policy", "check", str(bad), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{bad}:4: unknown level 'acess'")
    assert lines[1].startswith(f"{bad}:5: malformed method name 'nope'")
    assert result.stdout == ""


def test_policy_check_missing_file(tmp_path: Path) -> None:
    result = run("policy", "check", "absent.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("absent.yaml: cannot read policy")


# --- keygen ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_keygen(tmp_path: Path, alg: str) -> None:
    pem, jwks = tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "jwks.json"
    result = run(
        "keygen", "--alg", alg, "--private-key", str(pem), "--jwks", str(jwks), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in pem.read_bytes()
    signing = load_signing_key(pem)
    (jwk,) = json.loads(jwks.read_text())["keys"]
    assert (jwk["alg"], jwk["use"]) == (alg, "sig")
    assert jwk["kid"] == signing.kid == jwk_thumbprint(jwk)
    assert not {"d", "p", "q"} & set(jwk)
    (key,) = load_jwks_file(str(jwks))
    assert (key.kid, set(key.algorithms)) == (jwk["kid"], {alg})
    assert jwk["kid"] in result.stdout


def test_keygen_adds_to_jwks_and_tightens_mode(tmp_path: Path) -> None:
    pem, jwks = tmp_path / "k.pem", tmp_path / "jwks.json"
    pem.write_text("old")
    pem.chmod(0o644)
    for kid in ("one", "two"):
        args = ["keygen", "--private-key", str(pem), "--jwks", str(jwks), "--kid", kid, "--force"]
        assert run(*args, cwd=tmp_path).returncode == 0
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert [k.kid for k in load_jwks_file(str(jwks))] == ["one", "two"]


# --- token mint -------------------------------------------------------------------------------


def mint(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = run("token", "mint", "--policy", POLICY, *args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def signing_key(tmp_path: Path) -> tuple[Path, Path]:
    pem, jwks = tmp_path / "signing.pem", tmp_path / "jwks.json"
    args = ["keygen", "--alg", "ES256", "--private-key", str(pem), "--jwks", str(jwks)]
    assert run(*args, cwd=tmp_path).returncode == 0
    return pem, jwks


async def test_minted_access_token_is_accepted(
    tmp_path: Path, signing_key: tuple[Path, Path]
) -> None:
    pem, jwks = signing_key
    tok = mint(
        tmp_path, "--type", "access", "--sub", "alice", "--roles", "admin,ops", "--key", str(pem)
    )
    policy = load_policy(POLICY)
    verifier = TokenVerifier(KeySet(load_jwks_file(str(jwks))))
    verified = verifier.verify(tok, policy.tokens["access"], policy)
    assert verified.kid == json.loads(jwks.read_text())["keys"][0]["kid"]
    spec = policy.tokens["access"]
    assert verified.claims[spec.type_claim] == spec.type
    assert verified.claims["aud"] in spec.audiences
    assert verified.claims["iss"] in spec.issuers
    assert verified.claims["sub"] == "alice"
    assert verified.claims["roles"] == ["admin", "ops"]
    auth = Authorizer(policy, verifier)
    decision = await auth.decide(
        "/api.v1.UserService/ListUsers", [("authorization", f"Bearer {tok}")]
    )
    assert decision.allowed, decision.message
    assert dict(decision.identity.headers)["x-auth-roles"] == "admin,ops"


def test_mint_with_the_kid_given_to_keygen(tmp_path: Path) -> None:
    pem, jwks = tmp_path / "k.pem", tmp_path / "jwks.json"
    args = ["keygen", "--alg", "EdDSA", "--private-key", str(pem), "--jwks", str(jwks)]
    assert run(*args, "--kid", "main", cwd=tmp_path).returncode == 0
    tok = mint(tmp_path, "--type", "access", "--sub", "a", "--key", str(pem), "--kid", "main")
    policy = load_policy(POLICY)
    verifier = TokenVerifier(KeySet(load_jwks_file(str(jwks))))
    verified = verifier.verify(tok, policy.tokens["access"], policy)
    assert (verified.kid, verified.alg) == ("main", "EdDSA")


def test_mint_by_token_type_name(tmp_path: Path, signing_key: tuple[Path, Path]) -> None:
    pem, jwks = signing_key
    tok = mint(tmp_path, "--type", "2fa_pending", "--sub", "bob", "--ttl", "2m", "--key", str(pem))
    policy = load_policy(POLICY)
    verified = TokenVerifier(KeySet(load_jwks_file(str(jwks)))).verify(
        tok, policy.tokens["2fa"], policy
    )
    assert verified.claims["aud"] in policy.tokens["2fa"].audiences
    assert verified.claims["exp"] - verified.claims["iat"] == 120


def test_mint_refresh_with_hmac_secret_env(tmp_path: Path) -> None:
    env = {"CLI_REFRESH_SECRET": SECRET}
    tok = mint(
        tmp_path,
        "--type",
        "refresh",
        "--sub",
        "alice",
        "--hmac-secret-env",
        "refresh-hmac=CLI_REFRESH_SECRET",
        env=env,
    )
    policy = load_policy(POLICY)
    keys = KeySet([hmac_key(SECRET.encode(), "refresh-hmac", "$CLI_REFRESH_SECRET")])
    verified = TokenVerifier(keys).verify(tok, policy.tokens["refresh"], policy)
    assert (verified.kid, verified.alg) == ("refresh-hmac", "HS256")
    assert verified.claims["type"] == policy.tokens["refresh"].type


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--type", "admin", "--sub", "a", "--hmac-secret-env", "E"], "not a token level"),
        (["--type", "access", "--sub", "a"], "exactly one of --key"),
        (["--type", "access", "--sub", "a", "--hmac-secret-env", "CLI_UNSET"], "CLI_UNSET"),
        (["--type", "access", "--sub", "a", "--key", "nope.pem"], "nope.pem"),
        (["--type", "access", "--sub", "a", "--ttl", "soon", "--key", "k"], "--ttl"),
    ],
    ids=["unknown-type", "no-key", "unset-env", "missing-pem", "bad-ttl"],
)
def test_mint_errors(tmp_path: Path, args: list[str], words: str) -> None:
    result = run("token", "mint", "--policy", POLICY, *args, cwd=tmp_path)
    assert_config_error(result, words)


# --- serve: configuration errors before listening ---------------------------------------------


@pytest.fixture
def jwks(tmp_path: Path, signing_key: tuple[Path, Path]) -> str:
    return str(signing_key[1])


def test_serve_bad_policy(tmp_path: Path, jwks: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ncolour: blue\nleeway: 1h\n")
    result = serve(tmp_path, "--policy", str(bad), "--jwks", jwks, *ADDRESSES)
    line = assert_config_error(result, f"{bad}:3:")
    assert line.startswith(f"authproxy: error: {bad}:2: unknown top-level key 'colour'")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--jwks", "absent.json"], "absent.json: cannot read JWKS"),
        (["--jwks", "{jwks}"], "refresh-hmac"),  # tokens.refresh names a key nobody has
        ([], "no verification keys configured"),
        (["--jwks", "{jwks}", "--hmac-secret-env", "refresh-hmac=CLI_UNSET"], "CLI_UNSET"),
        (["--jwks", "{jwks}", "--public-key", "k=absent.pem"], "absent.pem"),
    ],
    ids=["missing-jwks", "missing-level-key", "no-keys", "unset-env", "missing-pem"],
)
def test_serve_key_errors(tmp_path: Path, jwks: str, args: list[str], words: str) -> None:
    args = [a.replace("{jwks}", jwks) for a in args]
    result = serve(tmp_path, "--policy", POLICY, *args, *ADDRESSES)
    assert_config_error(result, words)


def test_serve_incomplete_jwk_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "y": "AA"}]}))
    result = serve(tmp_path, "--policy", POLICY, "--jwks", str(broken), *ADDRESSES)
    assert_config_error(result, str(broken))


KEYS = ["--hmac-secret-env", "refresh-hmac=CLI_REFRESH_SECRET"]


def serve_with(
    tmp_path: Path, jwks: str, flag: str, value: str, via_env: bool
) -> subprocess.CompletedProcess[str]:
    """serve with valid options except `flag`, given as a flag or as AUTHPROXY_<FLAG>."""
    options = {"--policy": POLICY, "--listen": "127.0.0.1:0", "--upstream": "127.0.0.1:1"}
    options.pop(flag, None)
    args = [a for item in options.items() for a in item] + ["--jwks", jwks, *KEYS]
    if via_env:
        return serve(
            tmp_path, *args, env={"AUTHPROXY_" + flag[2:].replace("-", "_").upper(): value}
        )
    return serve(tmp_path, *args, flag, value)


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--upstream", "bad", "--upstream 'bad' is not HOST:PORT"),
        ("--upstream", "host:99999", "is not HOST:PORT"),
        ("--listen", "nope", "--listen 'nope' is not HOST:PORT"),
        ("--listen", ":8080", "is not HOST:PORT"),
        ("--policy", "absent.yaml", "absent.yaml: cannot read policy"),
        ("--log-level", "chatty", "invalid choice: 'chatty' (choose from debug, info,"),
    ],
)
def test_serve_flag_and_env_give_the_same_error(
    tmp_path: Path, jwks: str, flag: str, value: str, words: str
) -> None:
    by_flag = assert_config_error(serve_with(tmp_path, jwks, flag, value, False), words)
    by_env = assert_config_error(serve_with(tmp_path, jwks, flag, value, True), words)
    assert by_env == by_flag


@pytest.mark.parametrize("flag", ["--token-cache-size", "--max-message-bytes", "--shutdown-grace"])
@pytest.mark.parametrize("via_env", [False, True], ids=["flag", "env"])
def test_serve_bad_number_is_a_config_error(
    tmp_path: Path, jwks: str, flag: str, via_env: bool
) -> None:
    assert_config_error(serve_with(tmp_path, jwks, flag, "abc", via_env), "'abc'")


def test_serve_listen_without_upstream_is_a_config_error(tmp_path: Path, jwks: str) -> None:
    result = serve(tmp_path, "--policy", POLICY, "--jwks", jwks, *KEYS, "--listen", "127.0.0.1:0")
    assert_config_error(result, "--listen is the sidecar's listener: it needs --upstream")


def test_serve_with_no_front_end_is_a_config_error(tmp_path: Path, jwks: str) -> None:
    result = serve(tmp_path, "--policy", POLICY, "--jwks", jwks, *KEYS)
    assert_config_error(result, "nothing to serve")


def test_serve_bad_ext_authz_address_is_a_config_error(tmp_path: Path, jwks: str) -> None:
    result = serve(tmp_path, "--policy", POLICY, "--jwks", jwks, *KEYS, "--ext-authz-grpc", "nope")
    assert_config_error(result, "--ext-authz-grpc 'nope' is not HOST:PORT")


def test_serve_bad_http_path_prefix_is_a_config_error(tmp_path: Path, jwks: str) -> None:
    result = serve(
        tmp_path,
        "--policy",
        POLICY,
        "--jwks",
        jwks,
        *KEYS,
        "--ext-authz-http",
        "127.0.0.1:0",
        "--ext-authz-http-path-prefix",
        "check/",
    )
    assert_config_error(result, "must start with '/'")


def test_bad_serve_env_var_does_not_break_other_commands(tmp_path: Path) -> None:
    result = run("policy", "check", POLICY, cwd=tmp_path, env={"AUTHPROXY_TOKEN_CACHE_SIZE": "x"})
    assert result.returncode == 0, result.stderr


def test_serve_bad_redis_url_is_a_config_error(tmp_path: Path, jwks: str) -> None:
    result = serve(tmp_path, "--policy", POLICY, "--jwks", jwks, *KEYS, *ADDRESSES,
                   "--redis", "http://localhost:6379")  # fmt: skip
    assert_config_error(result, "--redis: unsupported scheme 'http' (supported: redis://")


def test_serve_bad_state_duration_is_a_usage_error(tmp_path: Path, jwks: str) -> None:
    result = serve(tmp_path, "--policy", POLICY, "--jwks", jwks, *KEYS, *ADDRESSES,
                   "--state-staleness", "soon")  # fmt: skip
    assert_config_error(result, "invalid duration value: 'soon'")


def test_serve_admin_token_env_must_hold_a_secret(tmp_path: Path, jwks: str) -> None:
    result = serve(tmp_path, "--policy", POLICY, "--jwks", jwks, *KEYS, *ADDRESSES,
                   "--admin", "0", "--admin-token-env", "CLI_NO_SUCH_ADMIN_TOKEN")  # fmt: skip
    assert_config_error(result, "--admin-token-env CLI_NO_SUCH_ADMIN_TOKEN")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"version": 1, "tokens": {"j": 1', "not a state file this proxy can read"),
        (b'{"version": 1, "tokens": {"j": "soon"}}', "'soon' is not a time"),
        (b"\xff\xfe", "not a state file this proxy can read"),
        (None, "cannot read it"),  # a directory where the file should be
    ],
    ids=["truncated", "bad-time", "binary", "unreadable"],
)
@pytest.mark.parametrize("via_env", [False, True], ids=["flag", "env"])
def test_serve_refuses_to_start_on_a_bad_state_file(
    tmp_path: Path, jwks: str, content: bytes | None, words: str, via_env: bool
) -> None:
    """Never a silent start without the revocations the file held."""
    state = tmp_path / "state.json"
    if content is None:
        state.mkdir()
    else:
        state.write_bytes(content)
    args = ["--policy", POLICY, "--jwks", jwks, *KEYS, *ADDRESSES]
    if via_env:
        result = serve(tmp_path, *args, env={"AUTHPROXY_STATE_FILE": str(state)})
    else:
        result = serve(tmp_path, *args, "--state-file", str(state))
    line = assert_config_error(result, words)
    assert f"--state-file {state}:" in line


def test_serve_state_file_and_redis_is_a_config_error(tmp_path: Path, jwks: str) -> None:
    result = serve(tmp_path, "--policy", POLICY, "--jwks", jwks, *KEYS, *ADDRESSES,
                   "--state-file", "state.json", "--redis", "redis://127.0.0.1:1")  # fmt: skip
    assert_config_error(result, "--state-file keeps in-memory state across restarts")


def test_the_readme_flag_table_is_the_one_the_settings_make() -> None:
    """Every `serve` setting is declared once (`SERVE`); the README's table is rendered
    from it, so a new flag, default or help text cannot be missing there."""
    from authproxy.cli.serve import SERVE
    from authproxy.cli.settings import markdown_table

    readme = (REPO / "README.md").read_text()
    assert markdown_table(SERVE) in readme
    parser_flags = {f for s in SERVE for f in (s.flag,)}
    assert len(parser_flags) == len(SERVE)  # one declaration per flag


def test_serve_help_names_each_variable_and_default(tmp_path: Path) -> None:
    from authproxy.cli.serve import SERVE

    result = run("serve", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for setting in SERVE:
        assert setting.env.replace("=false", "") in text.replace("- ", "-"), setting.flag
    assert "(default 30d; env AUTHPROXY_SUBJECT_REVOCATION_TTL)" in text
    assert "(default 0.0.0.0:8080; env AUTHPROXY_LISTEN)" in text
