"""``KVLayout``: what one exported layer of one sequence's KV is, checked before a byte is used.

Pure (no torch): the engine exports and imports by it, every KV carrier (the prefill→decode
handoff, the kvstore, layer and attention migration) sends it with the bytes, and
``services/common/kv_wire.py`` turns bytes into tensors by it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.hashing import BlockHash


@dataclass(frozen=True)
class KVLayout:
    """Describes one exported layer of one sequence's KV: blocks ``[first_block, ...)``.

    ``block_hashes`` names the full blocks of that range by content (the wire identity of a
    block); ``num_tokens`` is where the range ends (tokens ``[0, num_tokens)`` of the sequence
    exist once it is written), so a trailing partial block (which has no hash) is carried too.
    """

    fingerprint: str
    layer: int
    num_tokens: int
    block_hashes: tuple[BlockHash, ...]
    dtype: str
    block_size: int
    num_kv_heads: int
    head_dim: int
    first_block: int = 0

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block_size) - self.first_block

    @property
    def first_token(self) -> int:
        return self.first_block * self.block_size

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block of K (or of V) in one layer: ``[block_size, kv_heads, head_dim]``."""
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def shape(self) -> tuple[int, ...]:
        """The engine's tensor for the layer: ``[2, num_blocks, block_size, kv_heads, head_dim]``
        (K then V); its bytes on the wire are block-major (kv_wire.py)."""
        return (2, self.num_blocks, *self.block_shape)
