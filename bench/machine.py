"""What produced a run's figures: the machine and the software, recorded with them.

Figures from different Pythons are not comparable: the interpreters differ in speed, and
the event loop's work per call differs (a task a decision that waits continues in starts
eagerly on 3.12, on the next loop turn on 3.11). Every server the benchmark starts runs on the interpreter running
the benchmark (`procs.Server` starts `sys.executable`), so that one version is the
version of every figure.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata

#: Distributions whose versions are recorded: the data plane's and the front ends'.
PACKAGES = ("grpcio", "ngh2", "PyJWT", "aiohttp")


def describe() -> dict[str, str | int]:
    """The run's machine and software, for the JSON and the table's first lines."""
    out: dict[str, str | int] = {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
        "system": f"{platform.system()} {platform.release()}",
        "cpus": os.cpu_count() or 0,
        "h2load": _h2load_version(),
    }
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _h2load_version() -> str:
    try:
        done = subprocess.run(["h2load", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    words = done.stdout.split()  # "h2load nghttp2/1.52.0"
    return words[-1].rpartition("/")[2] if words else "unknown"


def line(machine: dict) -> str:
    """One line naming the Python first: the figure that most changes the data plane's."""
    packages = ", ".join(f"{name} {machine[name]}" for name in PACKAGES if name in machine)
    return (
        f"machine: Python {machine['python']} ({machine['python_implementation']}),"
        f" {machine['system']}, {machine['cpus']} CPUs; {packages}, h2load {machine['h2load']}"
    )
