"""A rule's `request:` block: fields of the request message that must equal claims.

The decision on the call's headers says whether fields are to be checked at all
(`field_check`: not for a caller with one of `unless_roles`); the front end then hands
every request message to `FieldCheck.check` before any of its bytes reach the backend.
Descriptors come from `wire/message_types.py` (a descriptor set or the backend's
reflection). Every failure is a deny, never a pass:

- `FIELD_MISMATCH` (PERMISSION_DENIED): a field differs from its claim, is unset (unless
  `allow_unset`), the message does not parse as the method's type, is compressed in an
  encoding the proxy cannot read, or the type has no such field.
- `FIELDS_UNAVAILABLE` (UNAVAILABLE): the proxy cannot read fields yet — no descriptor for
  the method (reflection not answered), or Envoy sent no request body.

Messages name the field and the claim, never their values.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError, Message

from authproxy.decide.reasons import Denied, Reason
from authproxy.policy.claims import MISSING, ClaimPath
from authproxy.policy.yaml_source import SourceError

if TYPE_CHECKING:
    from authproxy.decide.decision import Decision
    from authproxy.decide.identity import Identity
    from authproxy.policy.model import Policy, Rule
    from authproxy.wire.message_types import MessageTypes

#: The largest message a compressed one may inflate to when no other limit applies (Envoy
#: ext_authz bodies; the sidecar uses `--max-message-bytes`).
MAX_UNCOMPRESSED = 4 << 20
#: Compressed request messages the proxy can read (`grpc-encoding`), as zlib `wbits`.
_ENCODINGS = {b"gzip": 31, b"deflate": 15}


class FieldCheck:
    """The fields each request message of one call must hold."""

    __slots__ = ("allow_unset", "expected", "message_class", "type_name")

    def __init__(
        self,
        message_class: type[Message],
        expected: tuple[tuple[tuple[str, ...], Any, ClaimPath], ...],
        allow_unset: bool,
    ) -> None:
        self.message_class = message_class
        self.type_name = message_class.DESCRIPTOR.full_name
        self.expected = expected
        self.allow_unset = allow_unset

    def check(self, compressed: bool, payload: bytes, encoding: bytes | None, limit: int) -> None:
        """Raise `Denied` unless the message (`payload`, as framed) holds every field."""
        if compressed:
            payload = _decompressed(payload, encoding, limit)
        try:
            message = self.message_class.FromString(payload)
        except DecodeError:
            raise Denied(
                Reason.FIELD_MISMATCH, f"the request message is not a valid {self.type_name}"
            ) from None
        for path, wanted, claim in self.expected:
            _hold(_field(message, path, self.type_name), path, wanted, claim, self.allow_unset)


def field_check(decision: Decision, types: MessageTypes | None) -> FieldCheck | None:
    """What the call's request messages must hold: None when the rule checks no fields
    or the caller is exempt (`unless_roles`). Raises `Denied` when they cannot be
    checked (no descriptor) or a claim to compare with is missing."""
    if not decision.allowed or decision.identity is None:
        return None
    expected = expected_fields(decision.rule, decision.identity)
    if expected is None:
        return None
    message_class = None if types is None else types.message_class(decision.method)
    if message_class is None:
        raise Denied(
            Reason.FIELDS_UNAVAILABLE,
            f"no descriptor of {decision.method}'s request type (yet): give"
            " --descriptor-set, or wait for the backend's reflection",
        )
    return FieldCheck(message_class, expected, decision.rule.request.allow_unset)  # type: ignore[union-attr]


def check_fields_json(rule: Rule, identity: Identity, fields: Mapping[str, Any]) -> None:
    """The same check on a request written as JSON (`explain --request`, policy tests):
    nested objects for nested messages, a field left out is unset. Raises `Denied`."""
    expected = expected_fields(rule, identity)
    if expected is None:
        return
    allow_unset = rule.request.allow_unset  # type: ignore[union-attr]
    for path, wanted, claim in expected:
        value: Any = fields
        for name in path:
            value = value.get(name, "") if isinstance(value, Mapping) else ""
        _hold(value, path, wanted, claim, allow_unset)


def expected_fields(
    rule: Rule, identity: Identity
) -> tuple[tuple[tuple[str, ...], Any, ClaimPath], ...] | None:
    """(field path, the claim's value, the claim) for each field the call's request must
    hold; None when the rule checks none or the caller is exempt (`unless_roles`)."""
    ownership = rule.request
    if ownership is None:
        return None
    if ownership.unless_roles and not ownership.unless_roles.isdisjoint(identity.roles):
        return None
    expected = []
    for path, claim in ownership.equal_claims:
        value = claim.read(identity.claims)
        if value is MISSING or isinstance(value, bool) or not isinstance(value, str | int):
            raise Denied(
                Reason.FIELD_MISMATCH,
                f"request field {'.'.join(path)} is compared with claim '{claim}', which the"
                " token lacks (or is not a string or integer)",
            )
        expected.append((path, value, claim))
    return tuple(expected)


def field_problems(path: tuple[str, ...], message_class: type[Message]) -> str | None:
    """Why a field path cannot be checked on a message type (missing, repeated, a map, a
    message or a type other than string or integer); None when it can."""
    descriptor = message_class.DESCRIPTOR
    for depth, name in enumerate(path):
        field = descriptor.fields_by_name.get(name)
        if field is None:
            return f"{descriptor.full_name} has no field {name!r}"
        if field.is_repeated:
            return f"field {'.'.join(path[: depth + 1])} is repeated"
        if depth < len(path) - 1:
            if field.message_type is None:
                return f"field {'.'.join(path[: depth + 1])} is not a message"
            descriptor = field.message_type
        elif field.message_type is not None or field.type in _NOT_COMPARABLE:
            return f"field {'.'.join(path)} is not a string or an integer"
    return None


def request_field_problems(policy: Policy, types: MessageTypes) -> list[SourceError]:
    """`file:line: problem` for each `request:` field the method's known type lacks or
    cannot compare (an exact method's rule: its type; a service wildcard's: each method
    of the service that `types` knows). Types not known yet are not judged."""
    problems = []
    rules = [(m, r) for m, r in policy.exact.items() if r.request is not None]
    for method in types.inputs:
        service = method[1 : method.rfind("/")]
        wildcard = policy.services.get(service)
        if method not in policy.exact and wildcard is not None and wildcard.request is not None:
            rules.append((method, wildcard))
    for method, rule in rules:
        message_class = types.message_class(method)
        if message_class is None or rule.request is None:
            continue
        for path, _ in rule.request.equal_claims:
            problem = field_problems(path, message_class)
            if problem is not None:
                where = f"{rule.pattern}: request field {'.'.join(path)} of {method}: {problem}"
                problems.append(SourceError(policy.source, rule.request.line, where))
    return problems


def missing_types(policy: Policy, types: MessageTypes) -> list[str]:
    """Methods named exactly by a `request:` rule whose request type is not known (yet)."""
    return sorted(
        m for m, r in policy.exact.items() if r.request is not None and not types.message_class(m)
    )


#: FieldDescriptor types a claim is never compared with: double, float, bool, bytes, enum.
_NOT_COMPARABLE = frozenset((1, 2, 8, 12, 14))


def _field(message: Message, path: tuple[str, ...], type_name: str) -> Any:
    value: Any = message
    for name in path:
        try:
            value = getattr(value, name)
        except AttributeError:
            raise Denied(Reason.FIELD_MISMATCH, f"{type_name} has no field {name!r}") from None
    return value


def _hold(
    value: Any, path: tuple[str, ...], wanted: Any, claim: ClaimPath, allow_unset: bool
) -> None:
    """Raise FIELD_MISMATCH unless the field's `value` is the claim's (`wanted`), or unset
    ("", 0) where that is allowed."""
    if allow_unset and value in ("", 0) and not isinstance(value, bool):
        return
    if not _equal(value, wanted):
        raise Denied(
            Reason.FIELD_MISMATCH,
            f"request field {'.'.join(path)} must equal the token's claim '{claim}'",
        )


def _equal(value: Any, wanted: Any) -> bool:
    if isinstance(value, str):
        return isinstance(wanted, str) and value == wanted
    if isinstance(value, int) and not isinstance(value, bool):
        return value == wanted if isinstance(wanted, int) else str(value) == wanted
    return False


def _decompressed(payload: bytes, encoding: bytes | None, limit: int) -> bytes:
    wbits = _ENCODINGS.get(encoding or b"")
    if wbits is None:
        # The encoding is the caller's header: named by the proxy's words, never echoed.
        raise Denied(
            Reason.FIELD_MISMATCH,
            "the request message is compressed in an encoding the proxy cannot read"
            " (it reads gzip and deflate): send it uncompressed or gzip",
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(payload, limit + 1)
    except zlib.error:
        raise Denied(Reason.FIELD_MISMATCH, "the compressed request message is corrupt") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise Denied(Reason.FIELD_MISMATCH, "the request message is larger than max uncompressed")
    return out
