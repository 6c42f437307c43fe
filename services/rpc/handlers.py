"""Rebuilding a grpc.aio method handler around its behavior, for server interceptors.

``HANDLER_KINDS`` maps a handler's (request_streaming, response_streaming) to the attribute
that holds its behavior and the constructor that rebuilds it; ``preceded`` runs a step before
a behavior of either form (a coroutine, or an async generator that yields the responses).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

HANDLER_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def preceded(
    behavior: Callable[..., Any], first: Callable[[grpc.aio.ServicerContext], Awaitable[None]]
) -> Callable[..., Any]:
    """``behavior`` with ``await first(context)`` before it, in the same form."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await first(context)
            async for response in behavior(request, context):
                yield response

        return stream

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await first(context)
        return await behavior(request, context)

    return coroutine
