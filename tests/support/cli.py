"""Running the real `authproxy` command as a subprocess, as a user would: `authproxy`
(any command), `serve` (with the refresh secret in `CLI_REFRESH_SECRET`), and
`assert_config_error` for a command that must stop on its configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLICY = str(REPO / "policy.yaml")
SECRET = "cli-test-refresh-secret-0123456789abcdef"
#: Valid addresses: a serve that got past configuration would listen, so errors must come first.
ADDRESSES = ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"]


def authproxy(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m authproxy ARGS` in `cwd`, with no `AUTHPROXY_*` variable from this
    process (only those in `env`), its output captured."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "authproxy", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def serve(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return authproxy(
        "serve", *args, cwd=tmp_path, env={"CLI_REFRESH_SECRET": SECRET, **(env or {})}
    )


def assert_config_error(result: subprocess.CompletedProcess[str], words: str) -> str:
    """Exit 2 and exactly one `authproxy: error:` line (containing `words`); no traceback."""
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("authproxy: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert words in result.stderr
    assert result.stdout == ""
    return lines[0]
