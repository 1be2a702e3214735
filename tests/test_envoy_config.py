"""The example Envoy config parses into the real Envoy API and wires ext_authz correctly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (registers the type)
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from authproxy.ext_authz.grpc_check import SERVICE_NAME
from authproxy.policy.strip_headers import DEFAULT_STRIP, OVERRIDE_HEADERS

ENVOY_YAML = Path(__file__).resolve().parent.parent / "examples" / "envoy" / "envoy.yaml"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@pytest.fixture(scope="module")
def text() -> str:
    return ENVOY_YAML.read_text()


@pytest.fixture(scope="module")
def bootstrap(text: str) -> bootstrap_pb2.Bootstrap:
    # ParseDict refuses unknown fields, so a misspelt or removed field fails here.
    return json_format.ParseDict(yaml.safe_load(text), bootstrap_pb2.Bootstrap())


def connection_manager(bootstrap: bootstrap_pb2.Bootstrap) -> hcm_pb2.HttpConnectionManager:
    (listener,) = bootstrap.static_resources.listeners
    (chain,) = listener.filter_chains
    (network_filter,) = chain.filters
    hcm = hcm_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(hcm)
    return hcm


def cluster(bootstrap: bootstrap_pb2.Bootstrap, name: str) -> cluster_pb2.Cluster:
    found = [c for c in bootstrap.static_resources.clusters if c.name == name]
    assert len(found) == 1, f"cluster {name!r} missing or duplicated"
    return found[0]


def port_of(c: cluster_pb2.Cluster) -> int:
    (group,) = c.load_assignment.endpoints
    (endpoint,) = group.lb_endpoints
    return endpoint.endpoint.address.socket_address.port_value


def speaks_http2(c: cluster_pb2.Cluster) -> bool:
    if HTTP_OPTIONS not in c.typed_extension_protocol_options:
        return False
    options = http_protocol_options_pb2.HttpProtocolOptions()
    assert c.typed_extension_protocol_options[HTTP_OPTIONS].Unpack(options)
    return options.explicit_http_config.HasField("http2_protocol_options")


def test_ext_authz_runs_before_the_router(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    names = [f.name for f in connection_manager(bootstrap).http_filters]
    assert names == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]


def test_ext_authz_uses_grpc_mode_fail_closed_with_a_short_timeout(
    bootstrap: bootstrap_pb2.Bootstrap,
) -> None:
    ext = ext_authz_pb2.ExtAuthz()
    assert connection_manager(bootstrap).http_filters[0].typed_config.Unpack(ext)
    assert ext.WhichOneof("services") == "grpc_service"
    assert ext.transport_api_version == config_source_pb2.ApiVersion.V3
    assert ext.failure_mode_allow is False
    assert ext.status_on_error.code == 503  # errors look like UNAVAILABLE, not a policy deny
    timeout = ext.grpc_service.timeout.ToTimedelta().total_seconds()
    assert 0 < timeout <= 1.0
    authz = cluster(bootstrap, ext.grpc_service.envoy_grpc.cluster_name)
    assert speaks_http2(authz), "the Check cluster must speak HTTP/2 (gRPC)"
    (check,) = authz.health_checks
    assert check.grpc_health_check.service_name == SERVICE_NAME


def test_the_commented_command_matches_the_check_cluster(
    text: str, bootstrap: bootstrap_pb2.Bootstrap
) -> None:
    match = re.search(r"--ext-authz-grpc 127\.0\.0\.1:(\d+)", text)
    assert match, "envoy.yaml should show how to run authproxy next to it"
    assert int(match.group(1)) == port_of(cluster(bootstrap, "authproxy"))


def test_paths_and_headers_are_hardened(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    hcm = connection_manager(bootstrap)
    assert hcm.normalize_path.value is True
    assert hcm.merge_slashes is True
    assert hcm.path_with_escaped_slashes_action == hcm_pb2.HttpConnectionManager.REJECT_REQUEST
    underscores = hcm.common_http_protocol_options.headers_with_underscores_action
    assert underscores != 0, "x_auth_* spellings must not reach the backend (ALLOW is 0)"


def test_backend_cluster_speaks_http2(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    hcm = connection_manager(bootstrap)
    (vhost,) = hcm.route_config.virtual_hosts
    (route,) = vhost.routes
    assert route.route.timeout.ToTimedelta().total_seconds() == 0  # streams are not cut
    assert speaks_http2(cluster(bootstrap, route.route.cluster))


def test_the_commented_http_mode_variant_is_valid(
    text: str, bootstrap: bootstrap_pb2.Bootstrap
) -> None:
    block = re.search(r"# BEGIN http-mode\n(.*?)\n\s*# END http-mode", text, re.S)
    assert block, "envoy.yaml should carry the HTTP-mode variant between BEGIN/END markers"
    lines = block.group(1).splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines)
    source = "\n".join(line[indent:].removeprefix("# ").removeprefix("#") for line in lines)
    data = yaml.safe_load(source)
    assert data.pop("@type").endswith("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz")
    ext = json_format.ParseDict(data, ext_authz_pb2.ExtAuthz())
    assert ext.WhichOneof("services") == "http_service"
    assert ext.failure_mode_allow is False
    assert ext.status_on_error.code == 503
    service = ext.http_service
    assert service.path_prefix == "/check"
    allowed = {
        (p.WhichOneof("match_pattern"), getattr(p, p.WhichOneof("match_pattern")))
        for p in service.authorization_request.allowed_headers.patterns
    }
    assert ("exact", "content-type") in allowed  # tells gRPC from plain HTTP
    assert ("prefix", "x-auth-") in allowed  # so spoofed identity headers are seen
    # Override headers reach authproxy (refused when they name another method or URL), and
    # so do names under the default strip prefixes (only names seen can be removed).
    assert {("exact", name) for name in OVERRIDE_HEADERS} <= allowed
    assert {("prefix", prefix) for prefix in DEFAULT_STRIP.prefixes} <= allowed
    upstream = [
        (p.WhichOneof("match_pattern"), getattr(p, p.WhichOneof("match_pattern")))
        for p in service.authorization_response.allowed_upstream_headers.patterns
    ]
    assert upstream == [("prefix", "x-auth-")]
    client = {
        getattr(p, p.WhichOneof("match_pattern"))
        for p in service.authorization_response.allowed_client_headers.patterns
    }
    assert {"www-authenticate", "content-type", "grpc-"} <= client
    http_cluster = cluster(bootstrap, service.server_uri.cluster)
    match = re.search(
        r"--ext-authz-http 127\.0\.0\.1:(\d+) --ext-authz-http-path-prefix (\S+)", text
    )
    assert match, "envoy.yaml should show how to run authproxy in HTTP mode"
    assert int(match.group(1)) == port_of(http_cluster)
    assert match.group(2) == service.path_prefix
