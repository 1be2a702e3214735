"""Operating a running proxy: live policy reloads (file watch, ConfigMap symlink swaps,
SIGHUP), open streams re-judged on reload, shadow mode, the admin endpoints (`/healthz`,
`/readyz`, `/metrics`, `/policy`), the decision log, and draining on stop / SIGTERM.

Real `AuthProxy` instances in front of the echo backend, a real `python -m authproxy serve`
process for the signals. The only time bounds are functional: a valid edit is live within
2 s, and a drain ends as soon as the last open stream does, before the grace period.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import signal
import time
from pathlib import Path

import grpc
import pytest

from authproxy.decide.reasons import Reason
from authproxy.keys.issuer import TokenIssuer
from authproxy.policy.loader import parse_policy
from authproxy.runtime.serve import AuthProxy
from tests.support.chat import Chat
from tests.support.echo_backend import EchoBackend, start_echo_backend
from tests.support.keys import Keys
from tests.support.operations import (
    ConfigMapMount,
    proxy_config,
    serve_process,
    watched_proxy,
    write_atomically,
)
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import OK, RunningProxy, error_info, http_get, http_json, value_of
from tests.support.tokens import bearer
from tests.support.waits import poll

#: How soon a valid edit must be serving (the watcher debounces 150 ms).
RELOAD_BOUND = 2.0

ECHO = "/test.Access/Echo"  # named exactly in the policy
ACCESS_REPORT = "/test.Access/Report"  # matched by /test.Access/*
DENIED = "/test.Denied/Echo"
SHADOW = "/test.Shadow/Report"
ENFORCE = "/test.Enforce/Report"

_DENIED_LINE = "  /test.Denied/*: deny\n"
_ACCESS_LINE = "  /test.Access/*: access\n"
_PUBLIC_LINE = "  /test.Public/*: public\n"
_REFRESH_LINE = "  /test.Refresh/*: refresh\n"
_ACCESS_TOKEN_LINE = "  access:  {type: access, audience: api-access}\n"
for _line in (_DENIED_LINE, _ACCESS_LINE, _PUBLIC_LINE, _REFRESH_LINE, _ACCESS_TOKEN_LINE):
    assert _line in TEST_POLICY, _line

POLICY = TEST_POLICY + (
    f"  {ECHO}: access\n"
    f"  {SHADOW}: {{level: access, roles: [admin], mode: shadow}}\n"
    f"  {ENFORCE}: {{level: access, roles: [admin]}}\n"
)
#: The same policy with /test.Denied/* opened to everyone.
FLIPPED = POLICY.replace(_DENIED_LINE, "  /test.Denied/*: public\n")
DENIED_NOW = (grpc.StatusCode.PERMISSION_DENIED, Reason.METHOD_DENIED)


def version_of(text: str) -> str:
    return parse_policy(text).version


def line_of(text: str, needle: str) -> int:
    """The 1-based line of `text` containing `needle`."""
    (line,) = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    return line


async def reloads_settled(node: RunningProxy, key: str, count: int) -> dict[str, int]:
    """The reloader's result counts once `key` reached `count` (or the bound passed)."""

    async def results() -> dict[str, int]:
        return node.reloads()

    counted, _ = await poll(results, lambda r: r[key] >= count, within=RELOAD_BOUND)
    return counted


# --- reloads -------------------------------------------------------------------------------


async def test_a_valid_edit_is_live_within_2s_under_load_with_no_failed_call(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    """Calls to a method both versions allow keep succeeding through the swap, while the
    edited method flips within the bound."""
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        token = issuer.mint("access", "alice", ttl=300).token
        assert await node.call(DENIED) == DENIED_NOW
        outcomes: list[tuple] = []
        done = asyncio.Event()

        async def load() -> None:
            while not done.is_set():
                outcomes.append(await node.call(ECHO, token))

        workers = [asyncio.create_task(load()) for _ in range(4)]
        await asyncio.sleep(0.2)
        before = len(outcomes)
        write_atomically(node.policy_path, FLIPPED)
        result, elapsed = await poll(lambda: node.call(DENIED), lambda r: r == OK, RELOAD_BOUND)
        assert result == OK, result
        assert elapsed <= RELOAD_BOUND
        await asyncio.sleep(0.2)  # and some calls after the swap
        done.set()
        await asyncio.gather(*workers)

        failures = [outcome for outcome in outcomes if outcome != OK]
        assert failures == []
        assert before > 0 and len(outcomes) > before
        assert node.proxy.authorizer.policy.version == version_of(FLIPPED)
        assert node.reloads()["ok"] == 1
        assert node.reloads()["error"] == 0
        _, samples, _ = await node.metrics()
        info = [s for s in samples if s.name == "authproxy_policy_info"]
        assert [(s.labels, s.value) for s in info] == [({"version": version_of(FLIPPED)}, 1.0)]
        assert value_of(samples, "authproxy_policy_reloads_total", result="ok") == 1


INVALID_EDITS = {
    "yaml": (FLIPPED + "  /test.Broken/*: [public\n", None),
    "unknown-level": (FLIPPED + "  /test.Broken/*: superuser\n", "/test.Broken/*: superuser"),
    "missing-key-id": (
        FLIPPED.replace(
            _ACCESS_TOKEN_LINE, "  access:  {type: access, audience: api-access, keys: [no-such]}\n"
        ),
        "keys: [no-such]",
    ),
}


@pytest.mark.parametrize("edit", INVALID_EDITS)
async def test_an_invalid_edit_keeps_the_last_good_policy_until_a_fix_loads(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    caplog: pytest.LogCaptureFixture,
    edit: str,
):
    """The invalid file also opens /test.Denied/*: none of it applies. `/policy` and the
    log name the file and line; the error is counted; then a valid version loads."""
    caplog.set_level(logging.ERROR, logger="authproxy.policy")
    text, offending = INVALID_EDITS[edit]
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        token = issuer.mint("access", "alice", ttl=300).token
        path = str(node.policy_path)
        write_atomically(node.policy_path, text)
        results = await reloads_settled(node, "error", 1)
        assert (results["ok"], results["error"]) == (0, 1)

        status = await node.policy()
        assert status["version"] == version_of(POLICY)
        assert status["text"] == POLICY
        error = status["last_reload_error"]
        assert error is not None
        where = re.search(rf"{re.escape(path)}:(\d+)", error)
        assert where is not None, f"no {path}:LINE in {error!r}"
        if offending is not None:
            assert int(where.group(1)) == line_of(text, offending), error
        logged = [r.getMessage() for r in caplog.records if r.name == "authproxy.policy"]
        assert any(re.search(rf"{re.escape(path)}:\d+", m) for m in logged), logged
        assert await node.call(DENIED) == DENIED_NOW  # the old policy still decides
        assert await node.call(ECHO, token) == OK
        _, samples, _ = await node.metrics()
        assert value_of(samples, "authproxy_policy_reloads_total", result="error") == 1

        write_atomically(node.policy_path, FLIPPED)
        results = await reloads_settled(node, "ok", 1)
        assert results["ok"] == 1 and results["error"] == 1
        status = await node.policy()
        assert status["version"] == version_of(FLIPPED)
        assert status["last_reload_error"] is None
        assert await node.call(DENIED) == OK


async def test_reverting_an_invalid_edit_clears_the_reload_error(
    tmp_path: Path, keys: Keys, backend: EchoBackend
):
    """Rolling a bad edit back to the active version is a fix too: the file is valid and
    serving, so `/policy` must not keep reporting the bad edit."""
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        write_atomically(node.policy_path, POLICY + "  /test.Broken/*: superuser\n")
        await reloads_settled(node, "error", 1)
        assert (await node.policy())["last_reload_error"] is not None
        write_atomically(node.policy_path, POLICY)
        results = await reloads_settled(node, "unchanged", 1)
        assert (results["ok"], results["error"]) == (0, 1)
        status = await node.policy()
        assert status["version"] == version_of(POLICY)
        assert status["last_reload_error"] is None


async def test_an_edit_made_while_the_proxy_starts_is_picked_up(
    tmp_path: Path, keys: Keys, backend: EchoBackend
):
    """The policy is read when the proxy is built and watched once it has started (after
    connecting to Redis, say): an edit landing in between must not be lost until some
    later edit."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    proxy = AuthProxy(proxy_config(keys, path, backend))
    write_atomically(path, FLIPPED)
    await proxy.start()
    try:

        async def version() -> str:
            return proxy.authorizer.policy.version

        active, _ = await poll(version, lambda v: v == version_of(FLIPPED), RELOAD_BOUND)
        assert active == version_of(FLIPPED)
    finally:
        await proxy.stop(0)


async def test_a_configmap_symlink_swap_is_picked_up(
    tmp_path: Path, keys: Keys, backend: EchoBackend
):
    mount = ConfigMapMount(tmp_path / "config", POLICY)
    async with watched_proxy(keys, backend, mount.path) as node:
        assert await node.call(DENIED) == DENIED_NOW
        mount.update(FLIPPED)
        result, elapsed = await poll(lambda: node.call(DENIED), lambda r: r == OK, RELOAD_BOUND)
        assert result == OK and elapsed <= RELOAD_BOUND
        status = await node.policy()
        assert status["version"] == version_of(FLIPPED)
        assert status["source"] == str(mount.path)
        assert status["text"] == FLIPPED
        assert status["last_reload_error"] is None

        mount.update(POLICY)  # and again: the watch survives the old directory's removal
        result, _ = await poll(lambda: node.call(DENIED), lambda r: r == DENIED_NOW, RELOAD_BOUND)
        assert result == DENIED_NOW
        assert node.reloads()["ok"] == 2


async def test_an_edit_that_changes_nothing_is_counted_unchanged(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    """Saved again with the same bytes (seen by the watch, or reloaded as on SIGHUP):
    counted as `unchanged`, nothing swapped or reloaded, an open stream carries on."""
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        loaded_at = (await node.policy())["loaded_at"]
        policy = node.proxy.authorizer.policy
        chat = Chat(node.channel, "/test.Access/Chat", issuer.mint("access", "a", ttl=300).token)
        assert await chat.roundtrip() == b"echo:hi"

        write_atomically(node.policy_path, POLICY)
        results = await reloads_settled(node, "unchanged", 1)
        assert (results["ok"], results["error"]) == (0, 0)
        assert await node.proxy.reloader.reload("SIGHUP") is False
        assert node.reloads()["unchanged"] >= results["unchanged"] + 1
        assert node.reloads()["ok"] == 0

        assert node.proxy.authorizer.policy is policy  # not even an equal copy swapped in
        status = await node.policy()
        assert status["loaded_at"] == loaded_at
        assert status["last_reload_error"] is None
        _, samples, _ = await node.metrics()
        assert value_of(samples, "authproxy_policy_reloads_total", result="unchanged") >= 2
        assert value_of(samples, "authproxy_policy_reloads_total", result="ok") == 0
        assert await chat.roundtrip(b"still") == b"echo:still"
        assert await chat.finish() == grpc.StatusCode.OK


async def test_sighup_reloads_a_serve_process_that_does_not_watch_the_file(
    tmp_path: Path, keys: Keys, backend: EchoBackend
):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    async with serve_process(keys, policy, backend, "--no-policy-watch") as served:
        admin = await served.port_of("admin API listening on port")
        port = await served.port_of("authproxy listening on port")
        url = f"http://127.0.0.1:{admin}/policy"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            async def denied_call() -> tuple:
                try:
                    await channel.unary_unary(DENIED)(b"{}", timeout=10)
                except grpc.aio.AioRpcError as e:
                    return e.code(), error_info(e).reason
                return OK

            assert await denied_call() == DENIED_NOW
            write_atomically(policy, FLIPPED)
            await asyncio.sleep(0.6)  # four debounce periods: a watcher would have reloaded
            status, body = await http_json(url)
            assert status == 200
            assert body["version"] == version_of(POLICY)
            assert body["reloads"] == {"ok": 0, "error": 0, "unchanged": 0}
            assert await denied_call() == DENIED_NOW

            served.signal(signal.SIGHUP)
            await served.wait_for_line("policy reloaded (SIGHUP)", within=RELOAD_BOUND)
            status, body = await http_json(url)
            assert body["version"] == version_of(FLIPPED)
            assert body["reloads"] == {"ok": 1, "error": 0, "unchanged": 0}
            assert body["text"] == FLIPPED
            assert await denied_call() == OK

        served.signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), 20) == 0


# --- open streams on reload ------------------------------------------------------------------

#: /test.Access/* now needs the admin role, /test.Public/* is closed.
STRICTER = POLICY.replace(
    _ACCESS_LINE, "  /test.Access/*: {level: access, roles: [admin]}\n"
).replace(_PUBLIC_LINE, "  /test.Public/*: deny\n")


async def test_a_reload_ends_the_open_streams_the_new_version_refuses_and_only_those(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        alice = issuer.mint("access", "alice", ttl=300).token
        admin = issuer.mint("access", "root", ttl=300, roles=["admin"]).token
        lacks_role = Chat(node.channel, "/test.Access/Chat", alice)
        public = Chat(node.channel, "/test.Public/Chat", None)
        has_role = Chat(node.channel, "/test.Access/Chat", admin)
        untouched = Chat(node.channel, "/test.Forward/Chat", alice)
        for chat in (lacks_role, public, has_role, untouched):
            assert await chat.roundtrip() == b"echo:hi"

        write_atomically(node.policy_path, STRICTER)
        new = version_of(STRICTER)
        for chat, underlying in (
            (lacks_role, Reason.INSUFFICIENT_ROLE),
            (public, Reason.METHOD_DENIED),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async with asyncio.timeout(5):
                    while await chat.call.read() is not grpc.aio.EOF:
                        pass
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            info = error_info(caught.value)
            assert info.reason == Reason.POLICY_CHANGED
            assert info.metadata["policy_version"] == new  # the version that refused it
            assert new in caught.value.details()
            assert underlying in caught.value.details()

        assert await has_role.roundtrip(b"still") == b"echo:still"
        assert await untouched.roundtrip(b"still") == b"echo:still"
        assert await has_role.finish() == grpc.StatusCode.OK
        assert await untouched.finish() == grpc.StatusCode.OK
        guard = node.proxy.sidecar.guard
        assert guard.ended_total == {Reason.POLICY_CHANGED: 2}
        _, samples, _ = await node.metrics()
        assert value_of(samples, "authproxy_streams_ended_total", reason="POLICY_CHANGED") == 2


LIMITED = POLICY + (
    "  /test.Limited/*:\n"
    "    {level: access, single_use: true, rate_limit: {limit: 1/minute, key: subject}}\n"
)


async def test_re_judging_open_streams_records_no_use_and_no_rate_limit_hit(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    """A stream on a single-use, 1-per-minute rule used its token and its one call; being
    judged again on reload must not count as a second use (REFRESH_REUSED, revoking the
    subject) or a second call (RATE_LIMITED)."""
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", LIMITED) as node:
        token = issuer.mint("access", "alice", ttl=300)
        chat = Chat(node.channel, "/test.Limited/Chat", token.token)
        assert await chat.roundtrip() == b"echo:hi"
        write_atomically(
            node.policy_path, LIMITED.replace(_DENIED_LINE, "  /test.Denied/*: public\n")
        )
        result, _ = await poll(lambda: node.call(DENIED), lambda r: r == OK, RELOAD_BOUND)
        assert result == OK
        assert await chat.roundtrip(b"kept") == b"echo:kept"
        assert await chat.finish() == grpc.StatusCode.OK
        assert node.proxy.sidecar.guard.ended_total == {}
        assert not node.proxy.state.revoked(None, "alice", token.claims["iat"])


async def test_reload_ends_streams_false_keeps_refused_streams_open(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with watched_proxy(
        keys, backend, tmp_path / "policy.yaml", POLICY, reload_ends_streams=False
    ) as node:
        alice = issuer.mint("access", "alice", ttl=300).token
        chat = Chat(node.channel, "/test.Access/Chat", alice)
        public = Chat(node.channel, "/test.Public/Chat", None)
        assert await chat.roundtrip() == b"echo:hi"
        assert await public.roundtrip() == b"echo:hi"

        write_atomically(node.policy_path, STRICTER)
        await reloads_settled(node, "ok", 1)
        # New calls follow the new version...
        refused = await node.call(ACCESS_REPORT, alice)
        assert refused == (grpc.StatusCode.PERMISSION_DENIED, Reason.INSUFFICIENT_ROLE)
        # ...open streams are kept.
        assert await chat.roundtrip(b"kept") == b"echo:kept"
        assert await public.roundtrip(b"kept") == b"echo:kept"
        assert await chat.finish() == grpc.StatusCode.OK
        assert await public.finish() == grpc.StatusCode.OK
        assert node.proxy.sidecar.guard.ended_total == {}


# --- shadow mode -----------------------------------------------------------------------------


def identity_headers(md: dict[str, list[str]]) -> dict[str, list[str]]:
    return {k: v for k, v in md.items() if k.startswith("x-auth-")}


async def test_a_shadow_rule_lets_a_would_be_deny_through_with_the_verified_identity(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        alice = issuer.mint("access", "alice", ttl=300, roles=["viewer"])
        md = (await node.report(SHADOW, alice.token))["md"]  # lacks the admin role
        assert md["x-auth-subject"] == ["alice"]
        assert md["x-auth-roles"] == ["viewer"]
        assert md["x-auth-jti"] == [alice.jti]
        assert "authorization" not in md

        # No token at all: through, and the backend sees no identity, not even a forged one.
        md = (await node.report(SHADOW, None, metadata=(("x-auth-subject", "mallory"),)))["md"]
        assert identity_headers(md) == {}
        # A token that does not verify (wrong type): through, without an identity.
        twofa = issuer.mint("2fa", "alice", ttl=300).token
        md = (await node.report(SHADOW, twofa))["md"]
        assert identity_headers(md) == {}


async def test_an_enforce_rule_next_to_a_shadow_rule_still_denies(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        alice = issuer.mint("access", "alice", ttl=300).token
        assert await node.call(SHADOW, alice) == OK
        assert await node.call(ENFORCE, alice) == (
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.INSUFFICIENT_ROLE,
        )
        assert await node.call(ENFORCE) == (grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_MISSING)
        root = issuer.mint("access", "root", ttl=300, roles=["admin"]).token
        assert await node.call(ENFORCE, root) == OK


async def test_a_shadow_would_deny_is_counted_and_logged_with_its_reason(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    decision_lines: list[str],
):
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        alice = issuer.mint("access", "alice", ttl=300)
        root = issuer.mint("access", "root", ttl=300, roles=["admin"])
        assert await node.call(SHADOW, alice.token) == OK
        assert await node.call(SHADOW, alice.token) == OK
        assert await node.call(SHADOW) == OK
        assert await node.call(SHADOW, root.token) == OK  # allowed for real: not a would-deny

        _, samples, _ = await node.metrics()
        shadow = {
            tuple(sorted(s.labels.items())): s.value
            for s in samples
            if s.name == "authproxy_shadow_would_deny_total"
        }
        labels = (("level", "access"), ("method", SHADOW))
        assert shadow == {
            (*labels, ("reason", "INSUFFICIENT_ROLE")): 2,
            (*labels, ("reason", "TOKEN_MISSING")): 1,
        }
        allowed = value_of(
            samples,
            "authproxy_requests_total",
            method=SHADOW,
            level="access",
            decision="allow",
            reason="",
        )
        assert allowed == 4

        lines = [json.loads(line) for line in decision_lines]
        assert len(lines) == 3  # the would-denies; the real allow is not sampled
        for line in lines:
            assert line["shadow"] is True
            assert line["decision"] == "allow"
            assert line["method"] == SHADOW
        assert [line["reason"] for line in lines] == [
            "INSUFFICIENT_ROLE",
            "INSUFFICIENT_ROLE",
            "TOKEN_MISSING",
        ]
        assert lines[0]["sub"] == "alice" and lines[0]["jti"] == alice.jti
        assert "sub" not in lines[2]
        assert alice.token not in "".join(decision_lines)


GLOBAL_SHADOW = TEST_POLICY.replace("version: 1\n", "version: 1\nmode: shadow\n", 1) + (
    f"  {ENFORCE}: {{level: access, roles: [admin], mode: enforce}}\n"
)


async def test_global_shadow_mode_with_a_per_rule_enforce_override(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", GLOBAL_SHADOW) as node:
        alice = issuer.mint("access", "alice", ttl=300).token
        twofa = issuer.mint("2fa", "alice", ttl=300).token
        # Every rule without a mode of its own is in shadow: mappings, strings, the default.
        md = (await node.report("/test.Admin/Report", alice))["md"]
        assert md["x-auth-subject"] == ["alice"]
        md = (await node.report(ACCESS_REPORT, twofa))["md"]  # wrong token type: no identity
        assert identity_headers(md) == {}
        assert await node.call("/test.Other/Report") == OK  # the default rule, no token
        # The override enforces.
        assert await node.call(ENFORCE, alice) == (
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.INSUFFICIENT_ROLE,
        )
        _, samples, _ = await node.metrics()
        denied = value_of(
            samples,
            "authproxy_requests_total",
            method=ENFORCE,
            level="access",
            decision="deny",
            reason="INSUFFICIENT_ROLE",
        )
        assert denied == 1
        would = {
            s.labels["reason"]: s.value
            for s in samples
            if s.name == "authproxy_shadow_would_deny_total"
        }
        assert would == {"INSUFFICIENT_ROLE": 1, "WRONG_TOKEN_TYPE": 1, "TOKEN_MISSING": 1}


async def test_single_use_reuse_in_shadow_does_not_revoke_the_subject(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    policy = POLICY.replace(
        _REFRESH_LINE, "  /test.Refresh/*: {level: refresh, single_use: true, mode: shadow}\n"
    )
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", policy) as node:
        access = issuer.mint("access", "alice", ttl=300)
        refresh = issuer.mint("refresh", "alice", ttl=300).token
        assert await node.call("/test.Refresh/Echo", refresh) == OK
        assert await node.call("/test.Refresh/Echo", refresh) == OK  # reused: let through
        # Enforced, a reuse revokes every token of alice issued before it; in shadow, none.
        assert await node.call(ECHO, access.token) == OK
        assert not node.proxy.state.revoked(None, "alice", access.claims["iat"])
        _, samples, _ = await node.metrics()
        reused = value_of(
            samples,
            "authproxy_shadow_would_deny_total",
            method="other",
            level="refresh",
            reason="REFRESH_REUSED",
        )
        assert reused == 1


# --- the admin endpoints --------------------------------------------------------------------


async def test_healthz_and_readyz_answer_200_when_ready(
    tmp_path: Path, keys: Keys, backend: EchoBackend
):
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        status, _, body = await http_get(f"{node.admin_base}/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        status, body = await http_json(f"{node.admin_base}/readyz")
        assert status == 200
        assert body["ready"] is True
        assert set(body["checks"]) == {"policy", "keys", "state", "upstream"}
        assert all(value.startswith("ok") for value in body["checks"].values())


async def test_readyz_is_503_naming_the_upstream_when_the_backend_is_down(
    tmp_path: Path, keys: Keys
):
    backend = await start_echo_backend()
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        status, body = await http_json(f"{node.admin_base}/readyz")
        assert status == 200, body
        await backend.server.stop(None)
        (status, body), _ = await poll(
            lambda: http_json(f"{node.admin_base}/readyz"), lambda r: r[0] == 503, within=5
        )
        assert status == 503
        assert body["ready"] is False
        assert body["checks"]["upstream"] == "not reachable"
        assert body["checks"]["policy"].startswith("ok")
        assert "draining" not in body["checks"]
        status, _, _ = await http_get(f"{node.admin_base}/healthz")
        assert status == 200  # alive, just not ready


async def test_metrics_have_bounded_labels_and_the_operational_families(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        alice = issuer.mint("access", "alice", ttl=300)
        assert await node.call(ECHO, alice.token) == OK
        assert await node.call(ECHO, alice.token) == OK
        assert await node.call(ACCESS_REPORT, alice.token) == OK  # wildcard rule
        assert await node.call("/unknown.Service/Call") == (
            grpc.StatusCode.UNAUTHENTICATED,
            Reason.TOKEN_MISSING,
        )  # no rule: the default
        assert await node.call(DENIED, alice.token) == DENIED_NOW

        families, samples, text = await node.metrics()
        for family in (
            "authproxy_requests",
            "authproxy_decision_seconds",
            "authproxy_upstream_seconds",
            "authproxy_policy_reloads",
            "authproxy_policy_info",
            "authproxy_token_cache_hits",
            "authproxy_shadow_would_deny",
        ):
            assert family in families, family

        requests = [s for s in samples if s.name == "authproxy_requests_total"]
        assert {s.labels["method"] for s in requests} == {ECHO, "other"}
        counts = {
            (s.labels["method"], s.labels["decision"], s.labels["reason"]): s.value
            for s in requests
        }
        assert counts == {
            (ECHO, "allow", ""): 2,
            ("other", "allow", ""): 1,
            ("other", "deny", "TOKEN_MISSING"): 1,
            ("other", "deny", "METHOD_DENIED"): 1,
        }
        assert value_of(samples, "authproxy_decision_seconds_count") == 5
        assert value_of(samples, "authproxy_upstream_seconds_count", kind="stream") == 3
        version = node.proxy.authorizer.policy.version
        assert value_of(samples, "authproxy_policy_info", version=version) == 1
        assert value_of(samples, "authproxy_policy_reloads_total", result="ok") == 0
        assert value_of(samples, "authproxy_token_cache_hits_total") == 2
        assert value_of(samples, "authproxy_token_cache_misses_total") == 1

        secrets = ("alice", alice.jti, *alice.token.split("."))
        for sample in samples:
            for value in sample.labels.values():
                assert not any(secret in value for secret in secrets), (sample, value)
        assert not any(secret in text for secret in secrets)


async def test_policy_endpoint_reports_the_active_policy(
    tmp_path: Path, keys: Keys, backend: EchoBackend
):
    started = time.time()
    async with watched_proxy(
        keys, backend, tmp_path / "policy.yaml", POLICY, watch_policy=False
    ) as node:
        status = await node.policy()
        assert set(status) == {
            "version",
            "source",
            "loaded_at",
            "rules",
            "last_reload_error",
            "reloads",
            "text",
        }
        assert status["version"] == hashlib.sha256(POLICY.encode()).hexdigest()[:12]
        assert status["source"] == str(node.policy_path)
        assert started - 1 <= status["loaded_at"] <= time.time()
        assert status["rules"] == parse_policy(POLICY).rule_count == 10
        assert status["last_reload_error"] is None
        assert status["reloads"] == {"ok": 0, "error": 0, "unchanged": 0}
        assert status["text"] == POLICY


ADMIN_ENV = "AUTHPROXY_TEST_OPS_ADMIN_TOKEN"
ADMIN_SECRET = "ops-admin-secret-0123456789"


async def test_the_revocation_api_is_refused_on_a_non_loopback_admin_address_without_a_token(
    tmp_path: Path, keys: Keys, backend: EchoBackend, monkeypatch: pytest.MonkeyPatch
):
    async with watched_proxy(
        keys, backend, tmp_path / "open" / "policy.yaml", POLICY, admin="0.0.0.0:0"
    ) as node:
        base = node.admin_base  # connects through 127.0.0.1
        for method, body in (("GET", None), ("POST", {"sub": "alice", "before": time.time()})):
            status, answer = await http_json(f"{base}/v1/revocations", method, body)
            assert status == 403, answer
            assert answer["reason"] == "FORBIDDEN"
        assert await node.proxy.state.revocations() == []
        # The read-only endpoints stay open for probes and scrapers.
        for path in ("/healthz", "/readyz", "/metrics", "/policy"):
            status, _, _ = await http_get(f"{base}{path}")
            assert status == 200, path

    monkeypatch.setenv(ADMIN_ENV, ADMIN_SECRET)
    async with watched_proxy(
        keys,
        backend,
        tmp_path / "secured" / "policy.yaml",
        POLICY,
        admin="0.0.0.0:0",
        admin_token_env=ADMIN_ENV,
    ) as node:
        status, answer = await http_json(f"{node.admin_base}/v1/revocations")
        assert status == 401, answer  # the secret is configured: asked for, not forbidden


# --- the decision log ------------------------------------------------------------------------

DECISION_FIELDS = {
    "time",
    "method",
    "rule",
    "level",
    "decision",
    "reason",
    "detail",
    "sub",
    "jti",
    "peer",
    "policy_version",
    "latency_ms",
}


async def test_a_deny_writes_one_json_line_with_the_documented_fields_and_no_token(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    decision_lines: list[str],
):
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        alice = issuer.mint("access", "alice", ttl=300)
        assert await node.call(ENFORCE, alice.token) == (
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.INSUFFICIENT_ROLE,
        )
        assert len(decision_lines) == 1
        raw = decision_lines[0]
        line = json.loads(raw)
        assert set(line) == DECISION_FIELDS
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
        assert line["method"] == ENFORCE
        assert line["rule"] == ENFORCE
        assert line["level"] == "access"
        assert line["decision"] == "deny"
        assert line["reason"] == "INSUFFICIENT_ROLE"
        assert line["detail"] == "this method needs one of the roles admin"
        assert line["sub"] == "alice"
        assert line["jti"] == alice.jti
        assert line["peer"] == "127.0.0.1"
        assert line["policy_version"] == version_of(POLICY)
        assert isinstance(line["latency_ms"], int | float) and line["latency_ms"] >= 0
        assert "\n" not in raw
        for part in alice.token.split("."):
            assert part not in raw


@pytest.mark.parametrize(("log_allows", "logged_allows"), [(0.0, 0), (1.0, 3)])
async def test_allows_are_logged_only_as_sampled(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    decision_lines: list[str],
    log_allows: float,
    logged_allows: int,
):
    async with watched_proxy(
        keys, backend, tmp_path / "policy.yaml", POLICY, log_allows=log_allows
    ) as node:
        token = issuer.mint("access", "alice", ttl=300).token
        for _ in range(3):
            assert await node.call(ECHO, token) == OK
        assert await node.call(DENIED) == DENIED_NOW
        lines = [json.loads(line) for line in decision_lines]
        decisions = [line["decision"] for line in lines]
        assert decisions.count("allow") == logged_allows
        assert decisions.count("deny") == 1
        for line in lines:
            if line["decision"] == "allow":
                assert line["method"] == ECHO and line["reason"] is None
                assert line["sub"] == "alice" and "shadow" not in line


#: How a call the draining proxy no longer takes ends.
REFUSED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


# --- draining ----------------------------------------------------------------------------------


async def test_stop_drains_an_open_stream_while_readyz_is_503_and_new_calls_are_refused(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    grace = 5.0
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", POLICY) as node:
        token = issuer.mint("access", "alice", ttl=300).token
        chat = Chat(node.channel, "/test.Access/Chat", token)
        assert await chat.roundtrip(b"before") == b"echo:before"
        readyz = f"{node.admin_base}/readyz"

        started = time.monotonic()
        stopping = asyncio.create_task(node.proxy.stop(grace))
        node.stopped = True
        (status, body), _ = await poll(lambda: http_json(readyz), lambda r: r[0] == 503, 3)
        assert status == 503
        assert body["ready"] is False
        assert body["checks"]["draining"] == "shutting down"

        # New calls are refused (UNAVAILABLE; CANCELLED for one that races the GOAWAY)
        # and never reach the backend.
        md = bearer(token)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{node.sidecar_port}") as fresh:

            async def new_call() -> grpc.StatusCode:
                try:
                    await fresh.unary_unary(ECHO)(b"{}", metadata=md, timeout=5)
                except grpc.aio.AioRpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            first, _ = await poll(new_call, lambda code: code != grpc.StatusCode.OK, 2)
            assert first in REFUSED
            relayed = [method for method, _ in backend.calls]
            for _ in range(3):
                assert await new_call() in REFUSED
            assert [method for method, _ in backend.calls] == relayed
        assert not stopping.done()

        assert await chat.roundtrip(b"during") == b"echo:during"
        assert await chat.finish() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, grace)
        assert time.monotonic() - started < grace  # ended with the stream, not the grace


async def test_sigterm_lets_an_open_stream_finish_and_the_process_exits_0(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    grace = 30.0
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    async with serve_process(keys, policy, backend, "--shutdown-grace", str(grace)) as served:
        admin = await served.port_of("admin API listening on port")
        port = await served.port_of("authproxy listening on port")
        token = issuer.mint("access", "alice", ttl=300).token
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            chat = Chat(channel, "/test.Access/Chat", token)
            assert await chat.roundtrip(b"before") == b"echo:before"
            served.signal(signal.SIGTERM)
            started = time.monotonic()
            await served.wait_for_line("shutting down", within=10)
            status, body = await http_json(f"http://127.0.0.1:{admin}/readyz")
            assert status == 503 and body["checks"]["draining"] == "shutting down"
            assert served.proc.returncode is None

            assert await chat.roundtrip(b"during") == b"echo:during"
            assert await chat.finish() == grpc.StatusCode.OK
        assert await asyncio.wait_for(served.proc.wait(), grace) == 0
        assert time.monotonic() - started < grace
