"""Calls the prefill worker makes: KV to decode workers (``DecodeService.TransferKV``).

``GrpcKVTransport`` is the first ``KVTransport`` (services/prefill/transport.py): one
client-streaming call per request — a ``header`` with the layout, ``layer`` chunks, one ``end``
with the first token (protos/banaserve/v1/decode.proto). Messages are built on the engine's
stepping thread inside the layer hook and written by a task on the event loop, so layer ``l``
is on the wire while layer ``l + 1`` computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import grpc
import torch

from services.common import kv_wire
from services.common.config import RpcConfig
from services.common.kv_layout import KVLayout
from services.prefill.transport import KVSender, KVTarget, KVTransport, TransferError, TransferStats
from services.rpc.channels import open_channel
from services.rpc.convert import layout_to_proto
from services.rpc.gen.banaserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from services.rpc.status import error_code
from services.rpc.tracing import DISABLED, Tracing

# A layer is split so that no message comes near the channel's size limit.
DEFAULT_MAX_CHUNK_BYTES = 16 << 20


def layer_chunks(
    data: torch.Tensor, layer: int, max_chunk_bytes: int, first_block: int = 0
) -> list[common_pb2.KVLayerChunk]:
    """``data`` ``[2, blocks, ...]``, the sequence's blocks from ``first_block`` on, as chunks
    of whole blocks in the KV wire layout (services/common/kv_wire.py), each naming its blocks'
    positions in the sequence."""
    num_blocks = data.shape[1]
    block_bytes = max(1, data.nbytes // max(1, num_blocks))
    step = max(1, max_chunk_bytes // block_bytes)
    return [
        common_pb2.KVLayerChunk(
            layer=layer,
            first_block=first_block + first,
            num_blocks=min(step, num_blocks - first),
            data=kv_wire.encode(data, first, step).tobytes(),
        )
        for first in range(0, num_blocks, step)
    ]


class GrpcKVSender(KVSender):
    def __init__(
        self,
        call: grpc.aio.StreamUnaryCall,
        target: KVTarget,
        request_id: str,
        num_layers: int,
        max_chunk_bytes: int,
        clock: Callable[[], float],
    ) -> None:
        self._call = call
        self._target = target
        self._request_id = request_id
        self._num_layers = num_layers
        self._max_chunk_bytes = max_chunk_bytes
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[decode_pb2.TransferKVRequest | None] = asyncio.Queue()
        self._num_layers_queued = 0  # only the stepping thread writes it
        self._num_bytes = 0
        self._first_sent_at: float | None = None
        self._failed: TransferError | None = None
        # Names the reservation as the call opens (decode.proto): the prompt computes meanwhile.
        opened = decode_pb2.KVTransferOpen(
            request_id=request_id, reservation_id=target.reservation_id
        )
        self._queue.put_nowait(decode_pb2.TransferKVRequest(open=opened))
        self._drain = asyncio.create_task(self._run())

    @property
    def failed(self) -> TransferError | None:
        return self._failed

    def send_layer(self, data: torch.Tensor, layout: KVLayout) -> None:
        messages = []
        if self._num_layers_queued == 0:
            header = decode_pb2.KVTransferHeader(
                request_id=self._request_id,
                reservation_id=self._target.reservation_id,
                layout=layout_to_proto(layout, self._num_layers),
            )
            messages.append(decode_pb2.TransferKVRequest(header=header))
        chunks = layer_chunks(data, layout.layer, self._max_chunk_bytes, layout.first_block)
        messages += [decode_pb2.TransferKVRequest(layer=c) for c in chunks]
        self._num_layers_queued += 1
        for message in messages:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, message)

    async def _run(self) -> decode_pb2.TransferKVResponse | None:
        try:
            await self._write_all()
            return await self._call
        except grpc.aio.AioRpcError as exc:
            where = self._target.worker_id or self._target.address
            details = exc.details() or exc.code().name
            code = error_code(exc.code())
            self._failed = TransferError(code, f"KV transfer to {where}: {details}")
            return None

    async def _write_all(self) -> None:
        try:
            while (message := await self._queue.get()) is not None:
                if self._first_sent_at is None and not message.HasField("open"):
                    self._first_sent_at = self._clock()
                await self._call.write(message)
                self._num_bytes += len(message.layer.data)
            await self._call.done_writing()
        except asyncio.InvalidStateError:
            pass  # the call already ended; awaiting it raises its status

    async def finish(self, first_token_id: int, compute_done_at: float) -> TransferStats:
        if self._failed is None and self._num_layers_queued != self._num_layers:
            raise RuntimeError(f"{self._num_layers_queued} of {self._num_layers} layers were sent")
        end = decode_pb2.KVTransferEnd(first_token_id=first_token_id)
        self._queue.put_nowait(decode_pb2.TransferKVRequest(end=end))
        self._queue.put_nowait(None)
        await self._drain
        if self._failed is not None:
            raise self._failed
        return TransferStats.measured(
            self._num_layers, self._num_bytes, self._first_sent_at, compute_done_at, self._clock()
        )

    async def abort(self) -> None:
        self._call.cancel()
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain


class GrpcKVTransport(KVTransport):
    """One channel per decode worker, shared by every transfer to it."""

    def __init__(
        self,
        rpc: RpcConfig,
        tracing: Tracing = DISABLED,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rpc = rpc
        self._tracing = tracing
        self._max_chunk_bytes = max_chunk_bytes
        self._clock = clock
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def open(
        self, target: KVTarget, request_id: str, num_layers: int, timeout_s: float | None
    ) -> KVSender:
        channel = self._channels.get(target.address)
        if channel is None:
            channel = open_channel(target.address, self._rpc, self._tracing)
            self._channels[target.address] = channel
        call = decode_pb2_grpc.DecodeServiceStub(channel).TransferKV(timeout=timeout_s)
        return GrpcKVSender(
            call, target, request_id, num_layers, self._max_chunk_bytes, self._clock
        )

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
