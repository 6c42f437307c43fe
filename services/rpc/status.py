"""The one table from domain errors to gRPC status codes (STYLE.md rule 3).

Servicers raise the exceptions of ``services.common.errors``; ``ErrorInterceptor`` (installed
by ``services.rpc.server`` on every server) turns each into ``context.abort(code, message)``.
An error class maps through its MRO, so a subclass gets its own entry if it has one and its
parent's otherwise. Anything not in the table is a bug: it becomes INTERNAL with a reference
that points at the server's log, never with its message or traceback (which may hold paths,
tensors or other requests' data).
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common import errors

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    # Before InvalidRequestError in meaning, and found first because it is the subclass.
    errors.OutOfRangeError: grpc.StatusCode.OUT_OF_RANGE,
    errors.InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.RequestNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # The server, not the caller, is set up wrong for this call: retrying the same request
    # elsewhere may work, changing the request will not.
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ModelFormatError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DependencyUnavailableError: grpc.StatusCode.UNAVAILABLE,
    # Every wait in a service is bounded; one that runs out is a deadline, not a bug.
    TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and the message a caller may see for ``exc``."""
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code, str(exc) or cls.__name__
    ref = uuid.uuid4().hex[:12]
    log.error("internal error ref=%s", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref} in the server log)"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message = status_for(exc)
    await context.abort(code, message)


def _passes_through(exc: BaseException) -> bool:
    # The servicer (or a wrapper further in) already chose a status and aborted.
    return isinstance(exc, grpc.aio.AbortError)


def _wrap_unary_response(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except Exception as exc:
            if _passes_through(exc):
                raise
            await abort_with(context, exc)

    return handler


def _wrap_stream_response(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except Exception as exc:
            if _passes_through(exc):
                raise
            await abort_with(context, exc)

    return handler


def translate_errors(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps one aio handler (coroutine or async generator) so domain errors become statuses."""
    if inspect.isasyncgenfunction(behavior):
        return _wrap_stream_response(behavior)
    return _wrap_unary_response(behavior)


_HANDLER_KINDS = {
    # (request_streaming, response_streaming) -> the constructor that rebuilds the handler
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Applies ``translate_errors`` to every method of every service on a server."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        attr, make = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
        return make(
            translate_errors(getattr(handler, attr)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
