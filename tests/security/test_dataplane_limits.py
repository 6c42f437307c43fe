"""The TCP data plane against a hostile peer: it used to allocate whatever payload a frame
announced before reading a byte of it, and wait for the bytes forever. Now an announcement over
``max_payload_bytes`` ends the connection unread, a frame whose bytes stop coming ends it after
``read_timeout_s``, and the server serves on. Also: it binds loopback only by default."""

from __future__ import annotations

import asyncio
import socket
import time

from services.rpc.dataplane.base import Frame, FrameType
from services.rpc.dataplane.tcp import DEFAULT_MAX_PAYLOAD_BYTES, ReadLimits, TcpClient, TcpServer

LIMITS = ReadLimits(max_payload_bytes=1024, read_timeout_s=0.2)


async def _echo(header: bytes, payload: bytearray) -> tuple[bytes, bytes]:
    return header, bytes(payload)


async def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sent until it closed (b"" for nothing)."""
    loop = asyncio.get_running_loop()
    received = b""
    while chunk := await loop.sock_recv(sock, 4096):
        received += chunk
    return received


async def _raw(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return sock


def test_an_announced_payload_over_the_limit_ends_the_connection_unread():
    async def main():
        server = TcpServer(_echo, limits=LIMITS, secret=b"")
        await server.start()
        try:
            sock = await _raw(server.address)
            head = Frame(1, FrameType.REQUEST, 0, LIMITS.max_payload_bytes + 1).pack()
            await asyncio.get_running_loop().sock_sendall(sock, head)
            assert await asyncio.wait_for(_closed_by_server(sock), 5) == b""
            sock.close()
            client = await TcpClient.connect(server.address, 5, secret=b"")
            assert await client.request(b"h", b"x" * 1024, timeout_s=5) == (b"h", b"x" * 1024)
            await client.close()
        finally:
            await server.stop(0.1)

    asyncio.run(main())


def test_a_frame_whose_bytes_stop_coming_is_dropped_after_the_read_deadline():
    async def main():
        server = TcpServer(_echo, limits=LIMITS, secret=b"")
        await server.start()
        try:
            sock = await _raw(server.address)
            head = Frame(1, FrameType.REQUEST, 0, 100).pack()
            started = time.monotonic()
            await asyncio.get_running_loop().sock_sendall(sock, head + b"y" * 10)
            assert await asyncio.wait_for(_closed_by_server(sock), 5) == b""
            assert LIMITS.read_timeout_s <= time.monotonic() - started < 2.0
            sock.close()
            client = await TcpClient.connect(server.address, 5, secret=b"")
            assert await client.request(b"h", b"z", timeout_s=5) == (b"h", b"z")
            await client.close()
        finally:
            await server.stop(0.1)

    asyncio.run(main())


def test_defaults_bound_payloads_and_bind_loopback():
    assert DEFAULT_MAX_PAYLOAD_BYTES == 1 << 30
    assert ReadLimits().read_timeout_s == 30.0

    async def main():
        server = TcpServer(_echo)
        await server.start()
        try:
            assert server.address.startswith("127.0.0.1:")
        finally:
            await server.stop(0.1)

    asyncio.run(main())
