"""The sidecar and ext_authz Deployments as `kubectl apply -k` applies them:
schema-valid in strict mode, locked-down containers, probes on the admin port, only the
proxy reachable, the policy ConfigMap mounted as a directory so edits are reloaded in
place, shutdown timing that lets the proxy drain, secrets documented and never
committed."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest

from authproxy.cli.main import ENV_PREFIX
from tests.support.manifests import (
    DEPLOY_README,
    KUBERNETES_VERSIONS,
    ROOT,
    admin_port,
    arg,
    backend_port,
    backends,
    container_port,
    containers,
    each_deployment,
    host_of,
    listen_port,
    manifests,
    mounts_of,
    one,
    pod,
    policy_configmap,
    port_of,
    pre_stop_sleep,
    proxy,
    proxy_setting,
    resources,
    secret_ref,
    selects,
    serve_env_names,
    serving_ports,
    shutdown_grace,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


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


@each_deployment
def test_config_and_secret_volumes_are_directory_mounts(where: Path) -> None:
    # A subPath mount never sees ConfigMap or Secret updates: no policy hot reload.
    mounts = [*mounts_of("configMap", where), *mounts_of("secret", where)]
    assert mounts
    for container, mount, _ in mounts:
        assert "subPath" not in mount and "subPathExpr" not in mount, (container["name"], mount)
        assert mount.get("readOnly") is True, (container["name"], mount)


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
