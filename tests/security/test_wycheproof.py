"""Wycheproof JSON Web Signature vectors against the signature layer and the real proxy.

Data: tests/data/wycheproof/json_web_signature_test.json (C2SP/wycheproof, Apache-2.0; see
the README beside it). 401 compact JWS cases in groups that each carry the key as a JWK;
355 must be rejected. The payloads are not JWT claim sets, so a vector whose signature
verifies still ends in TOKEN_MALFORMED ("payload is not valid JSON"). To tell "rejected
by the signature layer" from "signature accepted, then refused because the payload is not
a claim set", `SignatureProbe` records whether the product's signature check succeeded.

Three directions:

a. every must-reject vector is rejected, either when its key is loaded (the product
   refuses or skips the JWK) or by `TokenVerifier.signature` before any signature is
   accepted — except tcId 367/370, which are byte-identical to the valid tcId 357;
b. valid vectors pass the signature check, except an explicit allowlist of vectors the
   product refuses on purpose (so the harness is shown to be able to fail);
c. every must-reject vector sent as a bearer token through a real sidecar is
   UNAUTHENTICATED with the same reason, and the backend never sees a call.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from authproxy.decide.reasons import Denied
from authproxy.keys.keyset import (
    _PRIVATE_MEMBERS,
    KeyLoadError,
    KeySet,
    VerificationKey,
    key_from_jwk,
)
from authproxy.keys.verify import TokenVerifier
from tests.support.echo_backend import EchoBackend
from tests.support.keys import Keys
from tests.support.policies import descriptor_set
from tests.support.running_proxy import error_info, start_sidecar
from tests.support.tokens import bearer

DATA = (
    Path(__file__).resolve().parent.parent / "data" / "wycheproof" / "json_web_signature_test.json"
)
MUST_REJECT_COUNT = 355
VALID_COUNT = 46

#: Marked invalid ("invalidBase64Padding", "invalidBase64PaddingInPayload") but byte-identical
#: to the valid tcId 357: a data error in the vector file (see the data README). A correct
#: verifier gives them 357's verdict; they are counted among the 355 and must still be
#: refused by the product (their payload "Test" is not a claim set), but their signature
#: does verify — asserted explicitly rather than hidden.
SAME_AS_VALID_357 = frozenset({367, 370})

#: Valid vectors the product refuses on purpose: tcId -> (where and with which reason, why).
REJECTED_VALID: dict[int, tuple[str, str]] = {
    **{
        tc: (
            "TOKEN_MALFORMED",
            "empty payload segment: a JWT always has a claim set, and the compact-structure "
            "check refuses empty segments before any key is used",
        )
        for tc in (259, 264, 268, 272, 320, 325)
    },
    **{
        tc: (
            "ALGORITHM_NOT_ALLOWED",
            "the token says PS384 but the key's JWK declares alg PS256 (RFC 7520 figure 20 "
            "with an alg added to the key): a key that declares alg verifies only that alg",
        )
        for tc in (346, 350)
    },
    **{
        tc: (
            "KeyLoadError",
            "the key's JWK declares the non-standard alg 'ES521' (RFC 7518 says ES512): the "
            "product refuses to load the key at all",
        )
        for tc in (347, 351)
    },
    **{
        tc: (
            "TOKEN_MALFORMED",
            "a '?' inserted in the header/payload segment is not base64url; Wycheproof calls "
            "it valid (lenient decoders skip it), a strict verifier refuses it",
        )
        for tc in (372, 373)
    },
}


@dataclass(frozen=True)
class Vector:
    tc_id: int
    group: int
    comment: str
    jws: str
    valid: bool


@dataclass(frozen=True)
class Group:
    index: int
    comment: str
    jwk: dict[str, Any]  # the verification JWK given to the product
    vectors: tuple[Vector, ...]


@dataclass(frozen=True)
class Outcome:
    vector: Vector
    stage: str  # "key-load" or "signature-layer"
    reason: str  # Denied reason, "KeyLoadError", "skipped" (key not for verification), "returned"
    signature_accepted: bool  # the product's signature check succeeded for this token


def verification_jwk(group: dict[str, Any]) -> dict[str, Any]:
    """`public` when present; else the JWK minus private members (oct keys as they are)."""
    if "public" in group:
        return dict(group["public"])
    private = group["private"]
    if private["kty"] == "oct":
        return dict(private)
    return {k: v for k, v in private.items() if k not in _PRIVATE_MEMBERS}


@functools.cache
def load() -> tuple[Group, ...]:
    doc = json.loads(DATA.read_text())
    groups = []
    for index, g in enumerate(doc["testGroups"]):
        vectors = tuple(
            Vector(t["tcId"], index, t["comment"], t["jws"], t["result"] == "valid")
            for t in g["tests"]
        )
        groups.append(Group(index, g.get("comment", ""), verification_jwk(g), vectors))
    return tuple(groups)


def all_vectors() -> list[Vector]:
    return [v for g in load() for v in g.vectors]


class SignatureProbe(TokenVerifier):
    """The product's verifier, noting whether its signature check ever succeeded."""

    def __init__(self, keys: KeySet) -> None:
        super().__init__(keys, cache_size=0)
        self.accepted = False

    def _signature_ok(self, token: str, key: VerificationKey, alg: str) -> bool:
        ok = TokenVerifier._signature_ok(token, key, alg)
        self.accepted = self.accepted or ok
        return ok


def load_key(group: Group) -> VerificationKey | str:
    """The product's key for the group, or why it has none ("KeyLoadError" / "skipped")."""
    try:
        key = key_from_jwk(group.jwk, f"wycheproof group {group.index} ({group.comment})")
    except KeyLoadError:
        return "KeyLoadError"
    return "skipped" if key is None else key


@functools.cache
def signature_layer() -> dict[int, Outcome]:
    outcomes: dict[int, Outcome] = {}
    for group in load():
        key = load_key(group)
        for v in group.vectors:
            if isinstance(key, str):
                outcomes[v.tc_id] = Outcome(v, "key-load", key, False)
                continue
            probe = SignatureProbe(KeySet([key]))
            try:
                probe.signature(v.jws)
                reason = "returned"
            except Denied as denied:
                reason = denied.reason.value
            outcomes[v.tc_id] = Outcome(v, "signature-layer", reason, probe.accepted)
    return outcomes


def test_vector_file_is_the_documented_one():
    vectors = all_vectors()
    assert len(vectors) == 401
    assert sum(not v.valid for v in vectors) == MUST_REJECT_COUNT
    assert sum(v.valid for v in vectors) == VALID_COUNT
    assert all(isinstance(v.jws, str) for v in vectors)  # compact (or JSON text) strings
    by_id = {v.tc_id: v for v in vectors}
    assert len(by_id) == len(vectors)
    for tc in SAME_AS_VALID_357:
        assert by_id[tc].jws == by_id[357].jws and not by_id[tc].valid and by_id[357].valid
    assert set(REJECTED_VALID) <= {v.tc_id for v in vectors if v.valid}


def test_every_must_reject_vector_is_rejected_at_key_load_or_signature_layer():
    outcomes = [o for o in signature_layer().values() if not o.vector.valid]
    assert len(outcomes) == MUST_REJECT_COUNT

    at_key_load = [o for o in outcomes if o.stage == "key-load"]
    at_signature = [o for o in outcomes if o.stage == "signature-layer"]
    # A key the product refuses (KeyLoadError) or skips (use: enc, key_ops without verify)
    # verifies nothing, so that group's vectors are rejected before any token is seen.
    assert all(o.reason in ("KeyLoadError", "skipped") for o in at_key_load)
    assert {o.vector.tc_id for o in at_key_load} == {353, 354, 355, 356}
    skipped_groups = {o.vector.group for o in at_key_load}
    assert all(
        load()[g].jwk.get("use") == "enc" or "verify" not in load()[g].jwk.get("key_ops", [])
        for g in skipped_groups
    )

    # Every other vector is refused by TokenVerifier.signature (never returned) ...
    returned = [o.vector.tc_id for o in at_signature if o.reason == "returned"]
    assert returned == []
    # ... and, stricter, before any signature was accepted — except the two vectors that
    # are byte-identical to a valid one, which only fail because "Test" is not JSON.
    accepted = {o.vector.tc_id for o in at_signature if o.signature_accepted}
    assert accepted == SAME_AS_VALID_357
    assert len(at_key_load) + len(at_signature) == MUST_REJECT_COUNT

    reasons = Counter(o.reason for o in at_signature if not o.signature_accepted)
    print(
        f"\nWycheproof must-reject: {len(outcomes)} vectors; {len(at_key_load)} rejected at key "
        f"load ({dict(Counter(o.reason for o in at_key_load))}); {len(at_signature)} rejected "
        f"by the signature layer: {len(at_signature) - len(accepted)} before any signature "
        f"was accepted {dict(reasons)}, {len(accepted)} (tcId {sorted(accepted)}, identical "
        "to valid 357) only because the payload is not a claim set"
    )


def test_valid_vectors_pass_the_signature_check_except_the_allowlist():
    outcomes = [o for o in signature_layer().values() if o.vector.valid]
    assert len(outcomes) == VALID_COUNT
    refused = {o.vector.tc_id: o for o in outcomes if not o.signature_accepted}
    assert set(refused) == set(REJECTED_VALID), "the set of refused valid vectors changed"
    for tc, (reason, _why) in REJECTED_VALID.items():
        assert refused[tc].reason == reason, (tc, refused[tc])
    # The accepted ones verified with the group's key; their payloads are not claim sets,
    # so the layer then refuses them as malformed instead of returning a token.
    for o in outcomes:
        if o.signature_accepted:
            assert o.reason == "TOKEN_MALFORMED", o
    print(
        f"\nWycheproof valid: {len(outcomes) - len(refused)} of {len(outcomes)} pass the "
        f"signature check; refused on purpose: {sorted(refused)}"
    )


def test_wrong_primitive_vectors_are_refused_only_because_the_key_declares_alg():
    """A PS512 key whose JWK loses its `alg` accepts all six RSA algorithms (documented in
    proxy/keys/keyset.py): the WrongPrimitive vectors signed with RS*/PS* under their own header
    alg then verify. This pins down that the JWK's `alg` is what refuses them."""
    group = next(g for g in load() if g.jwk.get("kid") == "PS512_2048")
    jwk = {k: v for k, v in group.jwk.items() if k != "alg"}
    key = key_from_jwk(jwk, "PS512_2048 without alg")
    assert key is not None and set(key.algorithms) == {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
    }
    accepted = set()
    for v in group.vectors:
        if v.valid:
            continue
        probe = SignatureProbe(KeySet([key]))
        with pytest.raises(Denied):
            probe.signature(v.jws)
        if probe.accepted:
            accepted.add(v.tc_id)
    assert accepted == {332, 334, 336, 338, 340}
    for tc in accepted:  # with the declared alg they are refused before the signature check
        assert signature_layer()[tc].reason == "ALGORITHM_NOT_ALLOWED"


# --- through the real proxy ----------------------------------------------------------------


def sidecar_key_sets(groups: list[Group]) -> list[list[Group]]:
    """Split groups over as few sidecars as possible so that, in each, a kid names exactly
    one JWK: the vectors select their key by kid, and some groups reuse a kid with a
    different JWK (kid-rsa-sign as a signing key and as an encryption key)."""
    sets: list[tuple[dict[str, dict[str, Any]], list[Group]]] = []
    for group in groups:
        kid = group.jwk["kid"]
        for by_kid, members in sets:
            if by_kid.get(kid, group.jwk) == group.jwk:
                by_kid[kid] = group.jwk
                members.append(group)
                break
        else:
            sets.append(({kid: group.jwk}, [group]))
    return [members for _, members in sets]


def header_value_is_legal(value: str) -> bool:
    """What gRPC accepts in a non-binary metadata value: printable ASCII."""
    return all(0x20 <= ord(c) <= 0x7E for c in value)


@pytest.mark.parametrize("path", ["unary-path", "stream-path"])
async def test_must_reject_vectors_through_the_proxy(
    tmp_path: Path, backend: EchoBackend, keys: Keys, path: str
):
    groups = [g for g in load() if any(not v.valid for v in g.vectors)]
    # No must-reject group has a key the product refuses outright (that would stop the
    # sidecar from starting); keys it skips (use: enc) go into the JWKS as they are.
    assert all(load_key(g) != "KeyLoadError" for g in groups)
    key_sets = sidecar_key_sets(groups)
    assert len(key_sets) == 3

    results: dict[int, tuple[str, str | None, str | None]] = {}  # tc -> (outcome, reason, expected)
    client_refused: list[int] = []
    control_count = 0
    signature_accepted: set[int] = set()
    for n, members in enumerate(key_sets):
        workdir = tmp_path / f"sidecar{n}"
        workdir.mkdir()
        jwks = workdir / "wycheproof.jwks.json"
        unique = {g.jwk["kid"]: g.jwk for g in members}
        jwks.write_text(json.dumps({"keys": list(unique.values())}))
        sets = [str(descriptor_set(workdir / "echo.protoset"))] if path == "unary-path" else []
        running = await start_sidecar(
            workdir, backend.port, keys, jwks=[str(jwks)], descriptor_sets=sets
        )
        try:
            loaded = running.sidecar.authorizer.verifier.keys
            vectors = [v for g in members for v in g.vectors if not v.valid]

            async def send(v: Vector, running=running, loaded=loaded) -> None:
                # What the signature layer says with exactly the keys this sidecar loaded.
                reference = SignatureProbe(loaded)
                try:
                    reference.signature(v.jws)
                    expected = None
                except Denied as denied:
                    expected = denied.reason.value
                if reference.accepted:
                    signature_accepted.add(v.tc_id)
                md = bearer(v.jws)
                try:
                    await running.unary("/test.Access/Report", metadata=md)
                    results[v.tc_id] = ("OK", None, expected)
                except grpc.aio.AioRpcError as error:
                    info = error_info(error)
                    results[v.tc_id] = (error.code().name, info and info.reason, expected)
                except Exception:  # the grpc client refused to send the metadata
                    client_refused.append(v.tc_id)
                    results[v.tc_id] = ("client-refused", None, expected)

            for i in range(0, len(vectors), 64):
                await asyncio.gather(*(send(v) for v in vectors[i : i + 64]))

            # Control: this sidecar holds the vectors' keys. Its valid vectors verify with
            # them and, their payloads not being claim sets, are refused as malformed
            # (not BAD_SIGNATURE / KEY_NOT_FOUND).
            controls = [
                v for g in members for v in g.vectors if v.valid and v.tc_id not in REJECTED_VALID
            ]
            for v in controls:
                probe = SignatureProbe(running.sidecar.authorizer.verifier.keys)
                with pytest.raises(Denied):
                    probe.signature(v.jws)
                assert probe.accepted, v
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await running.unary("/test.Access/Report", token=v.jws)
                assert error_info(caught.value).reason == "TOKEN_MALFORMED"
                control_count += 1
        finally:
            await running.stop()

    assert len(results) == MUST_REJECT_COUNT
    illegal = {v.tc_id for v in all_vectors() if not v.valid and not header_value_is_legal(v.jws)}
    assert set(client_refused) == illegal  # refused client-side exactly when not sendable
    malformed_http2 = {
        v.tc_id
        for v in all_vectors()
        if not v.valid
        and f"Bearer {v.jws}".rstrip(" \t") != f"Bearer {v.jws}"
        and v.tc_id not in illegal
    }
    for tc, (outcome, reason, expected) in results.items():
        if tc in client_refused:
            continue
        if tc in malformed_http2:  # RFC 9113 8.2.1: the HTTP/2 engine resets the stream
            assert outcome == "INTERNAL", (tc, outcome, reason)
            continue
        assert outcome == "UNAUTHENTICATED", (tc, outcome, reason)
        assert reason == expected, (tc, reason, expected)
    assert backend.calls == []
    assert control_count >= 20
    assert signature_accepted == SAME_AS_VALID_357
    print(
        f"\nWycheproof through the proxy ({path}): {len(results)} must-reject vectors over "
        f"{len(key_sets)} sidecars; UNAUTHENTICATED: "
        f"{sum(o == 'UNAUTHENTICATED' for o, _, _ in results.values())}; refused by the grpc "
        f"client: {len(client_refused)}; reasons "
        f"{dict(Counter(r for _, r, _ in results.values()))}"
    )
