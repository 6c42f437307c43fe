"""The one table from domain errors to gRPC status codes (STYLE.md rule 3).

Servicers raise the exceptions of ``services.common.errors``; ``ErrorInterceptor`` (installed
by ``services.rpc.server`` on every server) turns each into ``context.abort(code, message)``.
It also owns the requests that never reach a servicer: bytes that do not decode as the method's
request message (unary or streamed) are answered INVALID_ARGUMENT (``MalformedMessageError``).
grpc-aio would answer UNKNOWN for a unary one, since it decodes before any handler runs, so the
interceptor's deserializer hands the handler a marker instead of raising, and the handler (or
the request stream, message by message) turns the marker into the error.
An error class maps through its MRO, so a subclass gets its own entry if it has one and its
parent's otherwise. Anything not in the table is a bug: it becomes INTERNAL with a reference
that points at the server's log, never with its message or traceback (which may hold paths,
tensors or other requests' data).

A failure recorded by a client of another service (a worker call, a KV transfer, a data-plane
reply) keeps its status as an ``ErrorCode`` (services.common.errors), translated here, at the
edge, by ``error_code`` and back by ``grpc_code``: code that decides what to do with a failure
compares enum members, never status names.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from services.common import errors
from services.rpc.handlers import HANDLER_KINDS, preceded

log = logging.getLogger(__name__)
_M = TypeVar("_M", bound=Message)

# Trailing metadata of an UNAVAILABLE the router decided (its workers lost, none to route to):
# a client tells it from a router that is itself gone (a broken connection), whose request it
# may resume (router.proto, GenerateRequest.resume_output_token_ids).
ROUTER_UNAVAILABLE = ("banaserve-unavailable", "workers")

STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    # Before InvalidRequestError in meaning, and found first because it is the subclass.
    errors.OutOfRangeError: grpc.StatusCode.OUT_OF_RANGE,
    errors.InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    # Bytes that are not the method's request message: the request is malformed, not the server.
    errors.MalformedMessageError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.RequestNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    # The request goes on under a newer call (a resend that took it over), not this one.
    errors.SupersededError: grpc.StatusCode.ABORTED,
    # A bug met while computing this request; its message carries only a log reference.
    errors.StepFailedError: grpc.StatusCode.INTERNAL,
    # The server, not the caller, is set up wrong for this call: retrying the same request
    # elsewhere may work, changing the request will not.
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ModelFormatError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DependencyUnavailableError: grpc.StatusCode.UNAVAILABLE,
    # Not the router's "no worker" (no ROUTER_UNAVAILABLE marker): the service itself is going.
    errors.ShuttingDownError: grpc.StatusCode.UNAVAILABLE,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    # Valid, but the thing acted on is in the wrong state for it; retrying as-is will not help.
    errors.PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    # A request for a feature that exists in the contract but not (yet) in this server.
    NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
    # Every wait in a service is bounded; one that runs out is a deadline, not a bug.
    TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
}


_C = errors.ErrorCode
# The failure codes a driver, transport or data plane records: one per gRPC status but OK.
GRPC_CODES: dict[errors.ErrorCode, grpc.StatusCode] = {
    _C.CANCELLED: grpc.StatusCode.CANCELLED,
    _C.UNKNOWN: grpc.StatusCode.UNKNOWN,
    _C.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    _C.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    _C.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    _C.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    _C.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    _C.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    _C.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    _C.ABORTED: grpc.StatusCode.ABORTED,
    _C.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    _C.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    _C.INTERNAL: grpc.StatusCode.INTERNAL,
    _C.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    _C.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
    _C.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
}
_ERROR_CODES = {status: code for code, status in GRPC_CODES.items()}
_ERROR_CODE_VALUES = {status.value[0]: code for status, code in _ERROR_CODES.items()}


def grpc_code(code: errors.ErrorCode) -> grpc.StatusCode:
    return GRPC_CODES[code]


def error_code(status: grpc.StatusCode | int) -> errors.ErrorCode:
    """The code of a failed call (a ``grpc.StatusCode``, or its number as the data plane sends
    it). OK or a number no gRPC status has is not a failure code: UNKNOWN."""
    if isinstance(status, grpc.StatusCode):
        return _ERROR_CODES.get(status, errors.ErrorCode.UNKNOWN)
    return _ERROR_CODE_VALUES.get(status, errors.ErrorCode.UNKNOWN)


# A status message travels in the grpc-message header, percent-encoded (a byte outside
# printable ASCII takes three): past gRPC's 8 KiB soft limit on headers a client reads
# RESOURCE_EXHAUSTED "Stream removed" instead of the status (a kvstore Commit naming every
# unwritten block of 400 did: probe, session 43). Cut to this many bytes, as sent.
MAX_STATUS_MESSAGE_BYTES = 2048


def clip_message(message: str) -> str:
    """``message`` cut to ``MAX_STATUS_MESSAGE_BYTES`` of UTF-8, saying how much was cut."""
    data = message.encode()
    if len(data) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    kept = data[: MAX_STATUS_MESSAGE_BYTES - 40].decode(errors="ignore")
    return f"{kept}... ({len(data) - len(kept.encode())} more bytes cut)"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and the message a caller may see for ``exc`` (``clip_message``)."""
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code, clip_message(str(exc) or cls.__name__)
    ref = uuid.uuid4().hex[:12]
    log.error("internal error ref=%s", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref} in the server log)"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with ``exc``'s status, unless it has ended already: a client that
    cancelled (or whose deadline passed) is gone, and its handler's work failing after that
    (a released reservation, an abort of its own that could no longer be sent) is the
    cancellation's echo, not an error; aborting a finished call would raise."""
    if context.done():
        log.debug("call ended before its handler failed: %s: %s", type(exc).__name__, exc)
        return
    if context.time_remaining() == 0:
        # Past its deadline gRPC ends the call (DEADLINE_EXCEEDED) if it has not already: a
        # status sent now may find it ended, which gRPC logs as an error with a traceback
        # (session 46's soak probe). A cancellation is what gRPC expects of such a handler.
        log.debug("call past its deadline when its handler failed: %s: %s", type(exc).__name__, exc)
        raise asyncio.CancelledError(f"past its deadline: {type(exc).__name__}: {exc}")
    code, message = status_for(exc)
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception as failed:  # noqa: BLE001 - the status could not be sent
        if not context.done():  # the abort never reached sending: not an ended call
            raise
        # The call ended (its deadline, a cancel) while the status was on its way; gRPC ends
        # the handler quietly once it returns (its abort is recorded).
        log.debug("call ended as its handler's status was sent: %r (%s)", failed, exc)


def decode_request(message_type: type[_M], data: bytes) -> _M:
    """A request message a handler parses itself (a data-plane header): bytes that do not
    decode are ``MalformedMessageError``, as on gRPC."""
    try:
        return message_type.FromString(data)
    except Exception:  # DecodeError, or anything else a parser raises on hostile bytes
        name = message_type.DESCRIPTOR.full_name
        raise errors.MalformedMessageError(f"{len(data)} bytes do not decode as {name}") from None


def _passes_through(exc: BaseException) -> bool:
    # The servicer (or a wrapper further in) already chose a status and aborted.
    return isinstance(exc, grpc.aio.AbortError)


@dataclass(frozen=True)
class _Undecodable:
    """What the deserializer returns for bytes that are not a request message."""

    num_bytes: int


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:  # a raw-bytes method: nothing to decode
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or anything else a parser raises on hostile bytes
            return _Undecodable(len(data))

    return deserialize


def _decoded(request: Any, method: str) -> Any:
    if isinstance(request, _Undecodable):
        raise errors.MalformedMessageError(
            f"{request.num_bytes} bytes do not decode as the request message of {method}"
        )
    return request


def _as_is(request: Any) -> Any:
    return request


async def _decoded_stream(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request, method)


def _wrap_unary_response(
    behavior: Callable[..., Awaitable[Any]], unpack: Callable[[Any], Any]
) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(unpack(request), context)
        except Exception as exc:
            if _passes_through(exc):
                raise
            await abort_with(context, exc)

    return handler


def _wrap_stream_response(
    behavior: Callable[..., AsyncIterator[Any]], unpack: Callable[[Any], Any]
) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(unpack(request), context):
                yield response
        except Exception as exc:
            if _passes_through(exc):
                raise
            await abort_with(context, exc)

    return handler


def translate_errors(
    behavior: Callable[..., Any], method: str = "", request_streaming: bool | None = None
) -> Callable[..., Any]:
    """Wraps one aio handler (coroutine or async generator) so domain errors become statuses.
    With ``request_streaming`` set, a request the deserializer could not decode (``_tolerant``)
    becomes ``MalformedMessageError`` too: at once for a unary request, when the handler reads
    it for a streamed one (so messages before it are handled as usual)."""
    unpack: Callable[[Any], Any] = _as_is
    if request_streaming is not None:
        unpack = functools.partial(
            _decoded_stream if request_streaming else _decoded, method=method
        )
    if inspect.isasyncgenfunction(behavior):
        return _wrap_stream_response(behavior, unpack)
    return _wrap_unary_response(behavior, unpack)


def _headers_first(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """A response stream's handler that sends the stream's headers (empty initial metadata)
    before anything else; an async generator or a coroutine that writes (``context.write``,
    as grpc's health service does).

    Until a stream's headers arrive, a grpc.aio client has a batch in flight that fails if the
    call ends first (its caller cancels, its deadline passes), and grpc.aio never frees a
    failed batch (grpc/grpc#43360): ~80 B a call in the client (``services/rpc/aio_calls.py``).
    gRPC sends headers with the first message, which may be seconds away (a prefill, a queue).
    """

    async def headers(context: grpc.aio.ServicerContext) -> None:
        # (failing: the call has ended already, which the handler finds out itself)
        with contextlib.suppress(Exception):
            await context.send_initial_metadata(())

    return preceded(behavior, headers)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Applies ``translate_errors`` to every method of every service on a server, and decodes
    their requests tolerantly (module docstring). A response stream sends its headers at once
    (``_headers_first``)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        streaming = handler.request_streaming
        attr, make = HANDLER_KINDS[(streaming, handler.response_streaming)]
        behavior = getattr(handler, attr)
        if handler.response_streaming:
            behavior = _headers_first(behavior)
        return make(
            translate_errors(behavior, handler_call_details.method, streaming),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
