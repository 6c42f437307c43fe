"""A KV transfer's frames as the decode worker sees them, and the assembly of each layer.

A transfer is one header, layer chunks in any order of layers (a layer may come in several
chunks of whole blocks), and one end frame. ``LayerAssembler`` checks every chunk against the
header's layout before it copies a byte and hands each layer out once all its blocks are in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.common.errors import InvalidRequestError
from services.engine.kv_cache import KVLayout
from services.engine.models.loader import DTYPES


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


TransferFrame = TransferHeader | LayerChunk | TransferEnd


@dataclass(frozen=True)
class TransferResult:
    num_layers: int
    num_bytes: int


class LayerAssembler:
    """Collects one transfer's chunks; hands out each layer once all its blocks are in."""

    def __init__(self, layout: KVLayout, num_layers: int) -> None:
        self.num_layers = num_layers
        self.num_blocks = layout.num_blocks
        self.block_shape = (layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.dtype = DTYPES[layout.dtype]
        self.num_bytes = 0
        self._partial: dict[int, tuple[torch.Tensor, set[int]]] = {}
        self._complete: set[int] = set()

    def add(self, chunk: LayerChunk) -> torch.Tensor | None:
        first, n = chunk.first_block, chunk.num_blocks
        self._check(chunk)
        data = torch.frombuffer(_writable(chunk.data), dtype=self.dtype)
        data = data.view(2, n, *self.block_shape)
        self.num_bytes += data.nbytes
        if first == 0 and n == self.num_blocks and chunk.layer not in self._partial:
            self._complete.add(chunk.layer)
            return data
        shape = (2, self.num_blocks, *self.block_shape)
        buf, seen = self._partial.setdefault(
            chunk.layer, (torch.empty(shape, dtype=self.dtype), set())
        )
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
        if chunk.num_blocks <= 0 or chunk.first_block + chunk.num_blocks > self.num_blocks:
            raise InvalidRequestError(
                f"layer {chunk.layer}: blocks [{chunk.first_block}, "
                f"{chunk.first_block + chunk.num_blocks}) outside the {self.num_blocks} reserved"
            )
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        expected = 2 * chunk.num_blocks * math.prod(self.block_shape) * itemsize
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


def _writable(data: bytes | bytearray | memoryview) -> bytearray | memoryview:
    """A buffer torch may view: ``bytes`` are copied (torch warns on read-only memory), a
    writable buffer is used as it is."""
    view = memoryview(data)
    return bytearray(view) if view.readonly else view
