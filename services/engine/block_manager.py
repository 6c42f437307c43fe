"""KV block allocation and the prefix cache.

Invariants:
- a block is in ``_free`` iff its ``ref_count`` is 0; ``_free`` is ordered
  least-recently-freed first, so allocation evicts the coldest cached block;
- ``_cached`` maps a chained block hash to the one block holding that content;
  a block keeps its hash while free (reusable) until it is evicted;
- a hit is accepted only if the block's tokens equal the request's tokens, so a
  hash collision can never serve wrong KV;
- a block gets its hash (and so can be a hit) only in ``commit_full_blocks``,
  once its KV is in place; blocks whose KV is still arriving from elsewhere
  (``admit_with_prefix``) have none, so a failed fetch frees them hashless.

A sequence's blocks are freed tail first: the end of a sequence is the least
likely to be shared, so it is evicted before the prefix it extends.

While some of the engine's layers run elsewhere (a remote stage), blocks it computes hold KV
for its local layers only: ``cache_paused`` then stops both hits and new entries, so the
prefix cache only ever serves blocks whose KV is complete here.

The pool can change size at run time (layers leaving or returning under a memory budget):
``grow`` adds empty blocks, ``plan_shrink``/``shrink`` remove the highest ids after moving the
blocks still in use below the cut (the caller moves their KV and rewrites block tables).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from services.common.hashing import ROOT_HASH, BlockHash, hash_block
from services.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, fingerprint: str, enable_prefix_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.fingerprint = fingerprint
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.cache_paused = False

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    # -- prefix cache --------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks holding the longest prefix of ``seq``'s tokens.

        At least one token is always left to compute, since the step that
        computes it produces the logits for the next token.
        """
        return self.cached_blocks(seq.token_ids)

    def cached_blocks(self, token_ids: list[int]) -> list[int]:
        """``find_cached_prefix`` of bare token ids (a prompt not admitted: how much of it a
        prefill would not compute, were nothing evicted first)."""
        if not self.enable_prefix_caching or self.cache_paused:
            return []
        hits: list[int] = []
        parent = ROOT_HASH
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = token_ids[i * bs : (i + 1) * bs]
            parent = hash_block(parent, tokens, self.fingerprint)
            block_id = self._cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tuple(tokens):
                break
            hits.append(block_id)
        return hits

    def num_cached_hashes(self, hashes: list[BlockHash]) -> int:
        """How many of ``hashes`` (a chain) are cached here, from the first: a cheap read-only
        estimate (no token check) for deciding whether to ask a remote store at all."""
        if not self.enable_prefix_caching or self.cache_paused:
            return 0
        n = 0
        while n < len(hashes) and hashes[n] in self._cached:
            n += 1
        return n

    def cached_block_ids(self, blocks: list[tuple[BlockHash, tuple[int, ...]]]) -> list[int] | None:
        """The ids of the cached blocks holding ``blocks`` (hash, tokens), or None if any one
        is no longer cached here with those tokens (evicted, or the cache is paused)."""
        if not self.enable_prefix_caching or self.cache_paused:
            return None
        ids = []
        for block_hash, tokens in blocks:
            block_id = self._cached.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                return None
            ids.append(block_id)
        return ids

    # -- allocation ------------------------------------------------------------------

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, seq.blocks_needed(seq.num_computed_tokens + num_new_tokens) - seq.num_blocks)

    def can_admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Whether ``seq`` (no blocks yet) fits with ``hits`` reused and the rest fresh."""
        total = seq.blocks_needed(len(hits) * self.block_size + num_new_tokens)
        hits_in_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return total - len(hits) <= self.num_free_blocks - hits_in_free

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give ``seq`` its cached prefix: reference the hit blocks and skip their tokens."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.request_id} already holds blocks")
        for block_id in hits:
            self._ref(block_id)
        seq.block_table = list(hits)
        seq.block_hashes = [self.blocks[b].block_hash for b in hits]  # type: ignore[misc]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size

    def admit_with_prefix(self, seq: Sequence, hits: list[int], num_prefix_tokens: int) -> None:
        """``admit`` plus fresh blocks for the rest of a prefix whose KV is written elsewhere.

        Every prefix token counts as computed, so steps compute only the suffix. The fresh
        blocks stay unhashed until the caller commits them, once their KV has arrived.
        """
        self.admit(seq, hits)
        self.append(seq, num_prefix_tokens - seq.num_computed_tokens)
        seq.num_computed_tokens = seq.num_cached_tokens = num_prefix_tokens

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Allocate the blocks ``seq`` needs to compute ``num_new_tokens`` more tokens."""
        needed = self.num_new_blocks(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"need {needed} blocks, {self.num_free_blocks} free")
        for _ in range(needed):
            seq.block_table.append(self._take_free())

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Hash and cache every block of ``seq`` that is now full and computed."""
        num_full = seq.num_computed_tokens // self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.block_tokens(i))
            parent = hash_block(parent, tokens, self.fingerprint)
            seq.block_hashes.append(parent)
            block = self.blocks[seq.block_id(i)]
            block.block_hash, block.token_ids = parent, tokens
            if self.enable_prefix_caching and not self.cache_paused:
                self._cached.setdefault(parent, block.block_id)

    def free(self, seq: Sequence) -> None:
        self.release(list(reversed(seq.block_table)))
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_remote_blocks = 0

    # -- blocks held outside any sequence (hosted for another engine, a recall) ---------

    def allocate(self, num_blocks: int) -> list[int]:
        """``num_blocks`` fresh blocks, each with one reference, owned by the caller."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"need {num_blocks} blocks, {self.num_free_blocks} free")
        return [self._take_free() for _ in range(num_blocks)]

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference to each block, in order (the first freed is evicted first)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def drop_cached(self) -> int:
        """Empty the prefix cache (its KV is no longer complete here); how many it held.

        Blocks in use keep their hash, so their sequences' chains stay intact."""
        dropped = len(self._cached)
        for block_id in self._cached.values():
            block = self.blocks[block_id]
            if block.ref_count == 0:
                block.block_hash, block.token_ids = None, ()
        self._cached.clear()
        return dropped

    # -- resizing ---------------------------------------------------------------------

    def grow(self, num_blocks: int) -> None:
        """Add ``num_blocks`` empty blocks; they are taken before any cached free block."""
        start = len(self.blocks)
        self.blocks += [Block(i) for i in range(start, start + num_blocks)]
        for block_id in range(start + num_blocks - 1, start - 1, -1):
            self._free[block_id] = None
            self._free.move_to_end(block_id, last=False)

    def plan_shrink(self, num_blocks: int) -> dict[int, int] | None:
        """Moves (old id -> new id) that empty every block at or above ``num_blocks``.

        None if the blocks in use do not fit below the cut. Nothing changes until ``shrink``.
        """
        used_above = [b.block_id for b in self.blocks[num_blocks:] if b.ref_count > 0]
        free_below = [b for b in self._free if b < num_blocks]
        if len(used_above) > len(free_below):
            return None
        return dict(zip(used_above, free_below, strict=False))

    def shrink(self, num_blocks: int, moves: dict[int, int]) -> None:
        """Apply ``plan_shrink``'s moves to the block metadata and cut the pool.

        The caller copies each moved block's KV and rewrites every table that names it.
        """
        for old, new in moves.items():
            self._take_free_id(new)
            src, dst = self.blocks[old], self.blocks[new]
            dst.ref_count, dst.block_hash, dst.token_ids = (
                src.ref_count,
                src.block_hash,
                src.token_ids,
            )
            if src.block_hash is not None and self._cached.get(src.block_hash) == old:
                self._cached[src.block_hash] = new
            src.ref_count, src.block_hash, src.token_ids = 0, None, ()
        for block in self.blocks[num_blocks:]:
            if (
                block.block_hash is not None
                and self._cached.get(block.block_hash) == block.block_id
            ):
                del self._cached[block.block_hash]
            self._free.pop(block.block_id, None)
        del self.blocks[num_blocks:]

    # -- internals ------------------------------------------------------------------

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        self._evict(block_id)
        return block_id

    def _take_free_id(self, block_id: int) -> None:
        del self._free[block_id]
        self._evict(block_id)

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None and self._cached.get(block.block_hash) == block_id:
            del self._cached[block.block_hash]
        block.block_hash, block.token_ids = None, ()
        block.ref_count = 1
