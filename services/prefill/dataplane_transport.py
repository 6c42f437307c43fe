"""KV to decode workers over their data plane (services/rpc/dataplane: UCX, TCP or gRPC).

``DataPlaneKVTransport`` is a ``KVTransport`` (transport.py has the contract) that sends a
transfer as data-plane messages, each a ``KVTransferFrame`` header (decode.proto) and, for a
layer chunk, its bytes as the payload. One connection per decode worker's data address, shared
by every transfer to it. Each sender runs one task:

1. connect (or reuse the connection) while the prompt waits and computes;
2. send the header, built from the first layer's layout, and wait for its answer: the receiver
   has checked the reservation and the layout, so a rejected transfer fails before KV moves;
3. send layer chunks as the engine hands them over, at most ``window`` unanswered at once. The
   receiver answers a chunk once it has taken it in, so it never holds more than ``window``
   chunks of a transfer, however large, while the window keeps the wire busy during its copy;
4. once every chunk is answered (the data plane may reorder concurrent messages, and the end
   must come last), send the end with the first token: its answer is the acknowledgement.

``abort`` stops the task and sends an ``abort`` message (best effort: the reservation's lease
frees what a lost one would have). A connection that breaks is dropped from the cache, and the
next transfer to that address connects again.

``TargetKVTransport`` chooses per request: the target's data plane when it names one and the
worker allows it, else the gRPC stream (``GrpcKVTransport``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from services.common import kv_wire
from services.common.errors import ErrorCode, InvalidRequestError
from services.common.kv_layout import KVLayout
from services.prefill.clients import DEFAULT_MAX_CHUNK_BYTES
from services.prefill.transport import KVSender, KVTarget, KVTransport, TransferError, TransferStats
from services.rpc import dataplane
from services.rpc.convert import layout_to_proto
from services.rpc.dataplane import DataClient, DataPlaneError, ErrorKind
from services.rpc.dataplane.base import DEFAULT_TIMEOUT_S, timed_out
from services.rpc.gen.banaserve.v1 import decode_pb2

# Unanswered chunks per transfer: enough to keep the wire busy while the receiver copies one
# chunk in, few enough that the receiver holds little (each chunk up to max_chunk_bytes).
DEFAULT_WINDOW = 4
CONNECT_TIMEOUT_S = 5.0
# The abort message is a courtesy (the lease frees the reservation anyway): never wait long.
ABORT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class _Message:
    frame: bytes  # a serialised KVTransferFrame
    payload: Any = b""  # a chunk's bytes (a numpy view of the exported tensor, no copy)
    num_bytes: int = 0
    last: bool = False  # the end frame


def _frame(reservation_id: str, **frame: Any) -> bytes:
    message = decode_pb2.KVTransferFrame(reservation_id=reservation_id, **frame)
    return message.SerializeToString()


def layer_messages(
    data: torch.Tensor,
    layer: int,
    reservation_id: str,
    max_chunk_bytes: int,
    first_block: int = 0,
) -> list[_Message]:
    """``data`` ``[2, blocks, ...]``, the sequence's blocks from ``first_block`` on, as chunks
    of whole blocks in the KV wire layout (services/common/kv_wire.py): each chunk a view of the
    exported tensor, no copy, naming its blocks' positions in the sequence."""
    num_blocks = data.shape[1]
    step = max(1, max_chunk_bytes // max(1, data.nbytes // max(1, num_blocks)))
    messages = []
    for first in range(0, num_blocks, step):
        payload = kv_wire.encode(data, first, step)
        count = min(step, num_blocks - first)
        ref = decode_pb2.KVTransferLayer(
            layer=layer, first_block=first_block + first, num_blocks=count
        )
        messages.append(_Message(_frame(reservation_id, layer=ref), payload, payload.nbytes))
    return messages


def transfer_error(exc: DataPlaneError, where: str) -> TransferError:
    if exc.kind is ErrorKind.UNAVAILABLE:
        code = ErrorCode.UNAVAILABLE
    elif exc.kind is ErrorKind.TIMEOUT:
        code = ErrorCode.DEADLINE_EXCEEDED
    else:
        code = exc.code or ErrorCode.UNKNOWN
    return TransferError(code, f"KV transfer to {where}: {exc.message}")


class DataPlaneKVSender(KVSender):
    def __init__(
        self,
        transport: DataPlaneKVTransport,
        target: KVTarget,
        request_id: str,
        num_layers: int,
        timeout_s: float | None,
    ) -> None:
        self._transport = transport
        self._target = target
        self._request_id = request_id
        self._num_layers = num_layers
        self._clock = transport.clock
        self._deadline = None if timeout_s is None else self._clock() + timeout_s
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[_Message] = asyncio.Queue()
        self._num_layers_queued = 0  # only the stepping thread writes it
        self._num_bytes = 0
        self._first_sent_at: float | None = None
        self._client: DataClient | None = None  # once the header went out
        self._failed: TransferError | None = None
        self._ended = False  # finished or aborted
        self._task = asyncio.create_task(self._run())

    @property
    def failed(self) -> TransferError | None:
        return self._failed

    def send_layer(self, data: torch.Tensor, layout: KVLayout) -> None:
        reservation_id = self._target.reservation_id
        messages = []
        if self._num_layers_queued == 0:
            header = decode_pb2.KVTransferHeader(
                request_id=self._request_id,
                reservation_id=reservation_id,
                layout=layout_to_proto(layout, self._num_layers),
            )
            messages.append(_Message(_frame(reservation_id, header=header)))
        messages += layer_messages(
            data, layout.layer, reservation_id, self._transport.max_chunk_bytes, layout.first_block
        )
        self._num_layers_queued += 1
        for message in messages:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, message)

    async def _run(self) -> None:
        client = None
        try:
            client = await self._transport.connection(self._target, self._timeout())
            header = await self._queue.get()
            self._first_sent_at = self._clock()
            self._client = client
            await self._request(client, header)
            end = await self._send_layers(client)
            await self._request(client, end)
        except DataPlaneError as exc:
            self._failed = transfer_error(exc, self._target.worker_id or self._target.address)
            if exc.kind is ErrorKind.UNAVAILABLE and client is not None:
                await self._transport.forget(self._target.data_address, client)

    async def _send_layers(self, client: DataClient) -> _Message:
        """Chunks as they come, ``window`` unanswered at most; the end message once every
        chunk is answered."""
        in_flight: set[asyncio.Task[bytes]] = set()
        try:
            while not (message := await self._queue.get()).last:
                while len(in_flight) >= self._transport.window:
                    in_flight = await _reap(in_flight, asyncio.FIRST_COMPLETED)
                in_flight.add(asyncio.create_task(self._request(client, message)))
                self._num_bytes += message.num_bytes
            while in_flight:
                in_flight = await _reap(in_flight, asyncio.FIRST_EXCEPTION)
            return message
        finally:
            for task in in_flight:
                task.cancel()

    async def _request(self, client: DataClient, message: _Message) -> bytes:
        header, _ = await client.request(message.frame, message.payload, self._timeout())
        return header

    def _timeout(self) -> float:
        if self._deadline is None:
            return DEFAULT_TIMEOUT_S
        return max(0.0, self._deadline - self._clock())

    async def finish(self, first_token_id: int, compute_done_at: float) -> TransferStats:
        if self._failed is None and self._num_layers_queued != self._num_layers:
            raise RuntimeError(f"{self._num_layers_queued} of {self._num_layers} layers were sent")
        end = decode_pb2.KVTransferEnd(first_token_id=first_token_id)
        self._queue.put_nowait(_Message(_frame(self._target.reservation_id, end=end), last=True))
        await asyncio.shield(self._task)  # a caller giving up leaves the ending to ``abort``
        if self._failed is not None:
            raise self._failed
        self._ended = True
        return TransferStats.measured(
            self._num_layers, self._num_bytes, self._first_sent_at, compute_done_at, self._clock()
        )

    async def abort(self) -> None:
        if self._ended:
            return  # finished (nothing to free) or aborted already
        self._ended = True
        self._task.cancel()
        await asyncio.wait({self._task})
        if self._client is not None:  # the receiver may have opened the transfer
            abort = _frame(self._target.reservation_id, abort=decode_pb2.KVTransferAbort())
            with contextlib.suppress(DataPlaneError):
                await self._client.request(abort, b"", ABORT_TIMEOUT_S)


async def _reap(tasks: set[asyncio.Task[Any]], when: str) -> set[asyncio.Task[Any]]:
    """Waits as ``asyncio.wait`` does; raises the first error among the finished tasks."""
    done, pending = await asyncio.wait(tasks, return_when=when)
    errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
    if errors:
        raise errors[0]
    return pending


class DataPlaneKVTransport(KVTransport):
    """One data-plane connection per decode worker's data address, shared by its transfers."""

    def __init__(
        self,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        window: int = DEFAULT_WINDOW,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.window = window
        self.clock = clock
        self._connect_timeout_s = connect_timeout_s
        # Connecting or connected, by data address: concurrent transfers share one connect.
        self._connections: dict[str, asyncio.Task[DataClient]] = {}

    async def open(
        self, target: KVTarget, request_id: str, num_layers: int, timeout_s: float | None
    ) -> KVSender:
        if not target.data_address or target.data_transport not in dataplane.KINDS:
            raise InvalidRequestError(f"target {target.worker_id!r} names no data plane")
        return DataPlaneKVSender(self, target, request_id, num_layers, timeout_s)

    async def connection(self, target: KVTarget, timeout_s: float) -> DataClient:
        """The shared connection, waited for at most ``timeout_s``. The connect itself is
        bounded by the transport's own timeout, never by the deadline of the request that
        happened to start it: a request with little time left must not fail the others."""
        task = self._connections.get(target.data_address)
        if task is None or (task.done() and _connected(task) is None):  # retry a failed one
            connect = dataplane.connect(
                target.data_transport, target.data_address, self._connect_timeout_s
            )
            task = asyncio.create_task(connect)
            task.add_done_callback(_retrieve)  # a failure is seen by whoever waits, or no one
            self._connections[target.data_address] = task
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            message = f"connect {target.data_address}: not connected within {timeout_s:.3g}s"
            raise timed_out(message) from None

    async def forget(self, address: str, client: DataClient) -> None:
        """Drops a broken connection (a data-plane client stays closed once it lost one)."""
        task = self._connections.get(address)
        if task is not None and _connected(task) is client:
            del self._connections[address]
        with contextlib.suppress(Exception):
            await client.close()

    async def close(self) -> None:
        tasks, self._connections = list(self._connections.values()), {}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            client = _connected(task)
            if client is not None:
                await client.close()


def _connected(task: asyncio.Task[DataClient]) -> DataClient | None:
    """The client a connect task made, if it has made one."""
    if not task.done() or task.cancelled() or task.exception() is not None:
        return None
    return task.result()


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class TargetKVTransport(KVTransport):
    """Per request: the target's data plane when it names one and ``data`` is set (the worker
    allows it), else ``stream`` (the gRPC TransferKV stream, which every decode worker has)."""

    def __init__(self, stream: KVTransport, data: DataPlaneKVTransport | None) -> None:
        self._stream = stream
        self._data = data

    async def open(
        self, target: KVTarget, request_id: str, num_layers: int, timeout_s: float | None
    ) -> KVSender:
        if self._data is not None and target.data_address and target.data_transport:
            return await self._data.open(target, request_id, num_layers, timeout_s)
        return await self._stream.open(target, request_id, num_layers, timeout_s)

    async def close(self) -> None:
        await self._stream.close()
        if self._data is not None:
            await self._data.close()
