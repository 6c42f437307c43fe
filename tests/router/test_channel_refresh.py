"""The router's channel to a worker that died and came back on its port: a registration of the
worker replaces a channel whose connection failed, so the requests routed right after the
worker is admitted again do not fail UNAVAILABLE for the rest of the reconnect backoff (found by
tests/e2e/test_up_restarts.py: 20 requests sent just after a restarted prefill worker was
admitted all failed). A connected channel is kept."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.router.clients import GrpcWorkerClients

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def healthy(clients: GrpcWorkerClients, address: str) -> bool:
    stub = health_pb2_grpc.HealthStub(clients._channel(address))
    try:
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
    except grpc.aio.AioRpcError:
        return False
    return True


async def serve(address: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(address)
    await server.start()
    return server


def test_a_registration_replaces_a_failed_channel_and_keeps_a_live_one():
    async def main():
        address = f"127.0.0.1:{free_port()}"
        clients = GrpcWorkerClients()
        assert not await healthy(clients, address)  # the worker is gone: in backoff now
        server = await serve(address)  # it is back on its port
        try:
            # (the old channel would fail it for up to a second more: its reconnect backoff)
            clients.refresh(address)  # what the worker's registration does
            assert await healthy(clients, address)
            live = clients._channel(address)
            clients.refresh(address)  # connected: kept
            assert clients._channel(address) is live
            assert await healthy(clients, address)
        finally:
            await clients.close()
            await server.stop(None)

    asyncio.run(main())
