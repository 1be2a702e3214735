"""The Envoy ext_authz gRPC front end: `envoy.service.auth.v3.Authorization/Check`.

A thin translation: CheckRequest -> `CheckRequest` view -> `Authorizer.decide_http` ->
`ext_authz.reply` -> CheckResponse. A check Envoy sends without HTTP attributes or a
path is denied (REQUEST_MALFORMED). An unexpected failure here fails the RPC with
INTERNAL, which Envoy treats as an authorization *error* (`failure_mode_allow`,
`status_on_error`), never as an allow.
"""

from __future__ import annotations

import logging

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .ext_authz import Allow, CheckRequest, Deny, Headers, answer, refuse
from .pipeline import Authorizer

log = logging.getLogger("authproxy.ext_authz")

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


class CheckService(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer
        self.errors_total = 0

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        try:
            return await self._check(request)
        except Exception:
            self.errors_total += 1
            log.exception("ext_authz check failed; answering INTERNAL (an error for Envoy)")
            await context.abort(grpc.StatusCode.INTERNAL, "authorization check failed")
            raise  # unreachable: abort raises

    async def _check(
        self, request: external_auth_pb2.CheckRequest
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        source = request.attributes.source
        address = source.address.socket_address.address
        # `source.principal`: the client certificate's URI SAN (else subject) as Envoy
        # verified it on an mTLS listener; empty otherwise.
        check = CheckRequest(
            http.method, http.path, _headers(http), address or None, source.principal or None
        )
        if not request.attributes.request.HasField("http") or not http.path or not http.method:
            result: Allow | Deny = refuse(
                self.authorizer, check, "the check request has no HTTP method and path"
            )
        else:
            result = await answer(self.authorizer, check)
        if isinstance(result, Allow):
            response = result.rendered.get("grpc")
            if response is None:
                response = result.rendered["grpc"] = external_auth_pb2.CheckResponse(
                    status=status_pb2.Status(code=0),
                    ok_response=external_auth_pb2.OkHttpResponse(
                        headers=_options(result.headers), headers_to_remove=result.remove
                    ),
                    dynamic_metadata=_struct(result.metadata),
                )
            return response  # never mutated after it is built: shared by equal checks
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=result.grpc_code, message=result.message),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=result.status),
                headers=_options(result.headers),
                body=result.body,
            ),
            dynamic_metadata=_struct(result.metadata),
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


_QUEUE_LIMIT = 2**31 - 1


class CheckServer:
    """The ext_authz gRPC listener: Check plus gRPC health (for Envoy's health checks)."""

    def __init__(self, authorizer: Authorizer, listen: str, reuse_port: bool = False) -> None:
        """`reuse_port`: SO_REUSEPORT, so several worker processes share the port."""
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", int(reuse_port)),
                # grpc core cancels (CANCELLED) a random share of the calls queued for a
                # grpc.aio server above 1,000 and all above 3,000: a burst from Envoy would
                # become failed Checks. Envoy bounds its own concurrent streams per
                # connection; the queue is not bounded again here.
                ("grpc.server.max_pending_requests", _QUEUE_LIMIT),
                ("grpc.server.max_pending_requests_hard_limit", _QUEUE_LIMIT),
            ]
        )
        self.service = CheckService(authorizer)
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self.service, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")

    @property
    def errors_total(self) -> int:
        """Checks that failed unexpectedly (what `/metrics` reports)."""
        return self.service.errors_total

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
