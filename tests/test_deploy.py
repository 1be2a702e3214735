"""The deploy files: the Dockerfile (hadolint-clean; what the image must and must not hold)
and the Kubernetes kustomizations under deploy/k8s/, rendered as `kubectl apply -k` applies
them: schema-valid in strict mode; the sidecar's intent (only the proxy is reachable,
probes on the admin port, the policy ConfigMap generated from policy.yaml and mounted as a
directory so edits are reloaded in place, shutdown timing that lets the proxy drain); the
ext_authz Deployment's settings as authproxy's own CLI reads them, and the Envoy Gateway
and Istio resources that point at its Service."""

from __future__ import annotations

import argparse
import copy
import http.server
import itertools
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import kubernetes_validate
import pytest
import yaml

from authproxy.cli.main import ENV_PREFIX, build_parser
from authproxy.cli.serve import serve_config
from authproxy.runtime.serve import DEFAULT_LISTEN, ServeConfig
from tests.support.dockerfile import (
    DOCKERFILE,
    Instruction,
    exec_form,
    final_stage,
    image_env,
    in_image,
    instructions,
    stages,
)

ROOT = Path(__file__).resolve().parent.parent
DOCKERIGNORE = ROOT / ".dockerignore"
K8S = ROOT / "deploy" / "k8s"
POLICY_BASE = K8S / "policy"  # the policy ConfigMap's generator, included by both below
EXT_AUTHZ = K8S / "ext-authz"
KUSTOMIZATIONS = (K8S, POLICY_BASE, EXT_AUTHZ)
# What `kubectl apply -k` deploys: the sidecar pod, and the standalone ext_authz server.
DEPLOYMENTS = (K8S, EXT_AUTHZ)
each_deployment = pytest.mark.parametrize("where", DEPLOYMENTS, ids=("sidecar", "ext-authz"))
# Applied on their own (each needs its product's CRDs), not by the ext_authz kustomization.
MESH_FILES = (
    "envoy-gateway-security-policy.yaml",
    "istio-operator.yaml",
    "istio-values.yaml",
    "istio-authorization-policy.yaml",
)
# The fields of Envoy Gateway's SecurityPolicy extAuth (1.8: api/v1alpha1/ext_auth_types.go)
# and of Istio's envoyExtAuthzGrpc extension provider (mesh/v1alpha1/config.proto).
ENVOY_GATEWAY_EXT_AUTH_FIELDS = {
    *("grpc", "http", "headersToExtAuth", "bodyToExtAuth", "timeout", "failOpen"),
    *("recomputeRoute", "includeRouteMetadata", "contextExtensions", "statusOnError"),
}
ISTIO_EXT_AUTHZ_GRPC_FIELDS = {
    *("service", "port", "timeout", "failOpen", "clearRouteCache", "statusOnError"),
    "includeRequestBodyInCheck",
}
DEPLOY_README = ROOT / "deploy" / "README.md"
HADOLINT = Path(sys.executable).parent / "hadolint"

# The oldest Kubernetes the manifests support (the preStop `sleep` action is 1.30) and the
# newest kubernetes-validate ships schemas for: both checked, offline.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
PROXY = "authproxy"  # the proxy's container name; every other container is the backend
KEY_FILE = re.compile(r"(\.pem|\.key|(^|/)jwks\.json)$")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


# --- Dockerfile -------------------------------------------------------------------------


def serve_env_names() -> set[str]:
    """AUTHPROXY_* names that `authproxy serve` reads: one per flag (--no-x also as x)."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    names = set()
    for action in sub.choices["serve"]._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                name = flag.removeprefix("--").removeprefix("no-")
                names.add(ENV_PREFIX + name.replace("-", "_").upper())
    return names


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


# --- Kubernetes ---------------------------------------------------------------------------
#
# The manifests are tested as `kubectl apply -k` applies them: rendered by kubectl's own
# kustomize (`kubectl kustomize DIR`), generated ConfigMap and image settings included.


def kustomize(directory: Path) -> list[dict]:
    """What `kubectl apply -k DIRECTORY` applies."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not installed: it renders the kustomizations"
    with tempfile.TemporaryDirectory() as home:  # no user kubeconfig or plugin settings
        env = {"PATH": os.environ.get("PATH", ""), "HOME": home}
        run = subprocess.run(
            [kubectl, "kustomize", str(directory)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 0, f"kubectl kustomize {directory}:\n{run.stderr}"
    return [r for r in yaml.safe_load_all(run.stdout) if r]


@cache
def manifests(where: Path = K8S) -> tuple[tuple[str, dict], ...]:
    """(where/Kind/name, resource) for each resource `kubectl apply -k where` applies."""
    place = where.relative_to(ROOT)
    return tuple((f"{place}: {r['kind']}/{r['metadata']['name']}", r) for r in kustomize(where))


def resources(kind: str, where: Path = K8S) -> list[dict]:
    return [r for _, r in manifests(where) if r["kind"] == kind]


def one(kind: str, where: Path = K8S) -> dict:
    (resource,) = resources(kind, where)
    return resource


def pod(where: Path = K8S) -> dict:
    return one("Deployment", where)["spec"]["template"]


def containers(where: Path = K8S) -> list[dict]:
    return pod(where)["spec"]["containers"]


def proxy(where: Path = K8S) -> dict:
    (container,) = [c for c in containers(where) if c["name"] == PROXY]
    return container


def backends() -> list[dict]:
    found = [c for c in containers() if c["name"] != PROXY]
    assert found, "the pod has no backend container"
    return found


def arg(container: dict, flag: str) -> str | None:
    args = [*container.get("command", []), *container.get("args", [])]
    for i, word in enumerate(args):
        if word == flag and i + 1 < len(args):
            return args[i + 1]
        if word.startswith(flag + "="):
            return word.partition("=")[2]
    return None


def env_value(container: dict, name: str) -> str | None:
    for var in container.get("env", []):
        if var["name"] == name:
            return var.get("value")
    return None


def proxy_setting(flag: str, where: Path = K8S) -> str | None:
    """What `authproxy serve` in the proxy container gets for `flag`: the argument, else
    the container's AUTHPROXY_* variable, else the image's default."""
    name = ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()
    value = arg(proxy(where), flag)
    if value is None:
        value = env_value(proxy(where), name)
    if value is None:
        value = image_env(final_stage()).get(name)
    return value


def serve_config_of(container: dict) -> ServeConfig:
    """The container's `authproxy serve` configuration, as authproxy's own CLI reads its
    arguments and environment (the image's ENV, then the container's; a variable taken
    from a Secret gets a stand-in value)."""
    env = dict(image_env(final_stage()))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", f"<{var['name']} from a Secret>")
    argv = [*container.get("command", []), *container.get("args", [])]
    with mock.patch.dict(os.environ, env, clear=True):
        return serve_config(build_parser().parse_args(argv))


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def host_of(address: str) -> str:
    return address.rpartition(":")[0]


def container_port(container: dict, port: int | str) -> int | None:
    """A probe's or Service's port (number or name) as the container's port number."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    return port if isinstance(port, int) else None


def selects(selector: dict, labels: dict) -> bool:
    wanted = selector.get("matchLabels", selector)
    assert wanted and not selector.get("matchExpressions"), selector
    return all(labels.get(k) == v for k, v in wanted.items())


def listen_port() -> int:
    return port_of(proxy_setting("--listen") or DEFAULT_LISTEN)


def admin_port(where: Path = K8S) -> int:
    admin = proxy_setting("--admin", where)
    assert admin, "the proxy has no admin listener (AUTHPROXY_ADMIN)"
    return port_of(admin)


def serving_ports(where: Path) -> set[int]:
    """The ports the proxy serves clients on (not the admin port): the sidecar's, or the
    ext_authz gRPC and HTTP ones."""
    cfg = serve_config_of(proxy(where))
    if cfg.upstream:
        return {port_of(cfg.listen)}
    return {port_of(a) for a in (cfg.ext_authz_grpc, cfg.ext_authz_http) if a}


def backend_port() -> int:
    return port_of(arg(backends()[0], "--listen") or "")


def shutdown_grace(where: Path = K8S) -> float:
    value = proxy_setting("--shutdown-grace", where)
    return float(value) if value else build_parser().parse_args(["serve"]).shutdown_grace


def pre_stop_sleep(container: dict) -> int:
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    return int(sleep.get("seconds", 0))


@each_deployment
def test_manifests_exist_and_name_no_namespace(where: Path) -> None:
    kinds = {r["kind"] for _, r in manifests(where)}
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    for name, resource in manifests(where):
        assert "namespace" not in resource["metadata"], f"{name}: apply with -n instead"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@each_deployment
def test_manifests_validate_strictly(where: Path, version: str) -> None:
    for name, resource in manifests(where):
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{name} against {version}: {path}: {e.message}")


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(one("Deployment"))
    context = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@each_deployment
def test_deployment_selects_its_pods(where: Path) -> None:
    assert selects(one("Deployment", where)["spec"]["selector"], pod(where)["metadata"]["labels"])


@each_deployment
def test_every_container_is_locked_down(where: Path) -> None:
    pod_context = pod(where)["spec"].get("securityContext", {})
    for container in pod(where)["spec"].get("initContainers", []) + containers(where):
        context = container.get("securityContext", {})
        name = container["name"]
        assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, name
        assert context.get("runAsUser", pod_context.get("runAsUser")) != 0, name
        assert context.get("readOnlyRootFilesystem") is True, name
        assert context.get("allowPrivilegeEscalation") is False, name
        assert "ALL" in context.get("capabilities", {}).get("drop", []), name
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{name}: {kind}"


@each_deployment
def test_proxy_probes_ask_the_admin_port(where: Path) -> None:
    admin = proxy_setting("--admin", where)
    assert admin and host_of(admin) not in LOOPBACK, f"the kubelet cannot reach {admin}"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        http_get = proxy(where)[probe]["httpGet"]
        assert http_get["path"] == path, probe
        assert container_port(proxy(where), http_get["port"]) == admin_port(where), probe
        assert http_get.get("scheme", "HTTP") == "HTTP", probe


@each_deployment
def test_admin_listener_requires_a_bearer_secret_from_a_secret(where: Path) -> None:
    # Off loopback, the revocation API must ask for its bearer secret.
    token_env = proxy_setting("--admin-token-env", where)
    assert token_env, "AUTHPROXY_ADMIN_TOKEN_ENV is not set"
    (var,) = [v for v in proxy(where).get("env", []) if v["name"] == token_env]
    assert "secretKeyRef" in var.get("valueFrom", {}), f"{token_env} is not from a Secret"


def secret_ref(container: dict, name: str | None) -> tuple[str, str] | None:
    for var in container.get("env", []):
        if var["name"] == name:
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            return (ref["name"], ref["key"]) if ref else None
    return None


def test_backend_and_proxy_share_their_secrets() -> None:
    # The backend signs refresh tokens with the HMAC secret the proxy verifies them with,
    # and revokes tokens at this pod's proxy with the admin API's bearer secret.
    hmac = proxy_setting("--hmac-secret-env") or ""
    proxy_refresh = secret_ref(proxy(), hmac.rpartition("=")[2])
    proxy_admin = secret_ref(proxy(), proxy_setting("--admin-token-env"))
    assert proxy_refresh and proxy_admin
    for backend in backends():
        assert secret_ref(backend, arg(backend, "--refresh-secret-env")) == proxy_refresh
        assert secret_ref(backend, arg(backend, "--proxy-admin-token-env")) == proxy_admin
        assert arg(backend, "--proxy-admin") == f"http://127.0.0.1:{admin_port()}"


@each_deployment
def test_metrics_annotations_name_the_admin_port(where: Path) -> None:
    annotations = pod(where)["metadata"].get("annotations", {})
    assert int(annotations["prometheus.io/port"]) == admin_port(where)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_service_targets_the_proxy_never_the_backend() -> None:
    service = one("Service")
    assert selects(service["spec"]["selector"], pod()["metadata"]["labels"])
    ports = service["spec"]["ports"]
    assert ports
    for port in ports:
        target = container_port(proxy(), port.get("targetPort", port["port"]))
        assert target == listen_port(), f"Service port {port['name']} targets {target}"
        assert target not in (backend_port(), admin_port())
        assert port["name"] == "grpc" and port.get("appProtocol") == "grpc", port


def test_backend_listens_on_loopback_only() -> None:
    for backend in backends():
        listen = arg(backend, "--listen")
        assert listen, f"{backend['name']}: no --listen argument"
        assert host_of(listen) == "127.0.0.1", f"{backend['name']} listens on {listen}"
        assert not backend.get("ports"), f"{backend['name']} declares ports"
    upstream = proxy_setting("--upstream")
    assert upstream == f"127.0.0.1:{backend_port()}"
    assert port_of(upstream) != listen_port()


def mounts_of(kind: str, where: Path = K8S) -> Iterator[tuple[dict, dict, dict]]:
    """(container, mount, volume) for each mount of a `kind` (configMap, secret) volume."""
    volumes = {v["name"]: v for v in pod(where)["spec"].get("volumes", [])}
    for container in containers(where):
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if kind in volume:
                yield container, mount, volume


@each_deployment
def test_config_and_secret_volumes_are_directory_mounts(where: Path) -> None:
    # A subPath mount never sees ConfigMap or Secret updates: no policy hot reload.
    mounts = [*mounts_of("configMap", where), *mounts_of("secret", where)]
    assert mounts
    for container, mount, _ in mounts:
        assert "subPath" not in mount and "subPathExpr" not in mount, (container["name"], mount)
        assert mount.get("readOnly") is True, (container["name"], mount)


def policy_configmap(where: Path) -> tuple[dict, str]:
    """The ConfigMap whose mounted directory holds the proxy's policy file, and its key."""
    policy = PurePosixPath(proxy_setting("--policy", where) or "")
    assert policy.is_absolute(), policy
    (volume,) = [
        volume
        for container, mount, volume in mounts_of("configMap", where)
        if container["name"] == PROXY and policy.parent == PurePosixPath(mount["mountPath"])
    ]
    name = volume["configMap"]["name"]
    (configmap,) = [c for c in resources("ConfigMap", where) if c["metadata"]["name"] == name]
    items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
    return configmap, items.get(policy.name, policy.name) if items else policy.name


@each_deployment
def test_policy_lies_in_the_policy_configmap_directory(where: Path) -> None:
    configmap, key = policy_configmap(where)
    assert key in configmap["data"], f"ConfigMap {configmap['metadata']['name']} has no {key}"


@each_deployment
def test_policy_configmap_is_the_repository_policy(where: Path) -> None:
    configmap, key = policy_configmap(where)
    assert configmap["data"][key] == (ROOT / "policy.yaml").read_text(), (
        "deploy/k8s/policy/policy.yaml differs from policy.yaml: cp policy.yaml deploy/k8s/policy/"
    )


@each_deployment
def test_termination_grace_covers_the_drain(where: Path) -> None:
    period = pod(where)["spec"]["terminationGracePeriodSeconds"]
    drained = pre_stop_sleep(proxy(where)) + shutdown_grace(where)
    assert period > drained, f"terminationGracePeriodSeconds {period} <= preStop + grace {drained}"


def test_backend_outlives_the_proxy_drain() -> None:
    # Both containers get SIGTERM at once; the backend must still answer while the proxy
    # drains, and stop before the kubelet's deadline.
    drained = pre_stop_sleep(proxy()) + shutdown_grace()
    for backend in backends():
        assert drained <= pre_stop_sleep(backend) < pod()["spec"]["terminationGracePeriodSeconds"]


@each_deployment
def test_proxy_env_names_are_serve_flags(where: Path) -> None:
    names = {v["name"] for v in proxy(where).get("env", []) if v["name"].startswith(ENV_PREFIX)}
    unknown = names - serve_env_names()
    assert not unknown, f"no `authproxy serve` flag reads {sorted(unknown)}"


@each_deployment
def test_no_service_link_variables_reach_the_proxy(where: Path) -> None:
    # With service links on, Kubernetes gives the pod NAME_SERVICE_HOST, NAME_PORT_..._TCP
    # for every Service of its namespace: for the ext_authz Service `authproxy` (or any
    # Service a user calls so), AUTHPROXY_* names next to the proxy's own settings.
    assert pod(where)["spec"].get("enableServiceLinks") is False


def documented_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret generic` commands in the
    deploy README."""
    text = DEPLOY_README.read_text().replace("\\\n", " ")
    found: dict[str, set[str]] = {}
    for match in re.finditer(r"kubectl (?:-n \S+ )?create secret generic (\S+)([^\n]*)", text):
        keys = re.findall(r"--from-(?:file|literal)=([\w.-]+)=", match[2])
        found.setdefault(match[1], set()).update(keys)
    return found


@each_deployment
def test_secrets_are_documented_and_never_committed(where: Path) -> None:
    # No Secret manifests (placeholders would be one `kubectl apply` from production); every
    # Secret the pod uses, and every key of it that a container reads, has its
    # `kubectl create secret` line in deploy/README.md.
    assert not resources("Secret", where), "create Secrets with kubectl; do not commit them"
    documented = documented_secrets()
    used: set[tuple[str, str]] = set()
    for container in containers(where):
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                used.add((ref["name"], ref["key"]))
    for container, mount, volume in mounts_of("secret", where):
        values = [
            *container.get("args", []),
            *(v.get("value", "") for v in container.get("env", [])),
        ]
        root = mount["mountPath"].rstrip("/") + "/"
        keys = [v.removeprefix(root) for v in values if v.startswith(root)]
        assert keys, (
            f"{container['name']} mounts {volume['secret']['secretName']} but reads no file of it"
        )
        used.update((volume["secret"]["secretName"], k) for k in keys)
    assert used
    for name, key in sorted(used):
        assert key in documented.get(name, set()), f"deploy/README.md does not create {name}/{key}"


@each_deployment
def test_network_policy_admits_only_the_proxy(where: Path) -> None:
    (policy,) = resources("NetworkPolicy", where)
    spec = policy["spec"]
    assert selects(spec["podSelector"], pod(where)["metadata"]["labels"])
    assert "Ingress" in spec["policyTypes"]
    admitted = set()
    for rule in spec["ingress"]:
        ports = {container_port(proxy(where), p["port"]) for p in rule.get("ports", [])}
        assert ports, "an ingress rule without ports admits every port"
        if admin_port(where) in ports:
            assert rule.get("from"), "the admin port is open to everyone"
        admitted |= ports
    assert admitted == serving_ports(where) | {admin_port(where)}, admitted


@each_deployment
def test_disruption_budget_allows_draining_a_node(where: Path) -> None:
    (budget,) = resources("PodDisruptionBudget", where)
    assert selects(budget["spec"]["selector"], pod(where)["metadata"]["labels"])
    replicas = one("Deployment", where)["spec"].get("replicas", 1)
    if "minAvailable" in budget["spec"]:
        assert int(budget["spec"]["minAvailable"]) < replicas, "no pod could ever be evicted"
    else:
        assert int(budget["spec"]["maxUnavailable"]) >= 1


# --- Kustomizations: what each applies, the generated policy, the images ----------------


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def generator_files(spec: dict) -> list[str]:
    """The files a kustomization's generators read (`[KEY=]PATH` entries)."""
    generators = [*spec.get("configMapGenerator", []), *spec.get("secretGenerator", [])]
    return [entry.rpartition("=")[2] for g in generators for entry in g.get("files", [])]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=("sidecar", "policy", "ext-authz"))
def test_kustomization_resources_exist_and_validate(directory: Path) -> None:
    spec = kustomization(directory)
    assert (spec["apiVersion"], spec["kind"]) == (
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    )
    for entry in spec.get("resources", []):
        path = directory / entry
        assert path.exists(), f"{directory}: resource {entry} does not exist"
        if path.is_dir():
            assert (path / "kustomization.yaml").is_file(), f"{entry} has no kustomization.yaml"
            continue
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert documents, f"{entry} holds no resource"
        for document, version in itertools.product(documents, KUBERNETES_VERSIONS):
            kubernetes_validate.validate(document, version, strict=True)
    for entry in generator_files(spec):
        # kubectl refuses files outside the kustomization's directory.
        path = (directory / entry).resolve()
        assert path.is_file() and path.is_relative_to(directory.resolve()), entry


def test_every_manifest_is_applied_by_a_kustomization() -> None:
    # A file no kustomization lists is never applied (`kubectl apply -k` reads only what
    # kustomization.yaml names): only the mesh files are applied on their own.
    assert {p.parent for p in K8S.rglob("kustomization.yaml")} == set(KUSTOMIZATIONS)
    used = {EXT_AUTHZ / name for name in MESH_FILES}
    for directory in KUSTOMIZATIONS:
        spec = kustomization(directory)
        used.add(directory / "kustomization.yaml")
        used |= {directory / e for e in [*spec.get("resources", []), *generator_files(spec)]}
    resolved = {p.resolve() for p in used}
    unused = sorted(
        str(p.relative_to(ROOT))
        for p in K8S.rglob("*")
        if p.is_file() and p.resolve() not in resolved
    )
    assert not unused, f"no kustomization applies {unused}"


def test_policy_generator_reads_a_copy_of_the_repository_policy() -> None:
    configmap, key = policy_configmap(K8S)
    (generator,) = [
        g
        for g in kustomization(POLICY_BASE)["configMapGenerator"]
        if g["name"] == configmap["metadata"]["name"]
    ]
    (entry,) = generator["files"]
    name, _, path = entry.rpartition("=")
    assert (name or PurePosixPath(path).name) == key
    assert (POLICY_BASE / path).read_bytes() == (ROOT / "policy.yaml").read_bytes(), (
        "deploy/k8s/policy/policy.yaml differs from policy.yaml: cp policy.yaml deploy/k8s/policy/"
    )
    for where in DEPLOYMENTS:  # one generator and one copy, included by both deployments
        included = {(where / r).resolve() for r in kustomization(where)["resources"]}
        assert POLICY_BASE.resolve() in included, where


def test_policy_edit_is_reloaded_in_place(tmp_path: Path) -> None:
    # `kubectl apply -k` after a policy edit changes the ConfigMap in place (same name, new
    # data: the kubelet swaps the file into the mounted directory and the proxy reloads it)
    # and nothing else. With a name hash the Deployments would change too and roll their
    # pods, dropping their in-memory revocations, single-use records and rate limits.
    policy = (ROOT / "policy.yaml").read_text()
    edited = policy.replace("leeway: 30s", "leeway: 45s")
    assert edited != policy
    shutil.copytree(K8S, tmp_path / "k8s")
    (tmp_path / "k8s" / POLICY_BASE.relative_to(K8S) / "policy.yaml").write_text(edited)
    for where in DEPLOYMENTS:
        before = {(r["kind"], r["metadata"]["name"]): r for _, r in manifests(where)}
        rendered = kustomize(tmp_path / "k8s" / where.relative_to(K8S))
        after = {(r["kind"], r["metadata"]["name"]): r for r in rendered}
        assert after.keys() == before.keys(), "a resource was renamed"
        configmap, key = policy_configmap(where)
        name = ("ConfigMap", configmap["metadata"]["name"])
        assert after[name]["data"][key] == edited
        assert [k for k in before if before[k] != after[k]] == [name]


def dockerfile_image_names() -> dict[str, str]:
    """Build target -> image name, from the `docker build` lines in the Dockerfile."""
    commands = re.finditer(r"docker build (?:--target (\S+) )?-t (\S+) \.", DOCKERFILE.read_text())
    return {match[1] or final_stage(): match[2] for match in commands}


@each_deployment
def test_images_are_set_once_in_the_kustomization(where: Path) -> None:
    images = kustomization(where)["images"]
    names = [image["name"] for image in images]
    assert len(names) == len(set(names)), f"an image is set twice: {names}"
    built = dockerfile_image_names()
    documents = yaml.safe_load_all((where / "deployment.yaml").read_text())
    (deployment,) = [d for d in documents if d and d["kind"] == "Deployment"]
    written = {c["name"]: c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    rendered = {c["name"]: c["image"] for c in containers(where)}
    for container, image in written.items():
        # deployment.yaml names the image as the Dockerfile builds it, without tag or
        # digest; the kustomization's `images:` entry sets the registry name and version.
        assert ":" not in image and "@" not in image, f"{container}: {image}: set it in images:"
        assert image == built[final_stage() if container == PROXY else "example-backend"]
        (entry,) = [i for i in images if i["name"] == image]
        version = f"@{entry['digest']}" if "digest" in entry else f":{entry['newTag']}"
        assert rendered[container] == entry.get("newName", image) + version
    assert set(names) == set(written.values()), "an images: entry names no container's image"
    assert "images" not in kustomization(POLICY_BASE)


def test_both_deployments_run_the_same_authproxy_image() -> None:
    assert proxy(K8S)["image"] == proxy(EXT_AUTHZ)["image"]


# --- ext_authz: the standalone Deployment and what Envoy Gateway or Istio point at ------


def test_ext_authz_serves_envoy_and_no_sidecar() -> None:
    container = proxy(EXT_AUTHZ)
    cfg = serve_config_of(container)
    assert cfg.upstream is None, "a sidecar needs a backend in the pod"
    assert (cfg.ext_authz_grpc, cfg.ext_authz_http) == ("0.0.0.0:9191", "0.0.0.0:9192")
    assert cfg.admin == "0.0.0.0:9901"
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert declared == {
        "grpc": port_of(cfg.ext_authz_grpc),
        "http": port_of(cfg.ext_authz_http),
        "admin": port_of(cfg.admin),
    }


def test_ext_authz_verifies_tokens_as_the_sidecar_does() -> None:
    # Same policy, same keys: the same JWKS file and the HMAC secret of refresh tokens
    # (the policy's `keys: [refresh-hmac]`) from the same Secret.
    sidecar, ext_authz = serve_config_of(proxy(K8S)), serve_config_of(proxy(EXT_AUTHZ))
    assert ext_authz.policy == sidecar.policy and ext_authz.jwks == sidecar.jwks
    assert ext_authz.hmac_secret_envs == sidecar.hmac_secret_envs
    for setting in sidecar.hmac_secret_envs:
        variable = setting.rpartition("=")[2]
        assert secret_ref(proxy(EXT_AUTHZ), variable) == secret_ref(proxy(K8S), variable)
        assert secret_ref(proxy(EXT_AUTHZ), variable) is not None


def ext_authz_grpc_service() -> tuple[str, int]:
    """The Service name and port that reach the ext_authz gRPC (Check) listener."""
    service = one("Service", EXT_AUTHZ)
    grpc = port_of(serve_config_of(proxy(EXT_AUTHZ)).ext_authz_grpc or "")
    (port,) = [
        p["port"]
        for p in service["spec"]["ports"]
        if container_port(proxy(EXT_AUTHZ), p.get("targetPort", p["port"])) == grpc
    ]
    return service["metadata"]["name"], port


def test_ext_authz_service_exposes_the_check_ports() -> None:
    service = one("Service", EXT_AUTHZ)
    assert selects(service["spec"]["selector"], pod(EXT_AUTHZ)["metadata"]["labels"])
    cfg = serve_config_of(proxy(EXT_AUTHZ))
    targets = {
        p["name"]: (
            container_port(proxy(EXT_AUTHZ), p.get("targetPort", p["port"])),
            p["appProtocol"],
        )
        for p in service["spec"]["ports"]
    }
    # appProtocol: Envoy Gateway and Istio speak HTTP/2 to a gRPC port. No admin port.
    assert targets == {
        "grpc": (port_of(cfg.ext_authz_grpc or ""), "grpc"),
        "http": (port_of(cfg.ext_authz_http or ""), "http"),
    }


def mesh_file(name: str) -> dict:
    (document,) = [d for d in yaml.safe_load_all((EXT_AUTHZ / name).read_text()) if d]
    return document


def test_envoy_gateway_security_policy_calls_the_grpc_check_port() -> None:
    policy = mesh_file("envoy-gateway-security-policy.yaml")
    assert (policy["apiVersion"], policy["kind"]) == (
        "gateway.envoyproxy.io/v1alpha1",
        "SecurityPolicy",
    )
    assert "namespace" not in policy["metadata"], "apply it with -n, next to authproxy"
    targets = policy["spec"]["targetRefs"]
    assert targets
    for target in targets:
        assert target["group"] == "gateway.networking.k8s.io", target
        assert target["kind"] in ("Gateway", "HTTPRoute", "GRPCRoute"), target
    ext_auth = policy["spec"]["extAuth"]
    unknown = set(ext_auth) - ENVOY_GATEWAY_EXT_AUTH_FIELDS
    assert not unknown, f"Envoy Gateway's extAuth has no {sorted(unknown)}"
    name, port = ext_authz_grpc_service()
    assert ext_auth["grpc"] == {"backendRefs": [{"name": name, "port": port}]}
    # Unset, Envoy sends a gRPC authorizer every header: authorization, content-type, and
    # forged x-auth-* that authproxy must see to have them removed.
    assert "headersToExtAuth" not in ext_auth
    assert ext_auth["failOpen"] is False and ext_auth["statusOnError"] == 503


def istio_provider() -> dict:
    operator = mesh_file("istio-operator.yaml")
    assert (operator["apiVersion"], operator["kind"]) == (
        "install.istio.io/v1alpha1",
        "IstioOperator",
    )
    (provider,) = operator["spec"]["meshConfig"]["extensionProviders"]
    return provider


def test_istio_provider_calls_the_grpc_check_port() -> None:
    grpc = istio_provider()["envoyExtAuthzGrpc"]
    unknown = set(grpc) - ISTIO_EXT_AUTHZ_GRPC_FIELDS
    assert not unknown, f"Istio's envoyExtAuthzGrpc has no {sorted(unknown)}"
    name, port = ext_authz_grpc_service()
    # Istio names the Service by its fully qualified host: NAME.NAMESPACE.svc.cluster.local.
    label = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    assert re.fullmatch(rf"{re.escape(name)}\.{label}\.svc\.cluster\.local", grpc["service"])
    assert grpc["port"] == port
    assert grpc["failOpen"] is False and grpc["statusOnError"] == "503"


def test_istio_helm_values_match_the_operator_overlay() -> None:
    operator = mesh_file("istio-operator.yaml")
    assert mesh_file("istio-values.yaml") == {"meshConfig": operator["spec"]["meshConfig"]}


def test_istio_authorization_policy_delegates_to_the_provider() -> None:
    policy = mesh_file("istio-authorization-policy.yaml")
    assert (policy["apiVersion"], policy["kind"]) == ("security.istio.io/v1", "AuthorizationPolicy")
    assert "namespace" not in policy["metadata"], "apply it with -n, next to the workload"
    spec = policy["spec"]
    assert spec["action"] == "CUSTOM"
    assert spec["provider"] == {"name": istio_provider()["name"]}
    assert spec["rules"] == [{}], "every request goes to authproxy: its policy decides"
    # authproxy's own pods must not be selected: its Checks would wait on themselves.
    assert not selects(spec["selector"], pod(EXT_AUTHZ)["metadata"]["labels"])


def test_deploy_readme_names_existing_files() -> None:
    text = DEPLOY_README.read_text()
    applied = re.findall(r"apply -k (\S+)", text)
    assert {ROOT / p for p in applied} >= set(DEPLOYMENTS), applied
    for path in applied:
        assert (ROOT / path / "kustomization.yaml").is_file(), path
    for path in re.findall(r"\b(?:deploy/)?k8s/[\w./-]*\.yaml\b", text):
        assert (ROOT / "deploy" / path.removeprefix("deploy/")).is_file(), path
