"""A KV transfer's frames as the decode worker sees them, and the assembly of each layer.

A transfer is an optional open frame (the reservation's ids, sent as the call opens, before
the prompt computes), one header, layer chunks in any order of layers (a layer may come in several
chunks of whole blocks, each in the KV wire layout of services/common/kv_wire.py), and one end
frame. ``LayerAssembler`` checks every chunk against the header's layout before it copies a byte
and hands each layer out once all its blocks are in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from services.common import kv_wire
from services.common.errors import InvalidRequestError
from services.common.kv_layout import KVLayout


@dataclass(frozen=True)
class TransferOpen:
    request_id: str
    reservation_id: str


@dataclass(frozen=True)
class TransferHeader:
    request_id: str
    reservation_id: str
    layout: KVLayout  # ``layer`` is unused here: each chunk names its layer
    num_layers: int


@dataclass(frozen=True)
class LayerChunk:
    layer: int
    first_block: int
    num_blocks: int
    # bytes (a gRPC frame) or a writable buffer (a data-plane payload, used without a copy).
    data: bytes | bytearray | memoryview


@dataclass(frozen=True)
class TransferEnd:
    first_token_id: int


TransferFrame = TransferOpen | TransferHeader | LayerChunk | TransferEnd


@dataclass(frozen=True)
class TransferResult:
    num_layers: int
    num_bytes: int


class LayerAssembler:
    """Collects one transfer's chunks; hands out each layer once all its blocks are in."""

    def __init__(self, layout: KVLayout, num_layers: int) -> None:
        self.num_layers = num_layers
        self.num_blocks = layout.num_blocks
        self.layout = layout
        self.num_bytes = 0
        self._partial: dict[int, tuple[torch.Tensor, set[int]]] = {}
        self._complete: set[int] = set()

    def add(self, chunk: LayerChunk) -> torch.Tensor | None:
        self._check(chunk)
        # A chunk names blocks of the sequence; the layer's tensor starts at the layout's first.
        first, n = chunk.first_block - self.layout.first_block, chunk.num_blocks
        data = kv_wire.decode_blocks(chunk.data, self.layout, n)  # a view, no copy
        self.num_bytes += data.nbytes
        if first == 0 and n == self.num_blocks and chunk.layer not in self._partial:
            self._complete.add(chunk.layer)
            return data
        if chunk.layer not in self._partial:
            empty = kv_wire.empty_layer(data.dtype, self.num_blocks, self.layout.block_shape)
            self._partial[chunk.layer] = (empty, set())
        buf, seen = self._partial[chunk.layer]
        blocks = set(range(first, first + n))
        if blocks & seen:
            raise InvalidRequestError(f"layer {chunk.layer}: blocks sent twice")
        buf[:, first : first + n] = data
        seen |= blocks
        if len(seen) < self.num_blocks:
            return None
        del self._partial[chunk.layer]
        self._complete.add(chunk.layer)
        return buf

    def _check(self, chunk: LayerChunk) -> None:
        if not 0 <= chunk.layer < self.num_layers:
            raise InvalidRequestError(f"layer {chunk.layer} outside 0..{self.num_layers - 1}")
        if chunk.layer in self._complete:
            raise InvalidRequestError(f"layer {chunk.layer} sent twice")
        start, end = self.layout.first_block, self.layout.first_block + self.num_blocks
        if chunk.num_blocks <= 0 or not start <= chunk.first_block <= end - chunk.num_blocks:
            raise InvalidRequestError(
                f"layer {chunk.layer}: blocks [{chunk.first_block}, "
                f"{chunk.first_block + chunk.num_blocks}) outside the [{start}, {end}) to transfer"
            )
        expected = chunk.num_blocks * kv_wire.layout_block_nbytes(self.layout)
        num_bytes = memoryview(chunk.data).nbytes
        if num_bytes != expected:
            raise InvalidRequestError(
                f"layer {chunk.layer}: {num_bytes} bytes for {chunk.num_blocks} blocks, "
                f"expected {expected}"
            )

    def check_complete(self) -> None:
        if len(self._complete) != self.num_layers:
            missing = sorted(set(range(self.num_layers)) - self._complete)
            raise InvalidRequestError(f"transfer ended with layers {missing} incomplete")


async def next_unless(
    frames: AsyncIterator[Any], stop: asyncio.Event | None, timeout: float | None
) -> asyncio.Future[Any]:
    """Waits for the sender's next message, at most ``timeout`` and only until ``stop`` is set;
    returns the read: done (the message, None at the stream's end, or its error) or cancelled
    (it did not come). Either way the source is idle again before this returns, so the caller
    may read on or close it."""
    arrived = asyncio.ensure_future(anext(frames, None))
    waits: set[asyncio.Future[Any]] = {arrived}
    if stop is not None:
        waits.add(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
        await asyncio.wait(waits)
    return arrived
