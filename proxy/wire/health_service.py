"""`grpc.health.v1.Health` on the proxy's gRPC server (`wire/grpc_server.py`), answering as
grpc's own `HealthServicer` does, so Envoy's gRPC health checks (and any grpc_health
client) see the same thing: Check gives a service's status, or NOT_FOUND for a service
never set; Watch sends the current status (SERVICE_UNKNOWN for an unknown service), then
every change, and stays open. Once graceful shutdown begins every service is NOT_SERVING
(each Watch is told) and later `set` calls are ignored, so a load balancer stops sending
new work while the calls in flight finish.
"""

from __future__ import annotations

from grpc import StatusCode
from grpc_health.v1 import health_pb2

from authproxy.wire.grpc_server import Method, RpcError, Stream, framed

CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"
Status = health_pb2.HealthCheckResponse.ServingStatus
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def _message(status: Status) -> bytes:
    return framed(health_pb2.HealthCheckResponse(status=status).SerializeToString())


class HealthService:
    def __init__(self) -> None:
        self.statuses: dict[str, Status] = {}
        self.watchers: dict[str, set[Stream]] = {}
        self.shutting_down = False

    def methods(self) -> dict[str, Method]:
        """The two methods, for `GrpcServer`."""
        parse = health_pb2.HealthCheckRequest.FromString
        return {CHECK: Method(parse, unary=self.check), WATCH: Method(parse, stream=self.watch)}

    def set(self, service: str, status: Status) -> None:
        """Set a service's status and tell its watchers (ignored once shutting down)."""
        if not self.shutting_down:
            self._set(service, status)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        if self.shutting_down:
            return
        for service in list(self.statuses):
            self._set(service, _NOT_SERVING)
        self.shutting_down = True

    def _set(self, service: str, status: Status) -> None:
        if self.statuses.get(service) == status:
            return  # a Watch is told changes only
        self.statuses[service] = status
        message = _message(status)
        for stream in list(self.watchers.get(service, ())):
            stream.send(message)

    async def check(self, request: health_pb2.HealthCheckRequest) -> bytes:
        status = self.statuses.get(request.service)
        if status is None:
            raise RpcError(StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return _message(status)

    def watch(self, request: health_pb2.HealthCheckRequest, stream: Stream) -> None:
        service = request.service
        stream.send(_message(self.statuses.get(service, _SERVICE_UNKNOWN)))
        watchers = self.watchers.setdefault(service, set())
        watchers.add(stream)

        def gone() -> None:
            watchers.discard(stream)
            if not watchers and self.watchers.get(service) is watchers:
                del self.watchers[service]

        stream.on_close = gone
