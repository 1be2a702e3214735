"""The Envoy ext_authz gRPC front end: `envoy.service.auth.v3.Authorization/Check`.

A thin translation: CheckRequest -> `CheckRequest` view -> `ext_authz.answer`
(`Authorizer.decide_http`, then `Allow` or `Deny`) -> CheckResponse. A check Envoy sends without HTTP attributes or a
path is denied (REQUEST_MALFORMED). An unexpected failure here fails the RPC with
INTERNAL, which Envoy treats as an authorization *error* (`failure_mode_allow`,
`status_on_error`), never as an allow.

`CheckServer` serves Check and gRPC health (`wire/health_service.py`, for Envoy's health
checks) on the proxy's own gRPC server (`wire/grpc_server.py`, HTTP/2 on libnghttp2), not on
grpc.aio: a check costs a fraction of grpc.aio's CPU. An allow's answer is serialized
once and kept with the shared `Allow` (`Allow.rendered_as`), so equal allows cost no
protobuf work at all.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2

from authproxy.decide.pipeline import Authorizer
from authproxy.ext_authz.answer import Allow, Allows, CheckRequest, Deny, Headers, answer, refuse
from authproxy.wire.grpc_server import GrpcServer, Method, RpcError, framed
from authproxy.wire.h2_engine import Limits
from authproxy.wire.h2_server import PREFACE_TIMEOUT
from authproxy.wire.health_service import HealthService
from authproxy.wire.message_types import MessageTypes

if TYPE_CHECKING:
    from authproxy.runtime.tracing import Tracing

log = logging.getLogger("authproxy.ext_authz")

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
CHECK = f"/{SERVICE_NAME}/Check"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
#: This front end's key for `Allow.rendered_as`: the framed CheckResponse.
_RENDERED = "grpc"


class CheckService:
    """Check: a CheckRequest in, a framed CheckResponse out (`grpc_server.Method.unary`)."""

    def __init__(
        self,
        authorizer: Authorizer,
        tracing: Tracing | None = None,
        types: MessageTypes | None = None,
    ) -> None:
        """`tracing`: a span per check (None: off); `types`: request message types."""
        self.authorizer = authorizer
        self.types = types
        self.decide_http = authorizer.decide_http
        if tracing is not None:
            self.decide_http = tracing.decide_http(authorizer.decide_http, "ext_authz.grpc")
        self.allows = Allows()
        self.errors_total = 0

    def method(self) -> Method:
        return Method(external_auth_pb2.CheckRequest.FromString, unary=self.check)

    async def check(self, request: external_auth_pb2.CheckRequest) -> bytes:
        try:
            return await self._check(request)
        except Exception:
            self.errors_total += 1
            log.exception("ext_authz check failed; answering INTERNAL (an error for Envoy)")
            raise RpcError(grpc.StatusCode.INTERNAL, "authorization check failed") from None

    async def _check(self, request: external_auth_pb2.CheckRequest) -> bytes:
        attributes = request.attributes
        http = attributes.request.http
        source = attributes.source
        address = source.address.socket_address.address
        # `source.principal`: the client certificate's URI SAN (else subject) as Envoy
        # verified it on an mTLS listener; empty otherwise.
        check = CheckRequest(
            http.method,
            http.path,
            _headers(http),
            address or None,
            source.principal or None,
            http.raw_body or None,  # `pack_as_bytes`: gRPC frames stay bytes
        )
        if not attributes.request.HasField("http") or not http.path or not http.method:
            result: Allow | Deny = refuse(
                self.authorizer, check, "the check request has no HTTP method and path"
            )
        else:
            result = await answer(self.authorizer, check, self.allows, self.types, self.decide_http)
        if isinstance(result, Allow):
            return result.rendered_as(_RENDERED, _allow)
        return framed(
            external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=result.grpc_code, message=result.message),
                denied_response=external_auth_pb2.DeniedHttpResponse(
                    status=http_status_pb2.HttpStatus(code=result.status),
                    headers=_options(result.headers),
                    body=result.body,
                ),
                dynamic_metadata=_struct(result.metadata),
            ).SerializeToString()
        )


def _allow(result: Allow) -> bytes:
    """The framed CheckResponse of an allow."""
    return framed(
        external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=0),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=_options(result.headers), headers_to_remove=result.remove
            ),
            dynamic_metadata=_struct(result.metadata),
        ).SerializeToString()
    )


def _struct(values: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _headers(http) -> Headers:
    """Headers from `header_map` (raw or text values) or, when that is empty, `headers`."""
    entries = http.header_map.headers
    if entries:
        return tuple(
            (h.key, h.raw_value.decode("latin-1") if h.raw_value else h.value) for h in entries
        )
    return tuple(http.headers.items())


def _options(headers: Headers) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
        )
        for key, value in headers
    ]


class CheckServer:
    """The ext_authz gRPC listener: Check plus gRPC health (for Envoy's health checks).

    `start` binds and listens (OSError when the port cannot be had). `stop(grace)`: health turns NOT_SERVING (Watch
    streams are told), GOAWAY, the checks in flight are answered within `grace`, then
    what is still open ends UNAVAILABLE and the connections close."""

    def __init__(
        self,
        authorizer: Authorizer,
        listen: str,
        reuse_port: bool = False,
        tracing: Tracing | None = None,
        *,
        limits: Limits | None = None,
        preface_timeout: float = PREFACE_TIMEOUT,
        types: MessageTypes | None = None,
    ) -> None:
        """`reuse_port`: SO_REUSEPORT, so several worker processes share the port.
        `limits`: what one connection may cost (streams, header lists, flood defences).
        `tracing`: a span per check, continuing the checked request's trace (None: off).
        `types`: request message types (descriptor sets), for rules on request fields."""
        self.service = CheckService(authorizer, tracing, types)
        self.health = HealthService()
        methods = {CHECK: self.service.method(), **self.health.methods()}
        self.server = GrpcServer(methods, limits, preface_timeout)
        self.address = listen
        self.reuse_port = reuse_port
        self.port = 0  # known once started

    @property
    def errors_total(self) -> int:
        """Checks that failed unexpectedly (what `/metrics` reports)."""
        return self.service.errors_total

    async def start(self) -> None:
        self.port = await self.server.listen(self.address, reuse_port=self.reuse_port)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        self.health.enter_graceful_shutdown()
        if self.server.servers:
            await self.server.stop(grace)
