"""The Dockerfile: hadolint-clean; what the image must and must not hold (a numeric
non-root user, `authproxy serve` as entrypoint, env defaults that are serve flags, a
health check on the admin API, no keys or clutter), and that its build stage has what
pyproject.toml needs."""

from __future__ import annotations

import http.server
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from authproxy.cli.main import ENV_PREFIX
from authproxy.runtime.serve import DEFAULT_LISTEN
from tests.support.dockerfile import (
    Instruction,
    exec_form,
    final_stage,
    image_env,
    in_image,
    instructions,
    stages,
)
from tests.support.manifests import (
    ROOT,
    serve_env_names,
)

DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT = Path(sys.executable).parent / "hadolint"
KEY_FILE = re.compile(r"(\.pem|\.key|(^|/)jwks\.json)$")


def hadolint(home: Path, file: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # A clean environment: no user-level hadolint config or HADOLINT_* variable can hide
    # a finding; a .hadolint.yaml in the repository would still apply (none exists).
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "XDG_CONFIG_HOME": str(home)}
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--format", "json", file],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    result = hadolint(tmp_path, "Dockerfile")
    findings = json.loads(result.stdout or "null")
    report = "\n".join(
        f"line {f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in findings or []
    )
    assert findings == [], f"hadolint:\n{report}{result.stderr}"
    assert result.returncode == 0, result.stderr


def test_hadolint_does_lint(tmp_path: Path) -> None:
    # The check above passes only because the Dockerfile is clean, not because hadolint
    # never looks: it flags a `latest` base image and an unpinned pip install.
    result = hadolint(tmp_path, "-", "FROM python:latest\nRUN pip install grpcio\n")
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3007", "DL3013"} <= codes, result.stdout
    assert result.returncode != 0


def test_image_runs_as_a_numeric_non_root_user() -> None:
    # Every image stage (one with an ENTRYPOINT) ends as a numeric user, so Kubernetes'
    # runAsNonRoot can verify it without a passwd lookup.
    image_stages = {i.stage for i in instructions() if i.keyword == "ENTRYPOINT"}
    assert final_stage() in image_stages
    for stage in image_stages:
        users = in_image(stage, "USER")
        assert users, f"stage {stage} has no USER: it would run as root"
        match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1].args)
        assert match, f"stage {stage}: USER {users[-1].args} is not a numeric UID[:GID]"
        assert int(match[1]) != 0 and match[2] != "0", f"stage {stage}: USER {users[-1].args}"


def test_image_entrypoint_is_authproxy_serve() -> None:
    stage = final_stage()
    assert exec_form(in_image(stage, "ENTRYPOINT")[-1]) == ["authproxy"]
    assert exec_form(in_image(stage, "CMD")[-1]) == ["serve"]


def test_image_env_defaults() -> None:
    env = image_env(final_stage())
    assert env.get("AUTHPROXY_ADMIN") == "0.0.0.0:9901"
    assert PurePosixPath(env.get("AUTHPROXY_POLICY", "")).is_absolute(), env
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"


def test_image_env_names_are_serve_flags() -> None:
    known = serve_env_names()
    for stage in stages():
        unknown = {k for k in image_env(stage) if k.startswith(ENV_PREFIX)} - known
        assert not unknown, f"stage {stage}: no `authproxy serve` flag reads {sorted(unknown)}"


def test_image_exposes_the_proxy_ports() -> None:
    exposed = {
        int(p.split("/")[0]) for i in in_image(final_stage(), "EXPOSE") for p in i.args.split()
    }
    admin_port = int(image_env(final_stage())["AUTHPROXY_ADMIN"].rpartition(":")[2])
    assert {int(DEFAULT_LISTEN.rpartition(":")[2]), admin_port} <= exposed


def test_healthcheck_asks_admin_healthz() -> None:
    (healthcheck,) = in_image(final_stage(), "HEALTHCHECK")
    options, _, command = healthcheck.args.partition("CMD ")
    assert "--timeout=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"] and "timeout=" in argv[2], argv

    class Health(http.server.BaseHTTPRequestHandler):
        status = 200
        paths: list[str] = []

        def do_GET(self) -> None:
            self.paths.append(self.path)
            self.send_response(self.status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # A proxy the container may be given (Docker passes its client's proxy settings on)
    # must not carry the check away from the loopback address.
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "AUTHPROXY_ADMIN": f"0.0.0.0:{port}", "http_proxy": dead}
    env["HTTP_PROXY"] = dead

    def healthy() -> bool:
        run = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=10)
        return run.returncode == 0

    try:
        assert healthy()
        assert Health.paths == ["/healthz"]
        Health.status = 503
        assert not healthy()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert not healthy()  # nothing listens


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (Docker's rules: the
    last pattern matching the path or one of its parent directories decides)."""
    parts = path.split("/")
    candidates = [path, *("/".join(parts[: n + 1]) for n in range(len(parts) - 1))]
    excluded = False
    for raw in dockerignore_patterns():
        exception = raw.startswith("!")
        pattern = posixpath.normpath(raw.removeprefix("!")).lstrip("/")
        if any(_pattern_regex(pattern).fullmatch(c) for c in candidates):
            excluded = not exception
    return excluded


def test_dockerignore_keeps_keys_and_clutter_out() -> None:
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/cli/test_cli.py",
        "keys/signing.pem",
        "keys/jwks.json",
        "proxy/__pycache__/cli.cpython-312.pyc",
        "examples/backend/signing.pem",
        "examples/jwks.json",
        ".pytest_cache/README.md",
        "authproxy.egg-info/PKG-INFO",
    ):
        assert ignored(path), f"{path} would be in the build context"
    for path in ("pyproject.toml", "README.md", "LICENSE", "proxy/cli/main.py"):
        assert not ignored(path), f"{path} would be missing from the build context"


def copy_sources() -> Iterator[tuple[Instruction, str]]:
    """(instruction, source) for every COPY/ADD from the build context."""
    for instruction in instructions():
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        flags, rest = re.fullmatch(r"((?:--\S+\s+)*)(.*)", instruction.args).groups()
        if "--from=" in flags:
            continue
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        for source in words[:-1]:
            yield instruction, source


def test_copy_sources_exist_and_hold_no_keys() -> None:
    sources = list(copy_sources())
    assert sources
    for instruction, source in sources:
        assert source not in (".", "./", "*"), (
            f"{instruction.keyword} {instruction.args}: the whole context"
        )
        assert not KEY_FILE.search(source) and "keys" not in PurePosixPath(source).parts, source
        path = ROOT / source
        assert path.exists(), f"{instruction.keyword} {instruction.args}: {source} does not exist"
        assert not ignored(source), f"{source} is excluded by .dockerignore"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert ignored(relative) or not KEY_FILE.search(relative), f"{relative} would be copied"


def test_build_stage_has_what_pyproject_needs() -> None:
    # setuptools only warns when a license file is missing, and the wheel then lacks it.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"], *project["project"]["license-files"]}
    needed |= set(project["tool"]["setuptools"]["package-dir"].values())  # the sources
    builds = 0
    for stage in stages():
        copied = {PurePosixPath(s).as_posix() for i, s in copy_sources() if i.stage == stage}
        if "pyproject.toml" in copied:  # a stage that builds the package
            builds += 1
            assert needed <= copied, f"stage {stage} builds without {sorted(needed - copied)}"
    assert builds == 1
