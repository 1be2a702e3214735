"""Running the real `authproxy` command as a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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
