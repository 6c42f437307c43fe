"""The data plane's contract: move ``(header, payload)`` messages between two processes.

A message is a small ``header`` (bytes; callers put a protobuf in it) and a ``payload`` that may
be 64 MiB or more (anything with the buffer protocol: bytes, bytearray, memoryview, a C-contiguous
numpy array). Every exchange is RPC-shaped: one request message in, one response message out.

Who calls what, and when:

  server side (the process that owns the bytes, e.g. a kvstore or a decode worker)
    1. ``serve(kind, handler, host, port)`` builds a ``DataServer`` (nothing bound yet);
    2. ``await server.start()`` binds and starts accepting; ``server.address`` is then
       "HOST:PORT", which the owner advertises over its gRPC control plane;
    3. for every request, ``await handler(header, payload)`` runs on the server's event loop and
       returns ``(header, payload)``; handlers of concurrent requests run concurrently. A handler
       exception is answered as an error (status code and message chosen by the project's one
       table, ``services.rpc.status.status_for``); the connection and server stay up;
    4. ``await server.stop(grace_s)`` stops accepting connections, answers new requests with
       UNAVAILABLE, gives handlers already running ``grace_s`` to finish, cancels the rest and
       closes every connection. Bounded.

  client side (the process that wants the bytes moved)
    1. ``client = await connect(kind, address, timeout_s)``: one connection per peer, kept;
    2. ``await client.request(header, payload, timeout_s)`` from any task of the client's event
       loop, concurrently if wanted: requests are multiplexed on the connection by request id, so
       a slow handler or a timed-out request never blocks or desynchronises the others (with a
       lock instead, 32 x 1 MiB requests to a handler doing 2 ms of work took 101 ms on tcp and
       204 ms on ucx, one at a time; multiplexed, 56 ms on both);
    3. ``await client.close()``: pending requests fail with UNAVAILABLE. Bounded.

Failures are ``DataPlaneError`` with ``kind``: UNAVAILABLE (refused, peer gone, closed), TIMEOUT
(the caller's deadline passed) or REMOTE (the handler raised; ``code`` is its ``ErrorCode``).
Every wait is bounded; once its connection is lost, a client stays closed (connect again).

Payloads received are writable (a ``bytearray`` or a ``memoryview`` of one), so a receiver can
hand them to numpy/torch without copying.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import struct
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import numpy as np

from services.common.errors import ErrorCode
from services.rpc.status import error_code, status_for

log = logging.getLogger(__name__)

# Anything exposing the (C-contiguous) buffer protocol; typed loosely because Python 3.11 has no
# ``collections.abc.Buffer``.
Payload: TypeAlias = Any
Handler: TypeAlias = Callable[[bytes, memoryview], Awaitable[tuple[bytes, Payload]]]

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_GRACE_S = 1.0
# Headers are small protobufs; a frame announcing more is garbage, not a message.
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 40


class ErrorKind(enum.Enum):
    UNAVAILABLE = "unavailable"  # refused, peer gone, connection or client closed
    TIMEOUT = "timeout"  # the caller's deadline passed first
    REMOTE = "remote"  # the peer's handler raised; ``code`` says what kind of error


class DataPlaneError(Exception):
    """Every failure of a data-plane call. ``code``: the status the peer answered (REMOTE only)."""

    def __init__(self, kind: ErrorKind, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(f"{kind.value}: {code + ': ' if code else ''}{message}")
        self.kind = kind
        self.message = message
        self.code = code


def unavailable(message: str) -> DataPlaneError:
    return DataPlaneError(ErrorKind.UNAVAILABLE, message)


def timed_out(message: str) -> DataPlaneError:
    return DataPlaneError(ErrorKind.TIMEOUT, message)


def checked_header(header: bytes | bytearray | memoryview) -> bytes:
    header = bytes(header)
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    return header


def as_bytes_view(payload: Payload) -> memoryview:
    """A flat byte view of ``payload`` without copying (a numpy array's ``data`` included)."""
    view = memoryview(payload)
    if view.ndim == 1 and view.format in ("B", "b", "c"):
        return view
    if not view.c_contiguous:
        raise ValueError("payload must be C-contiguous to be sent without a copy")
    return view.cast("B")


def receive_buffer(num_bytes: int) -> memoryview:
    """A writable buffer for a payload about to be received into it, not zero-filled first:
    ``bytearray(n)`` zeroes every page and, for tens of MB, faults them all in again each
    time (32 MiB: ~20 ms against ~4 ms to allocate and fill, measured 2026-12-03) — a KV
    hand-off or store write-back receives that much per prompt."""
    return memoryview(np.empty(num_bytes, dtype=np.uint8))


def split_address(address: str) -> tuple[str, int]:
    """ "HOST:PORT" (or "[V6]:PORT") -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- the frame the byte-stream planes (tcp, ucx) share -----------------------------------


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    ERROR = 3  # header: the UTF-8 message; ``status``: the gRPC status code
    # Server to client, after the last response: close once those responses have arrived (ucx;
    # a UCX endpoint aborted by the server would drop replies still in flight).
    GOAWAY = 4
    # Client to server and back (tcp): is the connection still carrying bytes? Answered by the
    # server's reader at once, never by the handler (tcp.py, "Keepalive").
    PING = 5
    PONG = 6


@dataclass(frozen=True)
class Frame:
    """Fixed-size prefix of every message: what follows and which request it belongs to."""

    FORMAT = struct.Struct("<QBBIQ")  # request_id, type, status, header_len, payload_len
    SIZE = FORMAT.size

    request_id: int
    type: FrameType
    header_len: int
    payload_len: int
    status: int = 0

    def pack(self) -> bytes:
        return self.FORMAT.pack(
            self.request_id, self.type, self.status, self.header_len, self.payload_len
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Frame:
        rid, type_, status, header_len, payload_len = cls.FORMAT.unpack_from(data)
        if type_ not in FrameType._value2member_map_:
            raise ValueError(f"unknown frame type {type_}")
        if header_len > MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
            raise ValueError(f"frame announces {header_len} + {payload_len} bytes")
        return cls(rid, FrameType(type_), header_len, payload_len, status)


def error_of(frame: Frame, header: bytes) -> DataPlaneError:
    message = header.decode("utf-8", errors="replace")
    code = error_code(frame.status)
    kind = ErrorKind.UNAVAILABLE if code is ErrorCode.UNAVAILABLE else ErrorKind.REMOTE
    return DataPlaneError(kind, message, code)


def _error_reply(rid: int, code: grpc.StatusCode, message: str) -> tuple[Frame, bytes, memoryview]:
    header = message.encode()
    return Frame(rid, FrameType.ERROR, len(header), 0, code.value[0]), header, memoryview(b"")


async def answer(
    handler: Handler, rid: int, header: bytes, payload: bytearray | memoryview, stopping: bool
) -> tuple[Frame, bytes, memoryview]:
    """The response to one request: the handler's answer, or the error it raised (its status
    code and message from the project's one table), or UNAVAILABLE once the server stops."""
    if stopping:
        return _error_reply(rid, grpc.StatusCode.UNAVAILABLE, "server is stopping")
    try:
        out_header, out_payload = await handler(header, memoryview(payload))
        view, out_header = as_bytes_view(out_payload), bytes(out_header)
    except Exception as exc:
        return _error_reply(rid, *status_for(exc))
    return Frame(rid, FrameType.RESPONSE, len(out_header), view.nbytes), out_header, view


# ---- plumbing the tcp and ucx planes share -----------------------------------------------


class PendingRequests:
    """A client's requests awaiting their response, by request id.

    Once ``fail_all`` has run (connection lost or client closed) every later ``open`` raises the
    same error: a broken connection is never reused."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self.error: DataPlaneError | None = None

    def open(self) -> tuple[int, asyncio.Future[Any]]:
        if self.error is not None:
            raise self.error
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._futures[rid] = future
        return rid, future

    def discard(self, rid: int, future: asyncio.Future[Any]) -> None:
        """Forgets a request whose caller has stopped waiting (answered, failed, timed out)."""
        self._futures.pop(rid, None)
        if future.done() and not future.cancelled():
            future.exception()  # failed by ``fail_all`` while the caller failed otherwise

    def is_open(self, rid: int) -> bool:
        return rid in self._futures

    @property
    def num_open(self) -> int:
        """Requests awaiting their response."""
        return len(self._futures)

    def resolve(self, rid: int, result: Any = None, error: BaseException | None = None) -> None:
        future = self._futures.pop(rid, None)
        if future is None or future.done():
            return  # timed out meanwhile: the response is dropped
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    async def call(
        self,
        send: Callable[[Frame, bytes, memoryview], Awaitable[None]],
        header: bytes,
        payload: Payload,
        timeout_s: float,
        lost: tuple[type[BaseException], ...],
        address: str,
    ) -> tuple[bytes, bytearray]:
        """One request on a multiplexed connection: ``send`` its frame, then wait (bounded) for
        the response the connection's reader hands to ``resolve``. The transport's own errors
        (``lost``) mean the connection is gone: UNAVAILABLE."""
        view, header = as_bytes_view(payload), checked_header(header)
        rid, future = self.open()
        frame = Frame(rid, FrameType.REQUEST, len(header), view.nbytes)

        async def exchange() -> tuple[bytes, bytearray]:
            await send(frame, header, view)
            return await future

        try:
            return await bounded(exchange(), timeout_s, "request")
        except lost as exc:
            raise unavailable(f"connection to {address} lost: {exc!r}") from exc
        finally:
            self.discard(rid, future)

    def refuse_new(self, error: DataPlaneError) -> None:
        """Later ``open`` calls raise ``error``; requests already open still get answers."""
        if self.error is None:
            self.error = error

    def fail_all(self, error: DataPlaneError) -> None:
        if self.error is None:
            self.error = error
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(error)


class Tasks:
    """Background tasks owned by one connection or server; strong refs until they end.

    A task's own failure is logged (debug) and dropped: each task handles the errors its work
    expects, and a caller that awaits a task (``shield``) sees the error there."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("data plane task %s ended: %r", task.get_name(), task.exception())

    async def wait(self, timeout_s: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def cancel(self, timeout_s: float = 1.0) -> None:
        """Cancels every task and waits (at most ``timeout_s``) for them to unwind."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)


async def shielded(task: asyncio.Task[Any]) -> Any:
    """Awaits one of our background tasks (a whole-message write) without cancelling it if the
    caller gives up. The task cancelled by its owner (the connection closing) is a lost
    connection, ``ConnectionAbortedError``, not a cancellation of the caller."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if task.cancelled() and not (current and current.cancelling()):
            raise ConnectionAbortedError("connection closed") from None
        raise


async def bounded(awaitable: Awaitable[Any], timeout_s: float, what: str) -> Any:
    """``await`` with a deadline; running out is a TIMEOUT ``DataPlaneError``."""
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            return await awaitable
    except TimeoutError:
        if not deadline.expired():
            raise  # a timeout from below (a socket's), not the caller's deadline
        raise timed_out(f"{what}: no answer within {timeout_s:g}s") from None


# ---- the interfaces ---------------------------------------------------------------------


class DataServer(ABC):
    """Accepts connections and answers each request with ``handler`` (see module docstring)."""

    @property
    @abstractmethod
    def address(self) -> str:
        """ "HOST:PORT" to give to ``connect``; valid once ``start`` has returned."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Stops accepting, lets handlers in flight run ``grace_s`` more, closes connections."""


class DataClient(ABC):
    """One connection to one ``DataServer``; safe for concurrent requests from one event loop."""

    @abstractmethod
    async def request(
        self, header: bytes, payload: Payload = b"", timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> tuple[bytes, memoryview | bytearray]:
        """Sends one message, returns the response's ``(header, payload)``."""

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> DataClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
