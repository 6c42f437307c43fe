"""The data plane on every transport (ucx, tcp, grpc), server and client in this process: exact
bytes both ways, concurrent requests on one connection, errors with their message, and no wait
without a bound (refused connection, stopped server, slow handler)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest

from services.common.errors import ConfigError, ErrorCode, InvalidRequestError
from services.rpc.dataplane import KINDS, DataPlaneError, ErrorKind, connect, listen, serve
from services.rpc.dataplane.base import Frame, FrameType
from services.rpc.dataplane.ucx import UCX_ENV_DEFAULTS, ucx_environment

each_kind = pytest.mark.parametrize("kind", KINDS)
MiB = 1 << 20


async def echo(header: bytes, payload: memoryview) -> tuple[bytes, memoryview]:
    """Answers with the header reversed and the payload as received."""
    if header.startswith(b"sleep:"):  # b"sleep:SECONDS" or b"sleep:SECONDS#TAG"
        await asyncio.sleep(float(header[6:].partition(b"#")[0]))
    if header == b"invalid":
        raise InvalidRequestError("block 0xab is not here")
    if header == b"bug":
        raise RuntimeError("bug while reading /secret/path")
    return header[::-1], payload


@asynccontextmanager
async def running(kind: str, handler=echo) -> AsyncIterator:
    server = serve(kind, handler)
    await server.start()
    client = await connect(kind, server.address, timeout_s=5)
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop(grace_s=0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def expect_error(awaitable, kind: ErrorKind, within_s: float) -> DataPlaneError:
    started = time.monotonic()
    with pytest.raises(DataPlaneError) as info:
        await awaitable
    assert info.value.kind is kind, info.value
    assert time.monotonic() - started < within_s
    return info.value


@each_kind
@pytest.mark.parametrize("size", [0, 1, MiB, 64 * MiB])
def test_round_trip_is_byte_exact_and_writable(kind, size):
    payload = os.urandom(size)

    async def main():
        async with running(kind) as (_, client):
            header, answer = await client.request(b"kv-header", payload, timeout_s=20)
            assert header == b"redaeh-vk"
            assert memoryview(answer).nbytes == size and bytes(answer) == payload
            assert not memoryview(answer).readonly

    asyncio.run(main())


@each_kind
def test_numpy_payload_is_sent_as_its_bytes(kind):
    array = np.arange(6 * 1024, dtype=np.float32).reshape(6, 1024)

    async def main():
        async with running(kind) as (_, client):
            _, answer = await client.request(b"h", array)
            received = np.frombuffer(answer, dtype=np.float32).reshape(6, 1024)
            np.testing.assert_array_equal(received, array)
            received[0, 0] = -1.0  # a writable buffer: no copy needed to use it

    asyncio.run(main())


@each_kind
def test_concurrent_requests_on_one_connection_get_their_own_answers(kind):
    # Later requests are answered first (shorter sleeps), so answers must be matched by id.
    requests = [
        (f"sleep:{0.05 * (9 - i) / 9:.3f}#{i}".encode(), os.urandom(i * 37 * 1024))
        for i in range(10)
    ]

    async def main():
        async with running(kind) as (_, client):
            answers = await asyncio.gather(*(client.request(h, p) for h, p in requests))
            for (header, payload), (got_header, got_payload) in zip(requests, answers, strict=True):
                assert got_header == header[::-1]
                assert bytes(got_payload) == payload

    asyncio.run(main())


@each_kind
def test_handler_error_is_raised_with_its_message_and_the_server_stays_up(kind):
    async def main():
        async with running(kind) as (_, client):
            error = await expect_error(client.request(b"invalid"), ErrorKind.REMOTE, 5)
            assert error.code is ErrorCode.INVALID_ARGUMENT
            assert error.message == "block 0xab is not here"
            # A bug is INTERNAL with a reference to the server log, never its message.
            error = await expect_error(client.request(b"bug", b"x"), ErrorKind.REMOTE, 5)
            assert error.code is ErrorCode.INTERNAL and "internal error (ref" in error.message
            assert "/secret/path" not in str(error)
            assert await client.request(b"ok", b"still") == (b"ko", bytearray(b"still"))

    asyncio.run(main())


@each_kind
def test_connect_to_a_closed_port_fails_fast(kind):
    async def main():
        address = f"127.0.0.1:{free_port()}"
        await expect_error(connect(kind, address, timeout_s=10), ErrorKind.UNAVAILABLE, 2)

    asyncio.run(main())


@each_kind
def test_requests_after_the_server_stopped_fail_fast(kind):
    async def main():
        server = serve(kind, echo)
        await server.start()
        client = await connect(kind, server.address, timeout_s=5)
        try:
            assert (await client.request(b"ab", b"1"))[0] == b"ba"
            in_flight = asyncio.ensure_future(client.request(b"sleep:30", timeout_s=20))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await server.stop(grace_s=0.1)
            assert time.monotonic() - started < 2
            await expect_error(in_flight, ErrorKind.UNAVAILABLE, 3)
            await expect_error(client.request(b"x", timeout_s=20), ErrorKind.UNAVAILABLE, 3)
        finally:
            await client.close()

    asyncio.run(main())


@each_kind
def test_a_stopping_server_finishes_running_handlers_and_refuses_new_requests(kind):
    async def main():
        server = serve(kind, echo)
        await server.start()
        client = await connect(kind, server.address, timeout_s=5)
        try:
            running = asyncio.ensure_future(client.request(b"sleep:0.5", b"kept"))
            await asyncio.sleep(0.2)
            stopping = asyncio.ensure_future(server.stop(grace_s=3))
            await asyncio.sleep(0.05)
            await expect_error(client.request(b"late", b"x"), ErrorKind.UNAVAILABLE, 1)
            assert await running == (b"5.0:peels", bytearray(b"kept"))
            await asyncio.wait_for(stopping, 3)
        finally:
            await client.close()

    asyncio.run(main())


@each_kind
def test_timeout_is_honoured_and_the_connection_stays_usable(kind):
    async def main():
        async with running(kind) as (_, client):
            request = client.request(b"sleep:5", b"p" * 1000, timeout_s=0.3)
            await expect_error(request, ErrorKind.TIMEOUT, 1.5)
            assert await client.request(b"ok", b"after") == (b"ko", bytearray(b"after"))

    asyncio.run(main())


@each_kind
def test_a_closed_client_refuses_requests(kind):
    async def main():
        async with running(kind) as (_, client):
            await client.close()
            await expect_error(client.request(b"x"), ErrorKind.UNAVAILABLE, 1)

    asyncio.run(main())


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="ucx, tcp, grpc"):
        serve("rdma", echo)


def test_ucx_defaults_never_override_the_users_environment(monkeypatch):
    for name in UCX_ENV_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UCX_NET_DEVICES", "eth0")
    applied = ucx_environment()
    assert applied == {k: v for k, v in UCX_ENV_DEFAULTS.items() if k != "UCX_NET_DEVICES"}
    assert os.environ["UCX_NET_DEVICES"] == "eth0"
    assert ucx_environment() == {}


def test_frame_round_trips_and_rejects_garbage():
    frame = Frame(7, FrameType.ERROR, 12, 1 << 33, status=3)
    assert Frame.unpack(frame.pack()) == frame
    with pytest.raises(ValueError):
        Frame.unpack(Frame(1, FrameType.REQUEST, 1 << 30, 0).pack())


@pytest.mark.parametrize("kind", ["tcp", "grpc"])  # (ucx listens on every interface)
def test_a_port_in_use_is_a_config_error_naming_it(kind):
    """Found by a probe: a worker's ``--data-port`` already in use ended it with the transport's
    own traceback (OSError, gRPC's RuntimeError, UCXXBusyError)."""

    async def main():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(
                ConfigError, match=f"{kind} data plane cannot listen on 127.0.0.1:{port}"
            ):
                await listen(kind, echo, "127.0.0.1", port)

    asyncio.run(main())
