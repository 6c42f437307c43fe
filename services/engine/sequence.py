"""Sequence state.

A sequence moves WAITING -> RUNNING -> FINISHED; preemption sends it from
RUNNING back to WAITING with its KV dropped (it is recomputed from its tokens,
generated ones included). Only the scheduler changes ``status``.
``num_computed_tokens`` counts tokens whose KV is in the cache; the tokens
after it are what the next step must compute.

A sequence's KV may be split by token range (attention-level migration, DESIGN.md §5): its first
``num_remote_blocks`` blocks are held by a helper engine and ``block_table`` lists the local
blocks from there on, so block ``i`` of the sequence is ``block_table[i - num_remote_blocks]``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.common.hashing import BlockHash
from services.common.types import FinishReason, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    block_size: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    block_table: list[int] = field(default_factory=list)  # local blocks, after the remote ones
    num_remote_blocks: int = 0  # leading blocks held by a helper (located attention)
    block_hashes: list[BlockHash] = field(default_factory=list)  # of full, computed blocks
    finish_reason: FinishReason | None = None
    arrival: int = 0  # FCFS order

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_blocks(self) -> int:
        return self.num_remote_blocks + len(self.block_table)

    @property
    def num_remote_tokens(self) -> int:
        return self.num_remote_blocks * self.block_size

    def block_id(self, index: int) -> int:
        """This engine's block holding block ``index`` of the sequence (a local one)."""
        if index < self.num_remote_blocks:
            raise IndexError(f"block {index} of {self.request_id} is held by a helper")
        return self.block_table[index - self.num_remote_blocks]

    def block_tokens(self, index: int) -> list[int]:
        start = index * self.block_size
        return self.token_ids[start : start + self.block_size]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
