"""The TCP data plane's keepalive (services/rpc/dataplane/tcp.py, "Keepalive"): a connection that
dies without closing fails its requests UNAVAILABLE within the keepalive's times, not their
timeout, and the next connection works; a slow handler on a live connection is not taken for a
dead one; an idle connection is not judged (silence counts only while requests are out)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest

from services.rpc.dataplane import DataPlaneError, ErrorKind
from services.rpc.dataplane.tcp import TCP_KEEPALIVE, Keepalive, TcpClient, TcpServer
from tests.chaos.proxy import FaultProxy, Mode

FAST = Keepalive(interval_s=0.2, timeout_s=0.5)


async def echo(header: bytes, payload: memoryview) -> tuple[bytes, memoryview]:
    if header.startswith(b"sleep:"):
        await asyncio.sleep(float(header[6:]))
    return header[::-1], payload


@contextlib.asynccontextmanager
async def served(proxied: bool = False):
    """A server, a client to it (through a fault proxy if ``proxied``) and the proxy (or None);
    all closed after."""
    server = TcpServer(echo, secret=b"")
    await server.start()
    proxy = FaultProxy("data", lambda: server.address) if proxied else None
    address = proxy.start() if proxy else server.address
    client = await TcpClient.connect(address, 5.0, secret=b"", keepalive=FAST)
    try:
        yield client, proxy
    finally:
        await client.close()
        await server.stop(grace_s=0.1)
        if proxy is not None:
            proxy.stop()


def test_a_stranded_connection_fails_its_requests_within_the_keepalive_and_a_new_one_works():
    async def main():
        async with served(proxied=True) as (client, proxy):
            assert await client.request(b"ab", b"x") == (b"ba", bytearray(b"x"))
            proxy.set(Mode.STRAND)
            started = time.monotonic()
            with pytest.raises(DataPlaneError) as info:
                await client.request(b"lost", b"y" * 100_000, timeout_s=20.0)
            waited = time.monotonic() - started
            assert info.value.kind is ErrorKind.UNAVAILABLE, info.value
            assert "stalled" in info.value.message
            # interval + timeout + the watch's tick (a quarter of the interval), with slack
            assert waited < 2.5, waited
            with pytest.raises(DataPlaneError) as again:  # the broken client stays broken
                await client.request(b"x")
            assert again.value.kind is ErrorKind.UNAVAILABLE
            fresh = await TcpClient.connect(proxy.address, 5.0, secret=b"", keepalive=FAST)
            try:
                assert await fresh.request(b"cd", b"z") == (b"dc", bytearray(b"z"))
            finally:
                await fresh.close()

    asyncio.run(main())


def test_a_slow_handler_on_a_live_connection_is_not_taken_for_a_dead_one():
    async def main():
        async with served() as (client, _):
            # 2 s of silence from the handler: four keepalive rounds, each answered
            header, _ = await client.request(b"sleep:2.0", b"p", timeout_s=10.0)
            assert header == b"0.2:peels"

    asyncio.run(main())


def test_an_idle_connection_is_not_judged_and_stays_usable():
    async def main():
        async with served(proxied=True) as (client, proxy):
            await client.request(b"a")
            proxy.set(Mode.BLACKHOLE)  # anything sent now would stay queued, unanswered
            await asyncio.sleep(1.5)  # idle: no request out, so silence is not held against it
            proxy.set(Mode.PASS)
            assert await client.request(b"ab", b"") == (b"ba", bytearray())

    asyncio.run(main())


def test_keepalive_times_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        Keepalive(interval_s=0.0)
    with pytest.raises(ValueError, match="positive"):
        Keepalive(timeout_s=float("nan"))


def test_a_data_plane_socket_has_the_kernels_keepalive_on():
    async def main():
        async with served() as (client, _):
            sock = client._conn.sock
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            for name, value in TCP_KEEPALIVE.items():
                if hasattr(socket, name):
                    assert sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name)) == value

    asyncio.run(main())
