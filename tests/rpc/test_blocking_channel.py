"""``BlockingTcpChannel``: one thread's request-then-reply connection to a ``TcpServer`` (the
attention port's exchanges). Served by a real server on a loop thread, used from this thread
with no loop: exact bytes, the server's errors with their kind, replies nobody read skipped,
several requests out at once answered in any order, a bounded wait that breaks the channel, the
peer challenge, ``close`` from another thread, and the keepalive (a stranded connection breaks
within it; a slow reply on a live one does not)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from services.common.errors import InvalidRequestError
from services.rpc.dataplane import DataPlaneError, ErrorKind
from services.rpc.dataplane.blocking_tcp import BlockingTcpChannel
from services.rpc.dataplane.tcp import Keepalive, TcpServer
from tests.chaos.proxy import FaultProxy, Mode
from tests.migration.harness import LoopThread

SECRET = b"s" * 32
FAST = Keepalive(interval_s=0.2, timeout_s=0.5)


async def echo(header: bytes, payload: memoryview) -> tuple[bytes, memoryview]:
    if header.startswith(b"sleep:"):
        await asyncio.sleep(float(header[6:]))
    if header == b"invalid":
        raise InvalidRequestError("sequence r9 is not held here")
    return header[::-1], payload


@pytest.fixture
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


def served(loop: LoopThread, secret: bytes = b"") -> TcpServer:
    server = TcpServer(echo, secret=secret)
    loop.call(server.start())
    return server


@pytest.mark.parametrize("size", [0, 7, 200_000])
def test_round_trip_from_a_thread_without_a_loop(loop, size):
    server = served(loop)
    channel = loop.call(BlockingTcpChannel.connect(server.address, 5, secret=b""))
    payload = os.urandom(size)
    for i in range(3):
        rid = channel.send(b"hdr%d" % i, payload)
        header, answer = channel.receive(rid, 5)
        assert (header, bytes(answer)) == (b"%drdh" % i, payload)
    channel.close()
    loop.call(server.stop(grace_s=0.1))


def test_a_refusal_is_remote_and_the_channel_goes_on(loop):
    server = served(loop)
    channel = loop.call(BlockingTcpChannel.connect(server.address, 5, secret=b""))
    rid = channel.send(b"invalid")
    with pytest.raises(DataPlaneError) as info:
        channel.receive(rid, 5)
    assert info.value.kind is ErrorKind.REMOTE and "r9 is not held" in info.value.message
    assert channel.receive(channel.send(b"ok"), 5)[0] == b"ko"
    channel.close()
    loop.call(server.stop(grace_s=0.1))


def test_a_reply_nobody_read_is_skipped(loop):
    server = served(loop)
    channel = loop.call(BlockingTcpChannel.connect(server.address, 5, secret=b""))
    channel.send(b"first")  # a step that failed before it waited
    assert channel.receive(channel.send(b"second"), 5)[0] == b"dnoces"
    channel.close()
    loop.call(server.stop(grace_s=0.1))


def test_requests_out_at_once_each_get_their_own_reply_in_any_order(loop):
    server = served(loop)
    channel = loop.call(BlockingTcpChannel.connect(server.address, 5, secret=b""))
    slow, fast = channel.send(b"sleep:0.3"), channel.send(b"fast")  # answered fast, slow
    assert channel.receive(slow, 5)[0] == b"3.0:peels"  # reads past the fast one's reply
    assert channel.receive(fast, 5)[0] == b"tsaf"  # kept for it
    with pytest.raises(ValueError, match="not out"):
        channel.receive(fast, 5)  # received once
    assert channel.receive(channel.send(b"next"), 5)[0] == b"txen"
    channel.close()
    loop.call(server.stop(grace_s=0.1))


def test_a_reply_read_ahead_then_given_up_on_is_dropped(loop):
    server = served(loop)
    channel = loop.call(BlockingTcpChannel.connect(server.address, 5, secret=b""))
    slow = channel.send(b"sleep:0.2")
    channel.send(b"fast")
    channel.receive(slow, 5)  # keeps the fast one's reply, which nobody reads
    assert channel.receive(channel.send(b"later"), 5)[0] == b"retal"
    assert not channel._kept and not channel._out  # noqa: SLF001 - nothing held for it
    channel.close()
    loop.call(server.stop(grace_s=0.1))


def test_no_reply_in_time_breaks_the_channel(loop):
    server = served(loop)
    channel = loop.call(BlockingTcpChannel.connect(server.address, 5, secret=b""))
    rid = channel.send(b"sleep:1.0")
    started = time.monotonic()
    with pytest.raises(DataPlaneError) as info:
        channel.receive(rid, 0.2)
    assert info.value.kind is ErrorKind.TIMEOUT
    assert time.monotonic() - started < 0.8
    with pytest.raises(DataPlaneError) as later:
        channel.send(b"after")
    assert later.value.kind is ErrorKind.UNAVAILABLE and "within 0.2s" in later.value.message
    loop.call(server.stop(grace_s=0.1))


def test_a_stopped_server_wakes_a_waiting_reader(loop):
    server = served(loop)
    channel = loop.call(BlockingTcpChannel.connect(server.address, 5, secret=b""))
    rid = channel.send(b"sleep:5")
    stopped = []

    def stop():
        stopped.append(asyncio.run_coroutine_threadsafe(server.stop(grace_s=0.0), loop.loop))

    timer = threading.Timer(0.2, stop)
    timer.start()
    started = time.monotonic()
    with pytest.raises(DataPlaneError) as info:
        channel.receive(rid, 10)
    assert info.value.kind is ErrorKind.UNAVAILABLE
    assert time.monotonic() - started < 4
    # The stop may wake the reader before the timer's thread has appended its future (a CI run).
    timer.join(10)
    stopped[0].result(10)


def test_close_from_another_thread_wakes_a_waiting_reader(loop):
    server = served(loop)
    channel = loop.call(BlockingTcpChannel.connect(server.address, 5, secret=b""))
    rid = channel.send(b"sleep:5")
    threading.Timer(0.2, channel.close).start()
    started = time.monotonic()
    with pytest.raises(DataPlaneError) as info:
        channel.receive(rid, 10)
    assert info.value.kind is ErrorKind.UNAVAILABLE
    assert time.monotonic() - started < 2
    loop.call(server.stop(grace_s=0.1))


def test_the_peer_challenge_is_the_tcp_clients(loop):
    server = served(loop, secret=SECRET)
    channel = loop.call(BlockingTcpChannel.connect(server.address, 5, secret=SECRET))
    assert channel.receive(channel.send(b"ab"), 5)[0] == b"ba"
    channel.close()
    with pytest.raises(DataPlaneError) as info:
        loop.call(BlockingTcpChannel.connect(server.address, 5, secret=b"x" * 32))
    assert info.value.kind is ErrorKind.UNAVAILABLE
    loop.call(server.stop(grace_s=0.1))


def test_a_stranded_connection_breaks_within_the_keepalive_not_the_reply_timeout(loop):
    server = served(loop)
    proxy = FaultProxy("data", lambda: server.address)
    connect = BlockingTcpChannel.connect(proxy.start(), 5, secret=b"", keepalive=FAST)
    channel = loop.call(connect)
    try:
        assert channel.receive(channel.send(b"ab", b"x"), 5) == (b"ba", bytearray(b"x"))
        proxy.set(Mode.STRAND)
        started = time.monotonic()
        with pytest.raises(DataPlaneError) as info:
            channel.receive(channel.send(b"lost", b"y" * 1000), 20.0)
        waited = time.monotonic() - started
        assert info.value.kind is ErrorKind.UNAVAILABLE and "stalled" in info.value.message
        assert waited < 1.5, waited  # interval + timeout (0.7 s), with slack; not 20 s
        with pytest.raises(DataPlaneError, match="stalled"):  # broken for good
            channel.send(b"after")
        fresh = loop.call(BlockingTcpChannel.connect(proxy.address, 5, secret=b"", keepalive=FAST))
        assert fresh.receive(fresh.send(b"cd"), 5)[0] == b"dc"  # new connections pass
        fresh.close()
    finally:
        channel.close()
        loop.call(server.stop(grace_s=0.1))
        proxy.stop()


def test_a_slow_reply_on_a_live_connection_is_not_taken_for_a_dead_one(loop):
    server = served(loop)
    channel = loop.call(BlockingTcpChannel.connect(server.address, 5, secret=b"", keepalive=FAST))
    # 2 s without the reply: the keepalive pings about three times, each answered (PONG)
    assert channel.receive(channel.send(b"sleep:2.0"), 10)[0] == b"0.2:peels"
    assert channel.receive(channel.send(b"next"), 5)[0] == b"txen"
    channel.close()
    loop.call(server.stop(grace_s=0.1))
