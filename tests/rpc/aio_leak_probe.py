"""Run as a script: native memory per cancelled awaiter of a grpc.aio call, in a fresh process
(tests/rpc/test_aio_calls.py). argv: the case, then the number of calls. Prints the heap's
growth in bytes per call.

Cases (``plain`` awaits the call as grpc.aio documents; ``shielded`` through aio_calls):
- ``read-plain``, ``read-shielded``: a stream's second read cancelled in flight;
- ``unary-plain``, ``unary-shielded``: a unary call cancelled in flight;
- ``headers-bare``, ``headers-first``: a stream read through aio_calls, cancelled before its
  first message, from a bare server and from one with ``ErrorInterceptor`` (headers at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import sys

import grpc

from services.rpc import aio_calls
from services.rpc.status import ErrorInterceptor


def ident(b: bytes) -> bytes:
    return b


async def frame_then_wait(request, context):
    yield b"frame"
    await asyncio.sleep(60)


async def wait_then_frame(request, context):
    await asyncio.sleep(60)
    yield b"frame"


async def answer_late(request, context):
    await asyncio.sleep(60)
    return b"late"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost",
    )]  # fmt: skip


def heap_bytes() -> int:
    """Bytes malloc has handed out and not had back (glibc's ``mallinfo2``): what leaks, to
    the byte, where RSS moves in pages and arenas."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


async def cancelled_in_flight(awaitable, after_s: float = 0.002) -> None:
    task = asyncio.ensure_future(awaitable)
    await asyncio.sleep(after_s)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def main(case: str, n: int) -> float:
    kind, form = case.split("-")
    server = grpc.aio.server(interceptors=[ErrorInterceptor()] if form == "first" else [])
    handlers = {
        "S": grpc.unary_stream_rpc_method_handler(frame_then_wait, ident, ident),
        "W": grpc.unary_stream_rpc_method_handler(wait_then_frame, ident, ident),
        "U": grpc.unary_unary_rpc_method_handler(answer_late, ident, ident),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.unary_stream("/t.S/S", ident, ident)
        waiting = channel.unary_stream("/t.S/W", ident, ident)
        late = channel.unary_unary("/t.S/U", ident, ident)

        async def one() -> None:
            if kind == "read":
                call = stream(b"")
                frames = aio_calls.frames(call) if form == "shielded" else call.__aiter__()
                await anext(frames)  # the first frame; the next read waits on the server
                await cancelled_in_flight(anext(frames), 0.0005)
                call.cancel()
            elif kind == "unary":
                call = late(b"")
                await cancelled_in_flight(aio_calls.unary(call) if form == "shielded" else call)
            else:  # headers: the first read waits on the server
                call = waiting(b"")
                await cancelled_in_flight(anext(aio_calls.frames(call)), 0.005)

        for _ in range(500):  # warm-up
            await one()
        gc.collect()
        before = heap_bytes()
        for _ in range(n):
            await one()
        gc.collect()
        await asyncio.sleep(0.5)
        after = heap_bytes()
    await server.stop(0)
    return (after - before) / n


if __name__ == "__main__":
    print(f"{asyncio.run(main(sys.argv[1], int(sys.argv[2]))):.1f}")
