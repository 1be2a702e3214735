"""Clients and helpers for the Envoy ext_authz tests: CheckRequests built the way Envoy
builds them (from the xds-protos API), and readers for what the proxy answers. Raw
HTTP/1.1 to the HTTP front end is in `ext_authz_http`.

Both front ends run for real on loopback (`running_proxy.start_ext_authz`); nothing
here stands in for a server.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from authproxy.decide.reasons import Reason
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import RunningProxy, start_ext_authz

GRPC_CONTENT_TYPE = "application/grpc"
Pairs = Iterable[tuple[str, str]]

#: TEST_POLICY plus `http:` route rules, deliberately listed least specific first so the
#: tests show that specificity, not file order, picks the rule.
ROUTES_POLICY = (
    TEST_POLICY
    + """\
http:
  "* /api/**": deny
  "GET /api/public/**": public
  "* /api/messages/*": deny
  "GET /api/messages/{room}": access
  "GET /api/messages/pinned": public
  "POST /api/auth/refresh": refresh
  "* /api/admin/**": {level: access, roles: [admin]}
  "DELETE /api/messages/{room}": deny
  "GET /api/status/**": public
  "GET /api/status": {level: access, roles: [ops]}
  "* /test.Admin/**": public
"""
)


@asynccontextmanager
async def running_ext_authz(
    tmp_path: Path, keys: Keys, **kwargs: Any
) -> AsyncIterator[RunningProxy]:
    """`start_ext_authz` with its servers stopped again afterwards."""
    running = await start_ext_authz(tmp_path, keys, **kwargs)
    try:
        yield running
    finally:
        await running.stop()


# --- the gRPC Check API ------------------------------------------------------------------


def http_attributes(
    path: str,
    *,
    method: str = "POST",
    token: str | None = None,
    headers: Pairs = (),
    grpc: bool = True,
    form: str = "headers",
) -> attribute_context_pb2.AttributeContext.HttpRequest:
    """The `attributes.request.http` Envoy sends for one request.

    `form` is where the headers go: "headers" (the string map; repeated names are joined
    with "," as Envoy does), "header_map" (entries with `value`) or "raw" (entries with
    `raw_value` bytes, what current Envoy sends).
    """
    pairs: list[tuple[str, str]] = []
    if grpc:
        pairs.append(("content-type", GRPC_CONTENT_TYPE))
    pairs.extend(headers)
    if token is not None:
        pairs.append(("authorization", f"Bearer {token}"))
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1", method=method, path=path, host="backend.local", scheme="http", protocol="HTTP/2"
    )
    if form == "headers":
        merged: dict[str, str] = {}
        for key, value in pairs:
            merged[key] = f"{merged[key]},{value}" if key in merged else value
        http.headers.update(merged)
    elif form in ("header_map", "raw"):
        for key, value in pairs:
            entry = http.header_map.headers.add(key=key)
            if form == "raw":
                entry.raw_value = value.encode("latin-1")
            else:
                entry.value = value
    else:
        raise ValueError(f"unknown header form {form!r}")
    return http


def check_request(path: str, **kwargs: Any) -> external_auth_pb2.CheckRequest:
    """A CheckRequest for one HTTP request (see `http_attributes` for the arguments)."""
    return wrap(http_attributes(path, **kwargs))


def wrap(
    http: attribute_context_pb2.AttributeContext.HttpRequest,
) -> external_auth_pb2.CheckRequest:
    attributes = attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http)
    )
    return external_auth_pb2.CheckRequest(attributes=attributes)


async def check(
    running: RunningProxy, request: external_auth_pb2.CheckRequest
) -> external_auth_pb2.CheckResponse:
    stub = external_auth_pb2_grpc.AuthorizationStub(running.check)
    return await stub.Check(request, timeout=10)


async def check_path(
    running: RunningProxy, path: str, **kwargs: Any
) -> external_auth_pb2.CheckResponse:
    return await check(running, check_request(path, **kwargs))


def set_headers(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    """The headers an allow sets on the upstream request (each name once)."""
    options = response.ok_response.headers
    out = {o.header.key: o.header.value for o in options}
    assert len(out) == len(options), "a header is set more than once"
    return out


def denied_headers(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    options = response.denied_response.headers
    out = {o.header.key: o.header.value for o in options}
    assert len(out) == len(options), "a deny header is sent more than once"
    return out


def metadata(response: external_auth_pb2.CheckResponse) -> dict[str, Any]:
    """The dynamic metadata, as plain Python values (Struct numbers are floats)."""
    return json_format.MessageToDict(response.dynamic_metadata)


def outcome(response: external_auth_pb2.CheckResponse) -> str:
    """ "ALLOW", or the deny reason from the dynamic metadata."""
    if response.status.code == 0 and response.HasField("ok_response"):
        return "ALLOW"
    return metadata(response).get("reason", f"DENY without reason ({response.status.code})")


async def outcomes(
    running: RunningProxy, requests: dict[str, external_auth_pb2.CheckRequest]
) -> dict[str, str]:
    """label -> outcome for many checks at once."""
    responses = await asyncio.gather(*(check(running, r) for r in requests.values()))
    return {label: outcome(r) for label, r in zip(requests, responses, strict=True)}


# --- what a deny carries ---------------------------------------------------------------


def unpadded_b64decode(text: str) -> bytes:
    """gRPC binary header values are base64, padding optional."""
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def status_details(value: str) -> tuple[status_pb2.Status, error_details_pb2.ErrorInfo]:
    """The google.rpc.Status in a `grpc-status-details-bin` value, and its ErrorInfo."""
    status = status_pb2.Status.FromString(unpadded_b64decode(value))
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, f"expected one ErrorInfo, got {len(infos)}"
    return status, infos[0]


#: gRPC status code (number) and HTTP status of each deny reason.
GRPC_CODE = {
    Reason.REQUEST_MALFORMED: 3,
    Reason.INSUFFICIENT_ROLE: 7,
    Reason.INSUFFICIENT_PERMISSION: 7,
    Reason.INSUFFICIENT_SCOPE: 7,
    Reason.CLAIM_MISMATCH: 7,
    Reason.HEADER_MISMATCH: 7,
    Reason.FIELD_MISMATCH: 7,
    Reason.FIELDS_UNAVAILABLE: 14,
    Reason.METHOD_DENIED: 7,
    Reason.METHOD_MALFORMED: 7,
}
HTTP_CODE = {3: 400, 7: 403, 14: 503, 16: 401}


def grpc_code(reason: str) -> int:
    return GRPC_CODE.get(Reason(reason), 16)
