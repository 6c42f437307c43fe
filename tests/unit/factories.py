"""Small factories for engine unit tests (no torch model needed)."""

from __future__ import annotations

import itertools

from services.common.types import SamplingParams
from services.engine.block_manager import BlockManager
from services.engine.scheduler import Scheduler
from services.engine.sequence import Sequence

BLOCK_SIZE = 4
_ids = itertools.count()


def make_seq(tokens: list[int] | int, max_tokens: int = 8) -> Sequence:
    """A sequence with the given tokens, or that many tokens unique to it (no prefix hits)."""
    n = next(_ids)
    token_ids = (
        list(range(1000 * (n + 1), 1000 * (n + 1) + tokens))
        if isinstance(tokens, int)
        else list(tokens)
    )
    return Sequence(f"r{n}", token_ids, SamplingParams(max_tokens=max_tokens), BLOCK_SIZE)


def make_block_manager(num_blocks: int = 8, prefix_caching: bool = True) -> BlockManager:
    return BlockManager(num_blocks, BLOCK_SIZE, "test-model", prefix_caching)


def make_scheduler(num_blocks: int = 8, max_num_seqs: int = 4, budget: int = 16) -> Scheduler:
    return Scheduler(make_block_manager(num_blocks), max_num_seqs, budget)


def assert_no_leaks(bm: BlockManager) -> None:
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
