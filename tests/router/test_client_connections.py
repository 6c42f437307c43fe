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


def test_a_quiet_stream_survives_the_client_librarys_fastest_keepalive():
    """Found by a probe: the router's servers took a ping every 5 s at most while they sent
    nothing, and a client with ``keepalive_s`` 1 waiting for its next token (a queue, a long
    prompt) had its connection ended after two faster pings (GOAWAY too_many_pings): UNAVAILABLE
    for a healthy request. The servers accept what the client library may send."""

    async def main():
        async with cluster(hang_decode=True) as c:  # 30 s of silence after each token
            router = c.stub._router_address
            async with AsyncBanaServeClient(router, keepalive_s=1.0, max_resumes=0) as client:
                stream = client.generate([1, 2, 3], max_tokens=4, timeout_s=30)
                tokens = []

                async def read():
                    async for delta in stream:
                        tokens.extend(delta.token_ids)

                reading = asyncio.ensure_future(read())
                await asyncio.sleep(6.0)  # six pings without data
                assert not reading.done(), reading.exception()
                assert tokens == [7, 8]
                reading.cancel()

    asyncio.run(main())
