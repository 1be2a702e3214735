"""The standalone ext_authz Deployment (Envoy only, no sidecar; tokens verified as the
sidecar does) and what Envoy Gateway or Istio point at its Service; deploy/README.md
names only files that exist."""

from __future__ import annotations

import re

import yaml

from tests.support.manifests import (
    DEPLOY_README,
    DEPLOYMENTS,
    EXT_AUTHZ,
    K8S,
    ROOT,
    container_port,
    one,
    pod,
    port_of,
    proxy,
    secret_ref,
    selects,
    serve_config_of,
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
