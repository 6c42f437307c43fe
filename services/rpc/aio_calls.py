"""Awaiting grpc.aio client calls without leaking native memory when the awaiting task is
cancelled.

grpc.aio runs each operation batch of a call in a task of its own and frees the batch's
native ops only once that task has its result: a task cancelled while a batch is in flight
drops it with its ops still allocated (grpc/grpc#43360, open; measured here on grpcio 1.85.4). The router
awaits its calls to the workers in each request's task, and a request whose client cancels it
has that task cancelled: measured on a real cluster (2026-12-07, tiny-llama, 1P1D), the router
kept 263 B per request cancelled after its first token (~25 B per request that ended
normally), 34 B with the calls awaited here. (Requests with a 5 ms deadline kept ~250–360 B
each with or without this: a batch that fails at its gRPC deadline is not freed either, and
the shield does not help that; docs/reliability.md, session 48.)

Here the awaiting task waits on a shield: cancelled, it cancels the call itself
(``call.cancel()``, which ends the batch in gRPC core) and waits for the batch's task to end
before it re-raises, so the batch is freed. The caller sees the same ``CancelledError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc


async def _shielded(call: Any, awaitable: Any) -> Any:
    operation = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(operation)
    except asyncio.CancelledError:
        call.cancel()
        await asyncio.wait({operation})  # ended: its batch is freed
        if not operation.cancelled():
            operation.exception()  # retrieved: no "never retrieved" warning
        raise


async def unary(call: Any) -> Any:
    """The response of a unary call (``stub.Method(request)``), as ``await call``."""
    return await _shielded(call, call)


async def frames(call: Any) -> AsyncIterator[Any]:
    """The messages of a server-streaming call, as ``async for frame in call``."""
    while True:
        frame = await _shielded(call, call.read())
        if frame is grpc.aio.EOF:
            return
        yield frame
