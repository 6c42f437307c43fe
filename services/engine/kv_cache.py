"""Paged KV pools and per-layer KV export/import (DESIGN.md §3, hook 3).

A ``KVCache`` is the pool of one layer range: for every layer it holds, K and V are
``[num_blocks, block_size, num_kv_heads, head_dim]`` tensors, and one block id names the same
slot in every one of them (a sequence has one block table for all the layers). An engine's own
pool covers the layers it holds; a range hosted for another engine gets a pool of its own.

Layers can leave and return (layer migration under a memory budget), and the block count can
grow and shrink (``resize``). Each layer is its own tensor, so a resize reallocates one layer at
a time: the extra memory it needs at any moment is one layer's, never a second pool.

A layer's KV for a list of blocks leaves the cache as one tensor
``[2, num_blocks, block_size, kv_heads, head_dim]`` (K then V; a view of block-major memory,
the wire's layout: services/common/kv_wire.py) plus a ``KVLayout`` that says
exactly what it is, so a receiver can check it before writing and KV can stream out one layer
at a time. A layout may start at a later block (``first_block``), so a delta written after a
copy can follow it.

A token range of several sequences in several layers leaves as one tensor too
(``gather_tokens``: ``[num_layers, 2, num_slots, kv_heads, head_dim]``, the slots a block id
times the block size plus the offset in the block): a delta of a few tokens a sequence, which a
block-granular layout would carry as whole blocks.
"""

from __future__ import annotations

import torch

from services.common.errors import InvalidRequestError
from services.common.kv_layout import KVLayout
from services.common.kv_wire import DTYPE_NAMES

__all__ = ["DTYPE_NAMES", "KVCache", "KVLayout"]  # the last two re-exported: imported from here


class KVCache:
    def __init__(
        self,
        layers: range,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        zeroed: bool = True,
    ) -> None:
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        self._layer_block_bytes = self.bytes_per_block(1, block_size, num_kv_heads, head_dim, dtype)
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self.add_layers(layers, zeroed)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    @property
    def layers(self) -> range:
        """The layers this pool holds (contiguous)."""
        if not self._k:
            return range(0)
        return range(min(self._k), max(self._k) + 1)

    @property
    def num_layers(self) -> int:
        return len(self._k)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes across the layers held."""
        return self.layer_block_bytes * self.num_layers

    @property
    def layer_block_bytes(self) -> int:
        return self._layer_block_bytes

    @property
    def nbytes(self) -> int:
        return self.block_bytes * self.num_blocks

    def holds(self, layer: int) -> bool:
        return layer in self._k

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self._k:
            raise InvalidRequestError(f"layer {index} is not held here (held: {self.layers})")
        return self._k[index], self._v[index]

    # -- shape changes (engine thread, between steps) ------------------------------------

    def add_layers(self, layers: range, zeroed: bool = True) -> None:
        """Allocate K/V for ``layers``, zero-filled (``zeroed`` false: uninitialised, for a pool
        whose owner zeroes each block before its first use, ``zero_blocks``); the held range
        must stay contiguous."""
        held = self.layers
        if held and layers and not (layers.stop == held.start or layers.start == held.stop):
            raise InvalidRequestError(f"layers {layers} do not extend the held range {held}")
        for index in layers:
            self._k[index] = self._empty(self.num_blocks, zeroed)
            self._v[index] = self._empty(self.num_blocks, zeroed)

    def zero_blocks(self, block_ids: list[int]) -> None:
        """Zero ``block_ids`` in every layer (K and V)."""
        if not block_ids:
            return
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for store in (self._k, self._v):
            for tensor in store.values():
                tensor.index_fill_(0, index, 0)

    def drop_layers(self, layers: range) -> None:
        """Free the K/V of ``layers`` (a range at either end of the held one)."""
        held = self.layers
        if layers and not (layers.stop == held.stop or layers.start == held.start):
            raise InvalidRequestError(f"layers {layers} are not at an end of the held range {held}")
        for index in layers:
            del self._k[index], self._v[index]

    def resize(self, num_blocks: int) -> None:
        """Change the block count, keeping blocks ``[0, min(old, new))``; one layer at a time."""
        keep = min(num_blocks, self.num_blocks)
        for store in (self._k, self._v):
            for index, old in store.items():
                new = self._empty(num_blocks)
                new[:keep].copy_(old[:keep])
                store[index] = new
                del old
        self.num_blocks = num_blocks

    def move_blocks(self, moves: dict[int, int]) -> None:
        """Copy each block ``old`` into ``new`` in every layer (before a shrink drops ``old``)."""
        if not moves:
            return
        src = torch.tensor(list(moves), dtype=torch.long, device=self.device)
        dst = torch.tensor(list(moves.values()), dtype=torch.long, device=self.device)
        for store in (self._k, self._v):
            for tensor in store.values():
                tensor.index_copy_(0, dst, tensor.index_select(0, src))

    def _empty(self, num_blocks: int, zeroed: bool = True) -> torch.Tensor:
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        make = torch.zeros if zeroed else torch.empty
        return make(shape, dtype=self.dtype, device=self.device)

    # -- export / import ---------------------------------------------------------------

    def export_layer(self, layer: int, block_ids: list[int], layout: KVLayout) -> torch.Tensor:
        """A copy of ``layer``'s K and V in ``block_ids``: ``[2, n, block_size, kv_heads, d]``,
        a view of block-major memory, so its wire bytes (kv_wire.py) need no second copy."""
        self._check(layout, layer, len(block_ids))
        k, v = self.layer(layer)
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        blocks = torch.stack([k.index_select(0, index), v.index_select(0, index)], dim=1)
        return blocks.transpose(0, 1)

    def import_layer(self, block_ids: list[int], data: torch.Tensor, layout: KVLayout) -> None:
        """Write an exported layer into ``block_ids`` of this cache after checking its layout."""
        self._check(layout, layout.layer, len(block_ids))
        if tuple(data.shape) != layout.shape or DTYPE_NAMES.get(data.dtype) != layout.dtype:
            raise InvalidRequestError(
                f"KV tensor {tuple(data.shape)} {data.dtype} does not match its layout "
                f"{layout.shape} {layout.dtype}"
            )
        k, v = self.layer(layout.layer)
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        k.index_copy_(0, index, data[0].to(self.device))
        v.index_copy_(0, index, data[1].to(self.device))

    def gather_blocks(self, block_ids: list[int], out: torch.Tensor) -> None:
        """Every layer's K and V of ``block_ids`` into ``out``, ``[layers, n, 2, block_size,
        kv_heads, head_dim]`` (the kvstore wire layout, kv_wire.py), layer 0 first: a store
        write-back's payload, written into a buffer its caller reuses."""
        want = (self.num_layers, len(block_ids), 2, self.block_size, self.num_kv_heads,
                self.head_dim)  # fmt: skip
        if self.layers.start != 0 or tuple(out.shape) != want or out.dtype != self.dtype:
            raise ValueError(f"out {tuple(out.shape)} {out.dtype}: {want} {self.dtype} wanted "
                             f"from layers {self.layers}")  # fmt: skip
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for layer in self.layers:
            for j, tensor in enumerate(self.layer(layer)):
                if out.device == self.device:
                    torch.index_select(tensor, 0, index, out=out[layer, :, j])
                else:  # a host buffer for a device pool: gathered there, then copied over
                    out[layer, :, j].copy_(tensor.index_select(0, index))

    def gather_tokens(self, layers: range, slots: torch.Tensor) -> torch.Tensor:
        """A copy of the K and V at ``slots`` (``block * block_size + offset``) of every layer
        of ``layers``: ``[len(layers), 2, len(slots), kv_heads, head_dim]``, contiguous."""
        out = torch.empty(
            self.tokens_shape(layers, len(slots)), dtype=self.dtype, device=self.device
        )
        for i, layer in enumerate(layers):
            for j, tensor in enumerate(self.layer(layer)):
                torch.index_select(self._slots(tensor), 0, slots, out=out[i, j])
        return out

    def scatter_tokens(self, layers: range, slots: torch.Tensor, data: torch.Tensor) -> None:
        """Write ``gather_tokens``'s tensor for ``layers`` at ``slots`` (checked first)."""
        shape = self.tokens_shape(layers, len(slots))
        if tuple(data.shape) != shape or data.dtype != self.dtype:
            raise InvalidRequestError(
                f"KV tensor {tuple(data.shape)} {data.dtype} != {shape} {self.dtype}"
            )
        for layer in layers:
            self.layer(layer)  # every layer held before any is written
        for i, layer in enumerate(layers):
            for j, tensor in enumerate(self.layer(layer)):
                self._slots(tensor).index_copy_(0, slots, data[i, j].to(self.device))

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """The slots of tokens ``[start, end)`` of a sequence whose block ``i`` is
        ``block_table[i]``."""
        bs = self.block_size
        return [block_table[t // bs] * bs + t % bs for t in range(start, end)]

    def tokens_shape(self, layers: range, num_tokens: int) -> tuple[int, ...]:
        """``gather_tokens``'s tensor for ``num_tokens`` tokens of ``layers``."""
        return (len(layers), 2, num_tokens, self.num_kv_heads, self.head_dim)

    def _slots(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(self.num_blocks * self.block_size, self.num_kv_heads, self.head_dim)

    def _check(self, layout: KVLayout, layer: int, num_blocks: int) -> None:
        expected = (self.dtype_name, self.block_size, self.num_kv_heads, self.head_dim)
        got = (layout.dtype, layout.block_size, layout.num_kv_heads, layout.head_dim)
        if got != expected:
            raise InvalidRequestError(
                f"KV layout (dtype, block, heads, dim) {got} != cache {expected}"
            )
        if not self.holds(layer):
            raise InvalidRequestError(f"layer {layer} is not held here (held: {self.layers})")
        if layout.num_blocks != num_blocks:
            raise InvalidRequestError(f"layout covers {layout.num_blocks} blocks, got {num_blocks}")
