"""Run as a script: native memory per cancelled awaiter of a grpc.aio call, in a fresh process
(tests/rpc/test_aio_calls.py). argv: ``plain`` or ``shielded``, then the number of calls.
Prints the RSS growth in bytes per call."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys

import grpc

from services.rpc import aio_calls


def ident(b: bytes) -> bytes:
    return b


async def frame_then_wait(request, context):
    yield b"frame"
    await asyncio.sleep(60)


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


async def main(mode: str, n: int) -> float:
    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(frame_then_wait, ident, ident)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {"S": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.unary_stream("/t.S/S", ident, ident)

        async def one() -> None:
            call = stream(b"")
            frames = aio_calls.frames(call) if mode == "shielded" else call.__aiter__()
            await anext(frames)  # the first frame; the next read waits on the server
            task = asyncio.ensure_future(anext(frames))
            await asyncio.sleep(0.0005)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            call.cancel()

        for _ in range(1000):  # warm-up
            await one()
        gc.collect()
        before = rss_kb()
        for _ in range(n):
            await one()
        gc.collect()
        await asyncio.sleep(0.5)
        after = rss_kb()
    await server.stop(0)
    return (after - before) * 1024 / n


if __name__ == "__main__":
    print(f"{asyncio.run(main(sys.argv[1], int(sys.argv[2]))):.1f}")
