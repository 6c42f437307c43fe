"""Awaiting grpc.aio client calls without leaking native memory when the awaiting task is
cancelled.

grpc.aio runs each operation batch of a call in a task of its own and frees the batch's
native ops only once that task has its result: a task cancelled while a batch is in flight
drops it with its ops still allocated, and so does a batch that fails (grpc/grpc#43360, open;
measured here on grpcio 1.85.4). The router awaits its calls to the workers in each request's
task, and a request whose client cancels it, or whose deadline passes, has that task cancelled;
so do the prefill worker's calls to the store and the async client library's. Every unary
call and server stream a BanaServe process makes over grpc.aio is awaited through here; not
the client streams: the load reports (one stream for the worker's life) and the gRPC KV
transport's ``TransferKV`` (not the default transport) are not changed.

Here the awaiting task waits on a shield. Cancelled, it cancels the call and waits for the
batch's task to end before it re-raises, so the batch ends in gRPC core and is freed; the
caller sees the same ``CancelledError``.

Measured in a fresh process (``tests/rpc/aio_leak_probe.py``, 2026-12-07, grpcio 1.85.4,
heap bytes a call cancelled in flight, grpc.aio's own form first):

- A unary call is cancelled in gRPC core only (``_cancel_in_core``): grpc.aio's ``cancel()``
  would also cancel the task that awaits the call's one batch, the leak itself (947 B against
  none).
- A stream is cancelled with ``call.cancel()``; once its headers have come, that ends the
  pending read's batch in core (82 B with ``async for frame in call`` against none). Before
  its headers, the batch that waits for them fails however the call ends (cancelled, deadline
  passed, server gone), so every BanaServe server sends a response stream's headers at once
  (``services/rpc/status.py``, ``ErrorInterceptor``): 81 B against none.

A call through client interceptors (tracing on) is cancelled with its own ``cancel()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

try:  # the base of grpc.aio's own call objects: its cancel() ends the call in core only
    from grpc.aio._call import Call as _PlainCall
except ImportError:  # pragma: no cover - another grpcio layout: plain cancel() (the leak)
    _PlainCall = None


def _cancel_in_core(call: Any) -> None:
    if _PlainCall is not None and isinstance(call, _PlainCall):
        _PlainCall.cancel(call)
    else:
        call.cancel()


def _cancel(call: Any) -> None:
    call.cancel()


async def _shielded(call: Any, awaitable: Any, cancel: Callable[[Any], None]) -> Any:
    operation = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(operation)
    except asyncio.CancelledError:
        cancel(call)
        await asyncio.wait({operation})  # ended: its batch is freed
        if not operation.cancelled():
            operation.exception()  # retrieved: no "never retrieved" warning
        raise


async def unary(call: Any) -> Any:
    """The response of a unary call (``stub.Method(request)``), as ``await call``."""
    return await _shielded(call, call, _cancel_in_core)


async def frames(call: Any) -> AsyncIterator[Any]:
    """The messages of a server-streaming call, as ``async for frame in call``."""
    while True:
        frame = await _shielded(call, call.read(), _cancel)
        if frame is grpc.aio.EOF:
            return
        yield frame
