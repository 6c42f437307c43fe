"""The client library's connections to a router, through a fault proxy (tests/chaos/proxy.py)
in front of the real router server with fake workers (grpc_fakes.py)."""

from __future__ import annotations

import asyncio

from services.client.client import AsyncBanaServeClient
from tests.chaos.proxy import FaultProxy, Mode
from tests.router.grpc_fakes import cluster


def test_a_new_client_does_not_inherit_another_clients_dead_connection():
    """gRPC shares a connection between a process's channels of the same target and settings
    unless told not to: a client opened after another's connection died without closing sent
    its request into that dead connection and waited for keepalive (15 s; the chaos matrix's
    recovery probe). Each client's connections are its own."""

    async def main():
        async with cluster() as c:
            proxy = FaultProxy("client", lambda: c.stub._router_address)
            proxy.start()
            try:
                async with AsyncBanaServeClient(proxy.address) as first:
                    done = await first.complete([1, 2, 3], max_tokens=4, timeout_s=5)
                    assert list(done.token_ids) == [7, 8, 9, 10]
                    await asyncio.to_thread(proxy.set, Mode.STRAND)
                    async with AsyncBanaServeClient(proxy.address) as second:
                        done = await second.complete([1, 2, 3], max_tokens=4, timeout_s=3)
                    assert list(done.token_ids) == [7, 8, 9, 10]
                    assert proxy.num_connections == 2
            finally:
                await asyncio.to_thread(proxy.stop)

    asyncio.run(main())
