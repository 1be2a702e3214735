"""A burst of Checks at the ext_authz gRPC listener gets answers, never a CANCELLED that
Envoy did not ask for (Envoy turns a failed Check into a deny, or with
`failure_mode_allow` into an unchecked allow). grpc core used to cancel a random share of
the calls queued above 1,000 for a grpc.aio server, and every one above 3,000.
Real listener, real Envoy protos, 20 connections."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from tests.support.ext_authz import check_request, outcome
from tests.support.keys import Keys
from tests.support.running_proxy import start_ext_authz


async def test_a_burst_of_checks_is_answered_never_cancelled(tmp_path: Path, keys: Keys):
    running = await start_ext_authz(tmp_path, keys)
    assert running.proxy.check_grpc is not None
    target = f"127.0.0.1:{running.proxy.check_grpc.port}"
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(20)
    ]
    request = check_request("/test.Public/Echo", grpc=True)
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]

        async def call(n: int) -> str:
            try:
                return outcome(await stubs[n % len(stubs)].Check(request, timeout=120))
            except grpc.aio.AioRpcError as e:
                return e.code().name

        answers = Counter(await asyncio.gather(*(call(n) for n in range(4000))))
    finally:
        for channel in channels:
            await channel.close()
        await running.stop()
    assert answers == {"ALLOW": 4000}, answers
