"""How a deny `Decision` is told to a gRPC client: status code, message, and a
`google.rpc.Status` with an `ErrorInfo` in `grpc-status-details-bin` (AIP-193 style),
plus a `RetryInfo` saying when to retry for a rate-limited call."""

from __future__ import annotations

from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from authproxy.decide.decision import Decision
from authproxy.decide.reasons import ERROR_DOMAIN

DETAILS_KEY = "grpc-status-details-bin"
#: Deny messages travel twice (grpc-message and the details trailer); keep them short.
MAX_MESSAGE = 512


def deny_details(decision: Decision) -> tuple[str, tuple[tuple[str, bytes], ...]]:
    """(message, trailing metadata) for a denied call."""
    assert decision.reason is not None
    message = f"{decision.reason}: {decision.message}"[:MAX_MESSAGE]
    info = error_details_pb2.ErrorInfo(
        reason=decision.reason.value,
        domain=ERROR_DOMAIN,
        metadata={"level": decision.level, "policy_version": decision.policy_version},
    )
    details = [_packed(info)]
    if decision.retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(round(decision.retry_after * 1e9))
        details.append(_packed(retry))
    status = status_pb2.Status(code=decision.status.value[0], message=message, details=details)
    return message, ((DETAILS_KEY, status.SerializeToString()),)


def _packed(message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail
