"""Fault injection for worker tests (prefill and decode alike): an engine step that fails for
chosen requests, and an in-process router to watch a worker register and leave."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import RpcConfig
from services.router.clients import GrpcWorkerClients
from services.router.core import Router
from services.router.driver import RequestDriver
from services.router.servicer import RouterServicer
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import router_pb2, router_pb2_grpc
from services.rpc.server import Service, start_server

POISON_SEED = 13  # a step sampling a request with this seed raises
RPC = RpcConfig(grace_s=0.2)


class PoisonedStep:
    """An engine ``logits_hook`` that makes a step raise when it samples a request whose seed
    is ``POISON_SEED``: a stand-in for any bug a step can meet (the sampler's NaN error was one).
    ``num_failed`` counts the steps it failed."""

    def __init__(self) -> None:
        self.num_failed = 0

    def __call__(self, seqs, logits) -> None:
        if any(seq.params.seed == POISON_SEED for seq in seqs):
            self.num_failed += 1
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")


@asynccontextmanager
async def router() -> AsyncIterator[router_pb2_grpc.RouterServiceStub]:
    """A real router (no workers of its own); ``stub._address`` is where workers report."""
    clients = GrpcWorkerClients(RPC)
    servicer = RouterServicer(RequestDriver(Router(), clients))
    service = Service.bind(
        servicer,
        router_pb2_grpc.add_RouterServiceServicer_to_server,
        router_pb2.DESCRIPTOR.services_by_name["RouterService"],
    )
    server = await start_server([service], RPC)
    channel = open_channel(server.address, RPC)
    stub = router_pb2_grpc.RouterServiceStub(channel)
    stub._address = server.address
    try:
        yield stub
    finally:
        await channel.close()
        await clients.close()
        await server.stop(0)


async def registered(stub: router_pb2_grpc.RouterServiceStub, within_s: float = 30.0):
    """The ids and infos of the workers the router lists as active, once there is one."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while True:
        reply = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=2)
        active = [w.info for w in reply.workers if w.state == router_pb2.WORKER_STATE_ACTIVE]
        if active:
            return active
        assert loop.time() < end, "no worker registered"
        await asyncio.sleep(0.05)


async def listed(stub: router_pb2_grpc.RouterServiceStub) -> list[str]:
    reply = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=2)
    return [w.info.worker_id for w in reply.workers]


async def health_changes(address: str, seen: list[str]) -> None:
    """Appends each status the server as a whole (``""``) reports, until NOT_SERVING (or the
    server stops)."""
    async with grpc.aio.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        try:
            async for reply in watch:
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                if seen[-1] == "NOT_SERVING":
                    return  # ending the call lets the server's drain finish at once
        except grpc.aio.AioRpcError:
            pass  # the server stopped
