"""Factories for the security tests: secured configs, channels with a given role's certificate,
a router with fake workers behind mutual TLS (tests/router/grpc_fakes.py's, secured)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.common.config import RpcConfig
from services.router.clients import GrpcWorkerClients
from services.router.core import Router, RouterConfig
from services.router.driver import DriverConfig, RequestDriver
from services.router.registry import WorkerRole
from services.router.servicer import RouterServicer
from services.rpc import security
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.rpc.security import Role, SecurityConfig, TlsFiles
from services.rpc.server import RunningServer, start_server
from tests.router.factories import capacity, load
from tests.router.grpc_fakes import CallLog, FakeWorker, router_service, worker_services

C = grpc.StatusCode
TOKEN_A = "token-of-client-a-0123456789"
TOKEN_B = "token-of-client-b-0123456789"


def secured(role: Role, certs: Path | None, tokens: tuple[str, ...] = ()) -> RpcConfig:
    tls = TlsFiles.in_dir(certs, role) if certs is not None else None
    return RpcConfig(grace_s=0.1, security=SecurityConfig(role, tls, tokens))


def channel_as(address: str, certs: Path | None, role: Role = Role.CLIENT) -> grpc.aio.Channel:
    """A channel presenting ``role``'s certificate from ``certs`` (None: plaintext)."""
    if certs is None:
        return grpc.aio.insecure_channel(address)
    credentials = security.channel_credentials(TlsFiles.in_dir(certs, role))
    return grpc.aio.secure_channel(address, credentials, options=security.channel_options())


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return security.bearer_metadata(token)


async def code_of(call) -> grpc.StatusCode:
    """The status a refused call ended with (a server stream's included)."""
    if isinstance(call, grpc.aio.UnaryStreamCall):
        frames = [frame async for frame in _frames_until_error(call)]
        assert frames == []  # refused before any frame
        return await call.code()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


@dataclass
class SecureCluster:
    router: Router
    driver: RequestDriver
    address: str
    log: CallLog
    worker_address: str


@asynccontextmanager
async def secure_cluster(
    certs: Path | None, tokens: tuple[str, ...] = (), **behaviour
) -> AsyncIterator[SecureCluster]:
    """The real router (role certificate ``router``) and one fake worker p0/d0 (``decode``
    certificate), both requiring client certificates when ``certs`` is set."""
    rpc = secured(Role.ROUTER, certs, tokens)
    router = Router(RouterConfig(report_timeout_s=60.0))
    clients = GrpcWorkerClients(rpc)
    driver = RequestDriver(router, clients, DriverConfig(release_timeout_s=1.0))
    servicer = RouterServicer(driver, encode=lambda text, chat: [ord(c) for c in text])
    servers: list[RunningServer] = [await start_server([router_service(servicer)], rpc)]
    log = CallLog()
    worker = FakeWorker("w", log, **behaviour)
    servers.append(await start_server(worker_services(worker), secured(Role.DECODE, certs)))
    for worker_id, role in (("p0", WorkerRole.PREFILL), ("d0", WorkerRole.DECODE)):
        router.register(worker_id, servers[1].address, role, capacity())
        router.report(worker_id, load(), 1.0)
    try:
        yield SecureCluster(router, driver, servers[0].address, log, servers[1].address)
    finally:
        await clients.close()
        for server in servers:
            await server.stop(0)


def router_stub(channel: grpc.aio.Channel) -> router_pb2_grpc.RouterServiceStub:
    return router_pb2_grpc.RouterServiceStub(channel)


def generate_request(request_id: str = "r1") -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(
        request_id=request_id,
        token_ids=common_pb2.TokenIds(ids=[1, 2, 3]),
        sampling=common_pb2.SamplingParams(max_tokens=4),
    )


async def _frames_until_error(call):
    try:
        async for frame in call:
            yield frame
    except grpc.aio.AioRpcError:
        return
