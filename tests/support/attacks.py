"""Shared pieces of the JWT attack tests: cases, outcomes, attacker keys.

Every case is a real gRPC call to a sidecar with the echo backend behind it (both the
unary and the stream path, see the `proxy` fixture). A denied call must carry the exact
status code and `ErrorInfo` reason, and the backend must never see it. Tokens the
issuer would never produce are built by hand in `tests/support/jws.py`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from authproxy.keys.issuer import SigningKey
from authproxy.keys.keyset import public_jwk
from tests.support.echo_backend import EchoBackend
from tests.support.jws import claims, craft
from tests.support.keys import Keys
from tests.support.running_proxy import RunningProxy, error_info
from tests.support.tokens import bearer

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
METHODS = {
    "public": "/test.Public/Report",
    "2fa": "/test.TwoFA/Report",
    "refresh": "/test.Refresh/Report",
    "access": "/test.Access/Report",
}
ACCESS = METHODS["access"]


@dataclass(frozen=True)
class Case:
    label: str
    reason: str
    token: str | None = None
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    method: str = ACCESS
    code: grpc.StatusCode = UNAUTH


def _metadata(case: Case) -> tuple[tuple[str, str | bytes], ...]:
    auth = bearer(case.token) if case.token is not None else ()
    return tuple(case.metadata) + auth


async def outcome(running: RunningProxy, case: Case) -> tuple[str, str | None]:
    """(status name, ErrorInfo reason) of one call; ("OK", None) when it succeeds."""
    try:
        await running.unary(case.method, metadata=_metadata(case))
    except grpc.aio.AioRpcError as error:
        try:
            info = error_info(error)
        except ValueError:  # status details that contradict the status code
            info = None
        reason = info.reason if info is not None and info.domain == "authproxy" else None
        return error.code().name, reason
    return "OK", None


async def assert_denied(running: RunningProxy, backend: EchoBackend, cases: Iterable[Case]) -> None:
    """Every case ends with its status and reason; all mismatches are reported at once."""
    cases = list(cases)
    assert len({c.label for c in cases}) == len(cases), "case labels must be unique"
    results = await asyncio.gather(*(outcome(running, c) for c in cases))
    got = {c.label: r for c, r in zip(cases, results, strict=True)}
    want = {c.label: (c.code.name, c.reason) for c in cases}
    assert got == want
    assert backend.calls == []


async def assert_allowed(running: RunningProxy, token: str, method: str = ACCESS, **kw) -> dict:
    report = await running.report(method, token=token, **kw)
    assert report["md"]["x-auth-subject"] == ["alice"]
    return report


def level_key(keys: Keys, level: str) -> SigningKey:
    """The key the `issuer` fixture signs each level with."""
    return {"access": keys.es256, "2fa": keys.rs256, "refresh": keys.refresh}[level]


@functools.cache
def attacker() -> dict[str, Any]:
    """Keys and a certificate that belong to nobody the proxy trusts."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker.example")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(ec_key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return {
        "ec": ec_key,
        "rsa": rsa_key,
        "ec_jwk": public_jwk(ec_key.public_key()),
        "rsa_jwk": public_jwk(rsa_key.public_key()),
        "x5c": [base64.b64encode(der).decode()],
        "hmac": b"attacker-controlled-secret-0123456789abcdef",
    }


def es_attacker(header: dict[str, Any], payload: Any = None) -> str:
    return craft({"alg": "ES256", **header}, payload or claims(), key=attacker()["ec"])
