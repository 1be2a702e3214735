"""Finding the bearer token in request headers (RFC 6750 `Authorization: Bearer ...`)."""

from __future__ import annotations

from collections.abc import Iterable

from authproxy.decide.reasons import Denied, Reason

AUTHORIZATION = "authorization"
_SCHEME = "bearer"


def extract_bearer(headers: Iterable[tuple[str, str | bytes]], max_bytes: int) -> str:
    """The single bearer token in `headers`; raises `Denied` when missing or ambiguous.

    Header names compare case-insensitively; the scheme is case-insensitive too. Two or
    more `authorization` headers are refused rather than guessing which one counts.
    """
    value: str | bytes | None = None
    count = 0
    for k, v in headers:  # a plain loop: no list built per call
        if len(k) == 13 and (k == AUTHORIZATION or k.lower() == AUTHORIZATION):
            value = v
            count += 1
    if value is None:
        raise Denied(Reason.TOKEN_MISSING, "no authorization header with a bearer token")
    if count > 1:
        raise Denied(Reason.TOKEN_AMBIGUOUS, f"{count} authorization headers; send exactly one")
    if isinstance(value, bytes):
        raise Denied(Reason.TOKEN_MALFORMED, "authorization header must be text")
    if len(value) > max_bytes + 16:
        raise Denied(
            Reason.TOKEN_TOO_LARGE, f"authorization header is {len(value)} bytes; limit {max_bytes}"
        )
    # Only spaces separate (RFC 6750 `Bearer 1*SP b64token`); CR, LF, TAB are never trimmed.
    scheme, _, token = value.strip(" ").partition(" ")
    if scheme.lower() != _SCHEME:
        raise Denied(Reason.TOKEN_MALFORMED, "authorization header must use the Bearer scheme")
    token = token.strip(" ")
    if not token:
        raise Denied(Reason.TOKEN_MALFORMED, "authorization header has an empty bearer token")
    return token
