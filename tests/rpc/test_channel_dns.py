"""A peer reached by name that comes back on another address (a container recreated by compose,
a rescheduled pod) is found there within seconds: the services' channels look the name up again
after a failed connection at most every ``DNS_REFRESH_MS``, not gRPC's 30 s (session 45's probe:
workers dialled a recreated router's old IP for 28 s, every request failing meanwhile).

A real DNS server (dnslib) answers for the name; gRPC's resolver asks it (``dns://HOST:PORT/``
authority), and the peers are real gRPC servers on two loopback addresses."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import RpcConfig
from services.rpc.channels import DNS_REFRESH_MS, channel_options
from services.rpc.server import start_server

NAME = "router.banaserve.test."


class Zone(BaseResolver):
    """One A record whose address the test moves; TTL 0 (compose's DNS answers with 0 too)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.lock = threading.Lock()

    def resolve(self, request, handler):
        reply = request.reply()
        if str(request.q.qname) == NAME and request.q.qtype == QTYPE.A:
            with self.lock:
                reply.add_answer(RR(NAME, QTYPE.A, rdata=A(self.address), ttl=0))
        return reply


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_on_both() -> int:
    """A TCP port free on 127.0.0.1 and 127.0.0.2."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.2", port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free on both loopback addresses")


@pytest.fixture
def dns():
    zone = Zone("127.0.0.1")
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")  # logs to stdout
    server = DNSServer(zone, address="127.0.0.1", port=free_udp_port(), logger=quiet)
    server.start_thread()
    try:
        yield zone, server.server.server_address[1]
    finally:
        server.stop()


def test_a_peer_back_on_a_new_address_is_reached_within_seconds(dns):
    zone, dns_port = dns
    port = free_port_on_both()
    target = f"dns://127.0.0.1:{dns_port}/{NAME.rstrip('.')}:{port}"

    async def serve(host: str, name: str):
        server = await start_server([], RpcConfig(host=host, port=port))
        await server.set_serving(name, True)
        return server

    async def check(stub, name: str) -> bool:
        request = health_pb2.HealthCheckRequest(service=name)
        try:
            reply = await stub.Check(request, timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def main():
        first = await serve("127.0.0.1", "first")
        async with grpc.aio.insecure_channel(target, options=channel_options(RpcConfig())) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            assert await check(stub, "first")
            await first.stop(0)
            with zone.lock:
                zone.address = "127.0.0.2"  # the peer's new container
            second = await serve("127.0.0.2", "second")
            try:
                start = time.monotonic()
                while not await check(stub, "second"):
                    assert time.monotonic() - start < 20, "never reached the new address"
                    await asyncio.sleep(0.1)
                return time.monotonic() - start
            finally:
                await second.stop(0)

    elapsed = asyncio.run(main())
    # gRPC's default (30 s between lookups) took ~28 s in compose; DNS_REFRESH_MS plus its
    # reconnect backoff (1 s) bound this to a few seconds.
    assert elapsed < 5 * DNS_REFRESH_MS / 1000, elapsed
