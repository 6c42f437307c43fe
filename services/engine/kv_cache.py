"""The paged KV cache and per-layer KV export/import (DESIGN.md §3, hook 3).

Per layer, K and V are ``[num_blocks, block_size, num_kv_heads, head_dim]``
views into two tensors that hold every layer. A layer's KV for a list of blocks
leaves the cache as one tensor ``[2, num_blocks, block_size, kv_heads, head_dim]``
(K then V) plus a ``KVLayout`` that says exactly what it is, so a receiver can
check it before writing and KV can stream out one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.errors import InvalidRequestError
from services.common.hashing import BlockHash

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class KVLayout:
    """Describes one exported layer of one sequence's KV.

    ``block_hashes`` names the full blocks by content (the wire identity of a
    block); ``num_tokens`` says how many token slots are valid, so a trailing
    partial block (which has no hash) is carried too.
    """

    fingerprint: str
    layer: int
    num_tokens: int
    block_hashes: tuple[BlockHash, ...]
    dtype: str
    block_size: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block_size)

    @property
    def shape(self) -> tuple[int, ...]:
        return (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.k.dtype]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]

    def export_layer(self, layer: int, block_ids: list[int], layout: KVLayout) -> torch.Tensor:
        """A copy of ``layer``'s K and V in ``block_ids``: ``[2, n, block_size, kv_heads, d]``."""
        self._check(layout, layer, len(block_ids))
        index = torch.tensor(block_ids, dtype=torch.long, device=self.k.device)
        return torch.stack(
            [self.k[layer].index_select(0, index), self.v[layer].index_select(0, index)]
        )

    def import_layer(self, block_ids: list[int], data: torch.Tensor, layout: KVLayout) -> None:
        """Write an exported layer into ``block_ids`` of this cache after checking its layout."""
        self._check(layout, layout.layer, len(block_ids))
        if tuple(data.shape) != layout.shape or DTYPE_NAMES.get(data.dtype) != layout.dtype:
            raise InvalidRequestError(
                f"KV tensor {tuple(data.shape)} {data.dtype} does not match its layout "
                f"{layout.shape} {layout.dtype}"
            )
        index = torch.tensor(block_ids, dtype=torch.long, device=self.k.device)
        self.k[layout.layer].index_copy_(0, index, data[0].to(self.k.device))
        self.v[layout.layer].index_copy_(0, index, data[1].to(self.v.device))

    def _check(self, layout: KVLayout, layer: int, num_blocks: int) -> None:
        expected = (self.dtype_name, self.block_size, self.num_kv_heads, self.head_dim)
        got = (layout.dtype, layout.block_size, layout.num_kv_heads, layout.head_dim)
        if got != expected:
            raise InvalidRequestError(
                f"KV layout (dtype, block, heads, dim) {got} != cache {expected}"
            )
        if not 0 <= layer < self.num_layers:
            raise InvalidRequestError(f"layer {layer} outside 0..{self.num_layers - 1}")
        if layout.num_blocks != num_blocks:
            raise InvalidRequestError(f"layout covers {layout.num_blocks} blocks, got {num_blocks}")
