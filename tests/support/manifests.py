"""The Kubernetes manifests as `kubectl apply -k` applies them (rendered by kubectl's
own kustomize: generated ConfigMap and image settings included), and what the deploy
tests read from them: resources, the proxy and backend containers, their flags and
environment, ports and timings."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from unittest import mock

import kubernetes_validate
import pytest
import yaml

from authproxy.cli.main import ENV_PREFIX, build_parser
from authproxy.cli.serve import serve_config
from authproxy.runtime.serve import DEFAULT_LISTEN, ServeConfig
from tests.support.dockerfile import (
    final_stage,
    image_env,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
POLICY_BASE = K8S / "policy"  # the policy ConfigMap's generator, included by both below
EXT_AUTHZ = K8S / "ext-authz"
KUSTOMIZATIONS = (K8S, POLICY_BASE, EXT_AUTHZ)
# What `kubectl apply -k` deploys: the sidecar pod, and the standalone ext_authz server.
DEPLOYMENTS = (K8S, EXT_AUTHZ)
each_deployment = pytest.mark.parametrize("where", DEPLOYMENTS, ids=("sidecar", "ext-authz"))
DEPLOY_README = ROOT / "deploy" / "README.md"

# The oldest Kubernetes the manifests support (the preStop `sleep` action is 1.30) and the
# newest kubernetes-validate ships schemas for: both checked, offline.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
PROXY = "authproxy"  # the proxy's container name; every other container is the backend


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


def secret_ref(container: dict, name: str | None) -> tuple[str, str] | None:
    for var in container.get("env", []):
        if var["name"] == name:
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            return (ref["name"], ref["key"]) if ref else None
    return None


def mounts_of(kind: str, where: Path = K8S) -> Iterator[tuple[dict, dict, dict]]:
    """(container, mount, volume) for each mount of a `kind` (configMap, secret) volume."""
    volumes = {v["name"]: v for v in pod(where)["spec"].get("volumes", [])}
    for container in containers(where):
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if kind in volume:
                yield container, mount, volume


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
