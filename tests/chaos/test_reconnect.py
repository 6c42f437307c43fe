"""A channel from one service to another reaches a peer restarted on its port within about a
second, however long it was gone (found by the chaos suite: after a helper was killed, the
coordinator's channel to it stayed in gRPC's growing reconnect backoff, and StartMigration
answered UNAVAILABLE for seconds after the restarted worker served again)."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.config import RpcConfig
from services.rpc.channels import open_channel

pytestmark = pytest.mark.integration
GONE_S = 17.0  # gRPC's default backoff would next try ~26 s after the first failure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def check(stub: health_pb2_grpc.HealthStub) -> bool:
    try:
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
    except grpc.aio.AioRpcError:
        return False
    return True


async def reconnect_after_restart() -> float:
    loop = asyncio.get_running_loop()
    address = f"127.0.0.1:{free_port()}"
    channel = open_channel(address, RpcConfig())
    stub = health_pb2_grpc.HealthStub(channel)
    gone_until = loop.time() + GONE_S
    while loop.time() < gone_until:  # calls keep failing: the backoff grows (by default)
        assert not await check(stub)
        await asyncio.sleep(0.5)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(address)
    await server.start()
    back = loop.time()
    try:
        while not await check(stub):
            assert loop.time() - back < 10, "the channel did not reach the peer"
            await asyncio.sleep(0.05)
        return loop.time() - back
    finally:
        await channel.close()
        await server.stop(None)


def test_a_channel_reaches_a_peer_back_on_its_port_within_a_second_or_so():
    assert asyncio.run(reconnect_after_restart()) < 1.6
