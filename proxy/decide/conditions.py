"""A rule's `when:` conditions, checked against the verified claims and the request.

Every condition must hold; the first that does not is the deny:

- `CLAIM_MISMATCH`: a claim is missing, has another value, or another JSON type (`true`
  is not `"true"`, `1` is not `true`). For a list claim (`groups: [a, b]`), `equals` and
  `in` hold when one of its items matches.
- `HEADER_MISMATCH`: a request header bound to a claim (`equals_header`) is missing,
  sent more than once (which copy would the backend read?), or differs from the claim.

Messages name the claim and the header, never the values: a deny travels back to
the caller and into logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from authproxy.decide.reasons import Denied, Reason
from authproxy.policy.claims import EQUALS_HEADER, MISSING, PRESENT, ClaimCondition, Scalar


def check_conditions(
    conditions: tuple[ClaimCondition, ...],
    claims: Mapping[str, Any],
    headers: Iterable[tuple[str, str | bytes]],
) -> None:
    """Raise `Denied` at the first condition that does not hold."""
    for condition in conditions:
        value = condition.claim.read(claims)
        if condition.operator == EQUALS_HEADER:
            _check_header(condition, value, headers)
        elif condition.operator == PRESENT:
            if (value is not MISSING) != condition.values[0]:
                state = "has no" if value is MISSING else "must not have the"
                raise Denied(Reason.CLAIM_MISMATCH, f"the token {state} claim '{condition.claim}'")
        elif value is MISSING:
            raise Denied(Reason.CLAIM_MISMATCH, f"the token has no claim '{condition.claim}'")
        elif not _matches(value, condition.values):
            raise Denied(
                Reason.CLAIM_MISMATCH,
                f"claim '{condition.claim}' does not hold: this method needs {condition}",
            )


def _matches(value: Any, accepted: tuple[Scalar, ...]) -> bool:
    items = value if isinstance(value, list) else (value,)
    return any(_same(item, wanted) for item in items for wanted in accepted)


def _same(item: Any, wanted: Scalar) -> bool:
    """Equal and of the same JSON type (bool is no integer here)."""
    return type(item) is type(wanted) and item == wanted


def _check_header(
    condition: ClaimCondition, value: Any, headers: Iterable[tuple[str, str | bytes]]
) -> None:
    name = condition.header
    found = [v for k, v in headers if k.lower() == name]
    if not found:
        raise Denied(Reason.HEADER_MISMATCH, f"this method needs the header {name}")
    if len(found) > 1:
        raise Denied(Reason.HEADER_MISMATCH, f"the header {name} is sent {len(found)} times")
    if isinstance(value, bool) or not isinstance(value, str | int):
        state = "no" if value is MISSING else "no string or integer"
        raise Denied(
            Reason.HEADER_MISMATCH,
            f"the header {name} must equal claim '{condition.claim}'; the token has {state}"
            " such claim",
        )
    sent = found[0]
    text = sent.decode("latin-1") if isinstance(sent, bytes) else sent
    if text != str(value):
        raise Denied(
            Reason.HEADER_MISMATCH,
            f"the header {name} does not equal the token's claim '{condition.claim}'",
        )
