"""The UCX data plane (ucxx's asyncio API): tag-matched messages, shared memory or tcp/lo.

Wire, per request id ``rid`` (either direction):
  1. a control message on the endpoint's own tag: ``Frame`` + header, received into one
     preallocated buffer of ``Frame.SIZE + MAX_HEADER_BYTES`` by the side's single reader task;
  2. unless ``payload_len`` is 0, the payload as one message on tag ``rid`` (ucxx hashes it with
     the endpoint's tag), which the reader receives in a task of its own straight into a fresh
     ``bytearray``: UCX moves the bytes (rendezvous, zero-copy from the sender's buffer where
     the transport allows), concurrent requests interleave freely, and no lock is needed.

Lifecycle: ``ucx_environment()`` puts this project's UCX defaults into the environment before
ucxx is first imported (UCX reads its configuration from the environment when its context is
created, once per process); the first listener or endpoint creates that context, with a progress
thread per event loop. Server and client may share a process (tests) or not (benchmarks).

Bounded teardown: the ucxx listener callback only spawns our own connection task and returns
(ucxx warns about, and waits on, callbacks still running); endpoints are aborted with a bounded
``close_blocking`` period, which cancels every UCX request still posted on them, so the tasks
awaiting those requests end at once, and the peer's pending receives fail within milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from services.rpc.dataplane.base import (
    DEFAULT_GRACE_S,
    DEFAULT_TIMEOUT_S,
    MAX_HEADER_BYTES,
    DataClient,
    DataServer,
    Frame,
    FrameType,
    Handler,
    Payload,
    PendingRequests,
    Tasks,
    answer,
    bounded,
    error_of,
    join_address,
    receive_buffer,
    shielded,
    split_address,
    timed_out,
    unavailable,
)

log = logging.getLogger(__name__)

# Defaults only: a variable the user set wins. UCX_TLS is left alone so that UCX keeps picking
# the best transports a machine has (cuda_ipc, shared memory, ...).
# - UCX_NET_DEVICES=lo: the project serves on loopback only (RpcConfig); left alone UCX may pick
#   any network device (docker bridges, a NIC whose address the peer cannot reach). Devices that
#   are not network devices (shared memory, cuda_ipc) are not affected.
# - UCX_MM_ERROR_HANDLING=y: endpoints made through a listener require peer-failure handling,
#   and without this UCX leaves posix/sysv shared memory out of them (openucx/ucx#8477) and moves
#   everything over tcp/lo. Measured (bench/transport_bench.py, 2 vCPUs, 4 alternating runs):
#   64 MiB in 45 ms instead of 67 ms; a killed peer is still detected within ~10 ms.
# - UCX_WARN_UNUSED_ENV_VARS=n: ucxx itself sets UCX_MEMTYPE_CACHE, which this UCX no longer
#   knows and warns about on every process start.
UCX_ENV_DEFAULTS = {
    "UCX_NET_DEVICES": "lo",
    "UCX_MM_ERROR_HANDLING": "y",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}
# How long a stopping server waits for clients to close after GOAWAY, and a client for the
# payloads still arriving after it.
_GOAWAY_WAIT_S = 1.0
# Nanoseconds ``close_blocking`` may wait for UCX to close an endpoint (ucxx's default is 10 s).
_CLOSE_PERIOD_NS = 200_000_000


def ucx_environment() -> dict[str, str]:
    """Sets ``UCX_ENV_DEFAULTS`` not already in the environment; returns what it set.

    The one place BanaServe touches UCX's configuration: anything that uses UCX calls it (via
    ``ucxx_module``) before ucxx creates its context. A deliberate exception to "only __main__
    reads the environment": UCX has no other channel for process-wide settings."""
    applied = {k: v for k, v in UCX_ENV_DEFAULTS.items() if k not in os.environ}
    os.environ.update(applied)
    return applied


def ucxx_module() -> Any:
    ucx_environment()
    import ucxx  # after the environment is set: ucxx reads part of it at import

    return ucxx


def _ucx_errors() -> tuple[type[BaseException], ...]:
    return (ucxx_module().exceptions.UCXError, ConnectionError, EOFError, ValueError)


# Pacing of waits on UCX requests (see ``_paced``): first poll at once, then back off
# exponentially to at most ``_POLL_MAX_S``. A lower cap (20 or 100 us instead of 1 ms) measured
# no faster for 4 KiB or 1 MiB requests, and costs idle CPU.
_POLL_MIN_S = 5e-6
_POLL_MAX_S = 1e-3


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _paced(call: Callable[..., Coroutine[Any, Any, Any]], *args: Any, **kwargs: Any) -> Any:
    """Runs ``call(*args, **kwargs)``, a ucxx send/recv, polling its request with backoff.

    Without Python futures (ucxx's default, which needs no notifier thread), ucxx awaits a
    request by spinning on ``asyncio.sleep(0)``, so every pending receive (each connection's
    reader always has one) burns a core, and on a small machine starves the transfer itself.
    This drives the coroutine by hand: each bare yield (a ``sleep(0)``) is turned into a sleep
    that doubles up to ``_POLL_MAX_S``, and a yielded future (ucxx with Python futures on) is
    awaited as a task would. The coroutine is created here, so one never started is never
    left un-awaited. Measured on 2 vCPUs, in one process: idle CPU 90% -> 6%, 64 MiB one
    way 250 ms -> 78 ms; cost: up to ~1 ms more latency on a message that follows idle time."""
    delay = 0.0
    coro = call(*args, **kwargs)
    try:
        while True:
            try:
                yielded = coro.send(None)
            except StopIteration as done:
                return done.value
            if yielded is None:
                await asyncio.sleep(delay)
                delay = min(max(2 * delay, _POLL_MIN_S), _POLL_MAX_S)
            else:
                yielded.add_done_callback(_retrieve)  # if we are cancelled meanwhile
                await asyncio.wait({yielded})
                delay = 0.0
    finally:
        coro.close()


class _Connection:
    """One endpoint, either side: message sends, and the tasks that use the endpoint."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint
        self.tasks = Tasks()
        self.control = bytearray(Frame.SIZE + MAX_HEADER_BYTES)  # the reader's buffer

    def _endpoint(self) -> Any:
        # ucxx forgets an aborted endpoint's handle; a call on it would raise AttributeError.
        if self.endpoint.closed:
            raise EOFError("endpoint closed")
        return self.endpoint

    async def _write(self, frame: Frame, header: bytes, payload: memoryview) -> None:
        endpoint = self._endpoint()
        sends = [_paced(endpoint.send, frame.pack() + header)]
        if payload.nbytes:
            sends.append(_paced(endpoint.send, payload, tag=frame.request_id))
        await asyncio.gather(*sends)

    async def send(self, frame: Frame, header: bytes, payload: memoryview) -> None:
        """Sends one message; the caller may stop waiting, the sends still complete."""
        await shielded(self.tasks.spawn(self._write(frame, header, payload)))

    async def read_control(self) -> tuple[Frame, bytes]:
        await _paced(self._endpoint().recv, self.control)
        frame = Frame.unpack(self.control)
        return frame, bytes(self.control[Frame.SIZE : Frame.SIZE + frame.header_len])

    async def read_payload(self, frame: Frame) -> memoryview:
        payload = receive_buffer(frame.payload_len)
        if frame.payload_len:
            await _paced(self._endpoint().recv, payload, tag=frame.request_id)
        return payload

    async def close(self) -> None:
        if not self.endpoint.closed:
            self.endpoint.abort(period=_CLOSE_PERIOD_NS)  # cancels the receives posted on it
        await self.tasks.cancel()


class UcxServer(DataServer):
    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handler = handler
        self._host, self._port = host, port
        self._listener: Any = None
        self._stopping = False
        self._tasks = Tasks()  # one per connection
        self._connections: set[_Connection] = set()

    @property
    def address(self) -> str:
        # ucxx's listener binds every interface (its API takes no address); peers are told the
        # loopback one.
        return join_address(self._host, self._port)

    async def start(self) -> None:
        self._listener = ucxx_module().create_listener(self._on_connect, port=self._port)
        self._port = self._listener.port
        log.info("ucx data plane on %s", self.address)

    async def stop(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        if self._listener is None:
            return
        self._stopping = True  # connections and requests from now on are refused
        handlers = Tasks()
        for conn in self._connections:
            handlers.spawn(conn.tasks.wait(grace_s))
        await handlers.wait(grace_s + 0.1)
        # Aborting an endpoint drops what UCX has not delivered yet (replies just sent): ask
        # each client to close once its responses are in, and wait (bounded) for that.
        goaway = Frame(0, FrameType.GOAWAY, 0, 0)
        for conn in self._connections:
            conn.tasks.spawn(conn.send(goaway, b"", memoryview(b"")))
        await self._tasks.wait(_GOAWAY_WAIT_S)
        for conn in list(self._connections):
            await conn.close()
        await self._tasks.cancel()
        self._listener.close()
        self._listener = None

    async def _on_connect(self, endpoint: Any) -> None:
        if self._stopping:
            endpoint.abort(period=_CLOSE_PERIOD_NS)
            return
        self._tasks.spawn(self._serve(_Connection(endpoint)))

    async def _serve(self, conn: _Connection) -> None:
        self._connections.add(conn)
        try:
            while True:
                frame, header = await conn.read_control()
                if frame.type is not FrameType.REQUEST:
                    raise ValueError(f"expected a request, got {frame.type.name}")
                conn.tasks.spawn(self._answer(conn, frame, header))
        except _ucx_errors() as exc:
            log.debug("ucx data plane connection ended: %r", exc)
        finally:
            self._connections.discard(conn)
            await conn.close()

    async def _answer(self, conn: _Connection, frame: Frame, header: bytes) -> None:
        rid = frame.request_id
        try:
            # Refused unread while stopping: the endpoint's abort drops the payload.
            payload = memoryview(b"") if self._stopping else await conn.read_payload(frame)
            await conn.send(*await answer(self._handler, rid, header, payload, self._stopping))
        except _ucx_errors() as exc:
            log.debug("ucx data plane: request %d lost: %r", rid, exc)


class UcxClient(DataClient):
    def __init__(self, endpoint: Any, address: str) -> None:
        self._conn = _Connection(endpoint)
        self._address = address
        self._pending = PendingRequests()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, address: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> UcxClient:
        host, port = split_address(address)
        await _probe(host, port, timeout_s)
        ucxx = ucxx_module()
        try:
            endpoint = await bounded(
                ucxx.create_endpoint(host, port, connect_timeout=timeout_s),
                timeout_s + 0.5,
                f"connect {address}",
            )
        except TimeoutError:  # ucxx's own exchange of endpoint tags ran out of time
            raise timed_out(f"connect {address}: no UCX handshake within {timeout_s:g}s") from None
        except ucxx.exceptions.UCXError as exc:
            raise unavailable(f"cannot connect to {address}: {exc}") from exc
        return cls(endpoint, address)

    async def request(
        self, header: bytes, payload: Payload = b"", timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> tuple[bytes, bytearray]:
        return await self._pending.call(
            self._conn.send, header, payload, timeout_s, _ucx_errors(), self._address
        )

    async def close(self) -> None:
        self._pending.fail_all(unavailable(f"client to {self._address} closed"))
        await self._conn.close()  # ends the reader: its receive is cancelled
        self._reader.cancel()
        await asyncio.wait({self._reader}, timeout=1.0)

    async def _read(self) -> None:
        try:
            while True:
                frame, header = await self._conn.read_control()
                if frame.type is FrameType.GOAWAY:
                    break
                if frame.type is FrameType.ERROR:
                    self._pending.resolve(frame.request_id, error=error_of(frame, header))
                else:
                    self._conn.tasks.spawn(self._receive(frame, header))
        except _ucx_errors() as exc:
            self._pending.fail_all(unavailable(f"connection to {self._address} lost: {exc!r}"))
            return
        await self._go_away()

    async def _go_away(self) -> None:
        """The server is stopping: let the payloads in flight arrive, then close."""
        stopping = unavailable(f"{self._address}: server is stopping")
        self._pending.refuse_new(stopping)
        await self._conn.tasks.wait(_GOAWAY_WAIT_S)
        self._pending.fail_all(stopping)
        await self._conn.close()

    async def _receive(self, frame: Frame, header: bytes) -> None:
        # Received even when the request timed out meanwhile: UCX would otherwise keep the
        # unexpected payload buffered for ever.
        try:
            payload = await self._conn.read_payload(frame)
        except _ucx_errors() as exc:
            self._pending.fail_all(unavailable(f"connection to {self._address} lost: {exc!r}"))
            return
        self._pending.resolve(frame.request_id, (header, payload))


async def _probe(host: str, port: int, timeout_s: float) -> None:
    """Fails fast on a closed port. ucxx reports a refused connection only when its handshake
    times out (``connect_timeout`` later), so a plain TCP connect to the listener's port, which
    UCX's listener ignores, answers first."""
    try:
        _, writer = await bounded(asyncio.open_connection(host, port), timeout_s, "connect")
    except OSError as exc:
        raise unavailable(f"cannot connect to {join_address(host, port)}: {exc}") from exc
    writer.close()
    await asyncio.wait({asyncio.ensure_future(writer.wait_closed())}, timeout=1.0)
