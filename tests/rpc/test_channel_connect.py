"""How long a channel between services waits for a connection that never completes
(services/rpc/channels.py, ``CONNECT_TIMEOUT_MS``): a path that accepts TCP connections and
delivers nothing (a black-holing middlebox, a half-dead host) fails a call UNAVAILABLE within
the connect timeout, where gRPC's default (20 s) held each new call that long — a router's
retry of a request to such a worker waited out its window on one connect (session 27's probe,
item 5). A slow link still connects, and the channel connects again once the path heals. The
client library's channels keep gRPC's 20 s: a client may be far from its router."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client.client import _options as client_options
from services.common.config import RpcConfig
from services.rpc.channels import CONNECT_TIMEOUT_MS, open_channel
from tests.chaos.proxy import FaultProxy, Mode
from tests.rpc.helpers import serving

CHECK = health_pb2.HealthCheckRequest(service="")


async def check(channel: grpc.aio.Channel, timeout_s: float) -> tuple[str, float]:
    """The call's outcome ("SERVING" or the status's name) and how long it took."""
    started = time.monotonic()
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(CHECK, timeout=timeout_s)
        outcome = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.aio.AioRpcError as exc:
        outcome = exc.code().name
    return outcome, time.monotonic() - started


@contextlib.asynccontextmanager
async def through(mode: Mode, delay_s: float = 0.0, client_library: bool = False):
    """A served server, a fault proxy in front of it in ``mode``, and a channel through the
    proxy (a service's, or the client library's); (channel, proxy), closed after."""
    async with serving() as (server, _, _):
        proxy = FaultProxy("link", lambda: server.address)
        proxy.start()
        proxy.set(mode, delay_s)
        if client_library:
            channel = grpc.aio.insecure_channel(proxy.address, options=client_options(10.0))
        else:
            channel = open_channel(proxy.address, RpcConfig())
        try:
            yield channel, proxy
        finally:
            await channel.close()
            proxy.stop()


def test_a_connection_that_never_completes_fails_within_the_connect_timeout_then_heals():
    async def main():
        async with through(Mode.BLACKHOLE) as (channel, proxy):
            outcome, took = await check(channel, 30.0)
            assert outcome == "UNAVAILABLE", outcome
            # the connect timeout, not the call's 30 s nor gRPC's 20 s
            assert CONNECT_TIMEOUT_MS / 1000 - 0.5 < took < CONNECT_TIMEOUT_MS / 1000 + 2.5
            proxy.set(Mode.PASS)
            deadline = time.monotonic() + 10
            while (outcome := (await check(channel, 2.0))[0]) != "SERVING":
                assert time.monotonic() < deadline, outcome  # reconnects (backoff 1 s)
                await asyncio.sleep(0.1)

    asyncio.run(main())


def test_a_slow_link_still_connects():
    async def main():
        # each way: the handshake's round trips take seconds
        async with through(Mode.DELAY, 0.4) as (channel, _):
            outcome, took = await check(channel, 30.0)
            assert outcome == "SERVING", outcome
            assert took > 0.8  # it went through the delay

    asyncio.run(main())


def test_the_client_librarys_connection_attempt_keeps_grpcs_own_time():
    async def main():
        async with through(Mode.BLACKHOLE, client_library=True) as (channel, _):
            outcome, took = await check(channel, 8.0)
            # still connecting at the call's own deadline, past the services' 5 s
            assert outcome == "DEADLINE_EXCEEDED", outcome
            assert took > 7.5, took

    asyncio.run(main())
