"""The client's token store: expiry read from the token, kinds, and concurrent use."""

from __future__ import annotations

import sys
import threading

import jwt
import pytest

from authproxy.client import StoredToken, TokenStore
from authproxy.client.tokens import expiry_of


def _jwt(claims: dict) -> str:
    return jwt.encode(claims, "a-secret-that-the-client-never-needs-32b", algorithm="HS256")


def test_expiry_is_read_from_the_token_without_verifying_it():
    assert expiry_of(_jwt({"sub": "a", "exp": 1_900_000_000})) == 1_900_000_000.0
    assert expiry_of(_jwt({"sub": "a"})) is None  # no exp
    assert expiry_of(_jwt({"sub": "a", "exp": "soon"})) is None
    assert expiry_of(_jwt({"sub": "a", "exp": True})) is None
    assert expiry_of("an-opaque-token") is None  # not a JWT: never refreshed early


def test_a_token_expires_within_the_skew_only_when_it_has_an_expiry():
    assert StoredToken("t", 100.0).expires_within(60, now=50.0)
    assert not StoredToken("t", 200.0).expires_within(60, now=50.0)
    assert not StoredToken("t", None).expires_within(60, now=50.0)


def test_the_store_holds_the_three_kinds_and_rejects_others():
    store = TokenStore()
    store.set("2fa", _jwt({"exp": 1_900_000_000}))
    assert store.get("2fa").expires_at == 1_900_000_000.0  # type: ignore[union-attr]
    store.set_pair("access-1", "refresh-1")
    assert store.get("2fa") is None  # a pair ends the 2FA step
    assert (store.get("access").value, store.get("refresh").value) == ("access-1", "refresh-1")  # type: ignore[union-attr]
    store.set_pair("access-2", "")  # no rotation: the refresh token stays
    assert store.get("refresh").value == "refresh-1"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown token kind 'id'"):
        store.set("id", "x")
    store.clear("access")
    assert store.get("access") is None and store.get("refresh") is not None
    store.clear()
    assert all(store.get(kind) is None for kind in ("2fa", "access", "refresh"))


def test_pairs_written_by_many_threads_are_never_mixed():
    store = TokenStore()
    errors: list[str] = []

    def writer(n: int) -> None:
        for i in range(500):
            store.set_pair(f"access-{n}-{i}", f"refresh-{n}-{i}")

    def reader() -> None:
        for _ in range(2000):
            tokens = store.snapshot()
            access, refresh = tokens.get("access"), tokens.get("refresh")
            if access is None or refresh is None:
                continue
            if access.value.removeprefix("access-") != refresh.value.removeprefix("refresh-"):
                errors.append(f"{access.value} with {refresh.value}")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: interleave writes
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
