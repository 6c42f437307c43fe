"""The client library's connections to a router, through a fault proxy (tests/chaos/proxy.py)
in front of the real router server with fake workers (grpc_fakes.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from services.client.client import AsyncBanaServeClient, BanaServeClient, BanaServeClientError
from tests.chaos.proxy import FaultProxy, Mode
from tests.router.grpc_fakes import cluster


@contextlib.asynccontextmanager
async def client_proxy(c) -> AsyncIterator[FaultProxy]:
    """The fault proxy in front of the cluster's router, stopped at the end."""
    proxy = FaultProxy("client", lambda: c.stub._router_address)
    proxy.start()
    try:
        yield proxy
    finally:
        await asyncio.to_thread(proxy.stop)


def test_a_new_client_does_not_inherit_another_clients_dead_connection():
    """gRPC shares a connection between a process's channels of the same target and settings
    unless told not to: a client opened after another's connection died without closing sent
    its request into that dead connection and waited for keepalive (15 s; the chaos matrix's
    recovery probe). Each client's connections are its own."""

    async def main():
        async with (
            cluster() as c,
            client_proxy(c) as proxy,
            AsyncBanaServeClient(proxy.address) as first,
        ):
            done = await first.complete([1, 2, 3], max_tokens=4, timeout_s=5)
            assert list(done.token_ids) == [7, 8, 9, 10]
            await asyncio.to_thread(proxy.set, Mode.STRAND)
            async with AsyncBanaServeClient(proxy.address) as second:
                done = await second.complete([1, 2, 3], max_tokens=4, timeout_s=3)
            assert list(done.token_ids) == [7, 8, 9, 10]
            assert proxy.num_connections == 2

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


@pytest.mark.parametrize("client_class", [BanaServeClient, AsyncBanaServeClient])
def test_cancel_ends_a_resume_waiting_for_the_router_at_once(client_class):
    """Found by a probe: ``cancel()`` while the client waited for a lost router to be back sent
    nothing, but the caller's iteration stayed blocked for the rest of the wait (up to
    ``reconnect_timeout_s``, 30 s). It now ends at once, CANCELLED."""

    async def main():
        async with cluster(hang_decode=True) as c:
            async with client_proxy(c) as proxy:
                if client_class is BanaServeClient:
                    outcome = await asyncio.to_thread(_cut_and_cancel_sync, proxy)
                else:
                    outcome = await _cut_and_cancel_async(proxy)
            error, tokens, after_cancel_s = outcome
            assert tokens == [7, 8]
            assert isinstance(error, BanaServeClientError), error
            assert error.code is grpc.StatusCode.CANCELLED
            assert after_cancel_s < 2.0, after_cancel_s
            assert [call[0] for call in c.log.calls].count("reserve") == 1  # nothing resent

    asyncio.run(main())


def _cut_and_cancel_sync(proxy: FaultProxy):
    tokens: list[int] = []
    cancelled_at: list[float] = []
    with BanaServeClient(proxy.address, reconnect_timeout_s=30) as client:
        stream = client.generate([1, 2, 3], max_tokens=4, timeout_s=60)

        def cancel() -> None:
            cancelled_at.append(time.monotonic())
            stream.cancel()

        try:
            for delta in stream:
                tokens.extend(delta.token_ids)
                if len(tokens) == 2:
                    proxy.set(Mode.CUT)  # the router is away: the client waits for it
                    threading.Timer(0.5, cancel).start()
        except BanaServeClientError as exc:
            return exc, tokens, time.monotonic() - cancelled_at[0]
    return None, tokens, 0.0


async def _cut_and_cancel_async(proxy: FaultProxy):
    tokens: list[int] = []
    loop = asyncio.get_running_loop()
    async with AsyncBanaServeClient(proxy.address, reconnect_timeout_s=30) as client:
        stream = client.generate([1, 2, 3], max_tokens=4, timeout_s=60)
        cancelled_at: list[float] = []

        def cancel() -> None:
            cancelled_at.append(time.monotonic())
            stream.cancel()

        try:
            async for delta in stream:
                tokens.extend(delta.token_ids)
                if len(tokens) == 2:
                    await asyncio.to_thread(proxy.set, Mode.CUT)
                    loop.call_later(0.5, cancel)
        except BanaServeClientError as exc:
            return exc, tokens, time.monotonic() - cancelled_at[0]
    return None, tokens, 0.0


def test_the_async_client_says_cancelled_as_the_sync_one_does():
    """Found by a probe: ``cancel()`` on a live async stream ended the caller's ``async for``
    with a bare asyncio.CancelledError (grpc.aio's), which asyncio code takes for the task's
    own cancellation; the sync client raises BanaServeClientError(CANCELLED)."""

    async def main():
        async with (
            cluster(hang_decode=True) as c,
            AsyncBanaServeClient(c.stub._router_address) as client,
        ):
            stream = client.generate([1, 2, 3], max_tokens=4, timeout_s=30)
            with pytest.raises(BanaServeClientError) as info:
                async for _ in stream:
                    stream.cancel()
            assert info.value.code is grpc.StatusCode.CANCELLED
            assert not asyncio.current_task().cancelling()

    asyncio.run(main())


def test_the_client_library_names_every_request_it_sends():
    """Found by a probe: a stream without a request id broken before its started frame was
    resent under a new id the router gave it, while the first copy ran on (two sequences for
    one request until the router's keepalive found the dead connection, ~15 s). The client
    library now names every request; the router's started frame says the same id."""

    async def main():
        async with cluster() as c, AsyncBanaServeClient(c.stub._router_address) as client:
            stream = client.generate([1, 2, 3], max_tokens=4, timeout_s=5)
            sent = stream._resume.message.request_id
            assert sent.startswith("req-") and len(sent) == 20
            # Known before the router answers (probe, session 42: '' until the started frame,
            # so a request still waiting for room could not be aborted by its id).
            assert stream.request_id == sent
            result = await client.complete([1, 2, 3], max_tokens=4, timeout_s=5)
            assert result.request_id.startswith("req-") and result.request_id != sent
            async for _ in stream:
                pass
            assert stream.request_id == sent

    asyncio.run(main())


def test_a_stream_whose_router_stays_away_past_its_deadline_fails_deadline_exceeded():
    """Found by a probe: a link cut for good failed the stream at its deadline (on time) but
    with the break's UNAVAILABLE; the deadline is why it ends."""

    async def main():
        async with cluster(hang_decode=True) as c:
            async with client_proxy(c) as proxy, AsyncBanaServeClient(proxy.address) as client:
                stream = client.generate([1, 2, 3], max_tokens=4, timeout_s=2.0)
                started = time.monotonic()
                with pytest.raises(BanaServeClientError) as info:
                    async for _ in stream:
                        await asyncio.to_thread(proxy.set, Mode.CUT)
                took = time.monotonic() - started
            assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED, info.value
            assert "the stream broke" in info.value.message
            assert 1.5 < took < 3.5, took

    asyncio.run(main())


STALE_READY_WAITS = 3


@pytest.mark.parametrize("client_class", [BanaServeClient, AsyncBanaServeClient])
def test_a_resend_that_never_reached_the_router_is_not_another_resume(client_class, monkeypatch):
    """Found in CI: a stream whose router was SIGKILLed failed UNAVAILABLE `failed to connect
    ... Connection refused` although the router was back a moment later. gRPC may say a channel
    is ready for the connection that has just died; each resend then failed at once and used up
    a resume. A resend that never reached the router is sent again within the same wait (after
    a short pause), not counted. Forced here: the channel reads ready at once for the first
    three waits while the link refuses every connection; one resume allowed."""
    stale = {"waits": 0}
    real_future = grpc.channel_ready_future

    def ready_at_once_then_real(channel):
        stale["waits"] += 1
        if stale["waits"] > STALE_READY_WAITS:
            return real_future(channel)
        ready: concurrent.futures.Future = concurrent.futures.Future()
        ready.set_result(None)
        return ready

    monkeypatch.setattr(grpc, "channel_ready_future", ready_at_once_then_real)

    async def main():
        async with cluster(hang_decode=True) as c:
            async with client_proxy(c) as proxy:
                if client_class is BanaServeClient:
                    outcome = await asyncio.to_thread(_cut_for_a_second_sync, c, proxy)
                else:
                    outcome = await _cut_for_a_second_async(c, proxy, stale)
            result, took = outcome
            assert not isinstance(result, BaseException), result
            assert list(result.token_ids) == [7, 8, 9, 10]
            assert stale["waits"] > STALE_READY_WAITS  # each forced wait was used, and a real one
            assert took < 8.0, took

    asyncio.run(main())


def _cut_for_a_second(c, proxy: FaultProxy) -> None:
    c.workers["d0"].hang_decode = False  # the resumed stream ends at once
    proxy.set(Mode.CUT)  # every connection refused, the open one reset
    threading.Timer(1.0, proxy.set, (Mode.PASS,)).start()


def _cut_for_a_second_sync(c, proxy: FaultProxy):
    started = time.monotonic()
    with BanaServeClient(proxy.address, max_resumes=1, reconnect_timeout_s=10) as client:
        stream = client.generate([1, 2, 3], max_tokens=4, timeout_s=30)
        try:
            for delta in stream:
                if list(delta.token_ids) == [8]:
                    _cut_for_a_second(c, proxy)
        except BanaServeClientError as exc:
            return exc, time.monotonic() - started
        return stream.result, time.monotonic() - started


async def _cut_for_a_second_async(c, proxy: FaultProxy, stale: dict[str, int]):
    started = time.monotonic()
    async with AsyncBanaServeClient(proxy.address, max_resumes=1, reconnect_timeout_s=10) as client:
        real_ready = client._channel.channel_ready

        async def ready_at_once_then_real():
            stale["waits"] += 1
            if stale["waits"] > STALE_READY_WAITS:
                await real_ready()

        client._channel.channel_ready = ready_at_once_then_real
        stream = client.generate([1, 2, 3], max_tokens=4, timeout_s=30)
        try:
            async for delta in stream:
                if list(delta.token_ids) == [8]:
                    await asyncio.to_thread(_cut_for_a_second, c, proxy)
        except BanaServeClientError as exc:
            return exc, time.monotonic() - started
        return stream.result, time.monotonic() - started
