"""The README's "Python client" example: its Python block is examples/client_quickstart.py
as it is, and the script, run with the README's command, works against the real proxy and
the example backend (each on a free loopback port instead of the README's fixed ones)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

import pyotp

from tests.support.client import signed_up, target
from tests.support.example_backend import ADMIN_SECRET, PASSWORD, REPO, running_behind_proxy
from tests.support.readme import README, section, shell_blocks

SCRIPT = REPO / "examples" / "client_quickstart.py"
RUN_SECONDS = 60
ADMIN_TOKEN_ENV = "QUICKSTART_ADMIN_TOKEN"


def python_client() -> str:
    return section(README, "## Python client")


def readme_command() -> list[str]:
    """The quickstart's command as "Running it" and "Python client" show it (the same
    line), without the leading `python`."""
    lines = []
    for text in (section(README, "## Running it"), python_client()):
        (block,) = [b for b in shell_blocks(text) if "examples.client_quickstart" in b]
        lines += [line for line in block.splitlines() if "examples.client_quickstart" in line]
    assert len(lines) == 2 and lines[0] == lines[1], lines
    argv = shlex.split(lines[0])
    assert argv[:3] == ["python", "-m", "examples.client_quickstart"], argv
    return argv[1:]


async def run_script(
    args: Sequence[str], env: Mapping[str, str] | None = None, stdin: str = ""
) -> tuple[int, str, str]:
    """`python ARGS` from the repository root with this virtualenv's interpreter:
    (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), RUN_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{shlex.join(args)} still running after {RUN_SECONDS} s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_the_readme_block_is_the_script_as_it_is() -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", python_client(), flags=re.S | re.M)
    assert blocks, "README.md's Python client section has no Python block"
    assert blocks[0] == SCRIPT.read_text(), (
        "README.md's Python client block differs from examples/client_quickstart.py: "
        "paste the file into the block"
    )


async def test_the_readme_command_signs_up_logs_in_and_out(tmp_path) -> None:
    argv = readme_command()
    assert "--sign-up" in argv
    email = argv[argv.index("--email") + 1]
    # As in "Running it": an admin API without a token.
    async with running_behind_proxy(
        tmp_path, admin_token=None, backend_admin_token=None
    ) as proxied:
        # The README's ports, moved to this proxy's (the last of an option given twice wins).
        args = [*argv, "--proxy", target(proxied), "--admin", proxied.admin_url]
        code, out, err = await run_script(args)
        assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
        user = proxied.example.backend.store.user_by_email(email)
        assert user is not None and user.totp_secret is not None  # signed up with TOTP
        assert user.totp_last_step >= 0  # and logged in with a code
        assert out == f"GetProfile: {email} (user id {user.user_id})\nlogged out\n"
        # Logout revoked the access token at the proxy.
        assert [set(r) for r in await proxied.revocations()] == [{"jti", "exp"}]


async def test_an_existing_account_logs_in_with_the_code_typed_in(tmp_path) -> None:
    email = "typed@example.com"
    async with running_behind_proxy(tmp_path) as proxied:  # admin API with a token
        created = await signed_up(proxied, email, enable_2fa=True)
        args = [
            *("-m", "examples.client_quickstart", "--email", email, "--password", PASSWORD),
            *("--proxy", target(proxied), "--admin", proxied.admin_url),
            *("--admin-token-env", ADMIN_TOKEN_ENV),
        ]
        totp_code = pyotp.parse_uri(created.otpauth_uri).now()
        code, out, err = await run_script(
            args, env={ADMIN_TOKEN_ENV: ADMIN_SECRET}, stdin=totp_code + "\n"
        )
        assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
        assert out == f"code: GetProfile: {email} (user id {created.user_id})\nlogged out\n"
        assert len(await proxied.revocations()) == 1


async def test_without_the_admin_token_the_script_fails_before_logging_in(tmp_path) -> None:
    email = "no-token@example.com"
    async with running_behind_proxy(tmp_path) as proxied:  # admin API with a token
        args = ["-m", "examples.client_quickstart", "--email", email, "--password", PASSWORD]
        args += ["--proxy", target(proxied), "--admin", proxied.admin_url, "--sign-up"]
        code, out, err = await run_script(args)
        assert code != 0 and out == "", out
        assert "401" in err, err
        assert proxied.example.backend.store.user_by_email(email) is None
