"""services/rpc/aio_calls.py on a real grpc.aio server: a task awaiting a call that is cancelled
cancels the call and lets its batch end before the CancelledError reaches the caller (a batch
dropped in flight leaks its native ops: grpc/grpc#43360)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from services.rpc import aio_calls
from tests.rpc.aio_leak_probe import answer_late, ident


async def three_then_wait(request, context):
    for _ in range(3):
        yield b"frame"
    await asyncio.sleep(60)


async def answer(request, context):
    return request


async def served():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.S",
                {
                    "Stream": grpc.unary_stream_rpc_method_handler(three_then_wait, ident, ident),
                    "Late": grpc.unary_unary_rpc_method_handler(answer_late, ident, ident),
                    "Echo": grpc.unary_unary_rpc_method_handler(answer, ident, ident),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_frames_and_unary_pass_results_through():
    async def main():
        server, port = await served()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                echo = channel.unary_unary("/t.S/Echo", ident, ident)
                assert await aio_calls.unary(echo(b"hi")) == b"hi"
                stream = channel.unary_stream("/t.S/Stream", ident, ident)
                call = stream(b"", timeout=1.0)
                got = []
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    async for frame in aio_calls.frames(call):
                        got.append(frame)
                assert got == [b"frame"] * 3
                assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            await server.stop(0)

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["stream", "unary"])
def test_a_cancelled_awaiter_cancels_the_call_and_waits_for_it_to_end(kind):
    """The wrapper keeps what a cancelled awaiter of the plain forms gets: its
    CancelledError, the call ended and cancelled (so do ``await call`` and ``async for frame
    in call``: the difference, the native memory, is the next test's)."""

    async def main():
        server, port = await served()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                if kind == "stream":
                    call = channel.unary_stream("/t.S/Stream", ident, ident)(b"")

                    async def consume():
                        async for _ in aio_calls.frames(call):
                            pass

                else:
                    call = channel.unary_unary("/t.S/Late", ident, ident)(b"")

                    async def consume():
                        await aio_calls.unary(call)

                task = asyncio.ensure_future(consume())
                await asyncio.sleep(0.3)  # in its read (or its unary batch), on the server's wait
                assert not call.done()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                return call.done(), call.cancelled()
        finally:
            await server.stop(0)

    assert asyncio.run(main()) == (True, True)


# What each case is: aio_leak_probe.py's docstring. Measured 2026-12-07, grpcio 1.85.4, 2,000
# calls, heap bytes a call, the plain form first: a read cancelled in flight 82 against -12, a
# unary call 947 against -7, a stream cancelled before its first message 81 from a bare server
# against -14 from one that sends its headers at once.
LEAK_CASES = ["read-shielded", "unary-shielded", "headers-first"]


@pytest.mark.parametrize("case", LEAK_CASES)
def test_cancelled_awaiters_leak_no_native_memory(case):
    """Calls cancelled in flight, in a fresh process (``aio_leak_probe.py``): what stays
    allocated per call, through ``aio_calls`` and against a server with ``ErrorInterceptor``.
    The plain forms keep ~80–1,000 B a call (grpc/grpc#43360), not asserted here: that is
    grpc's to fix."""
    probe = Path(__file__).with_name("aio_leak_probe.py")
    run = subprocess.run(
        [sys.executable, str(probe), case, "2000"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 20.0, f"{case}: {run.stdout.strip()} B a cancelled call"
