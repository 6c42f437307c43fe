"""The engine's state and counters as one immutable value, published after every step.

``Engine.snapshot`` is replaced (one reference assignment) at the end of each step and after
every call that changes what it reports, on the engine thread. Load reports and RPC handlers on
other threads read it without touching engine internals and without waiting behind a step; it is
at most one step old.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.engine.memory import MemoryReport


@dataclass(frozen=True)
class HostedRange:
    owner: str
    start: int
    end: int
    num_seqs: int
    num_blocks: int  # of its own pool
    num_blocks_used: int


@dataclass(frozen=True)
class EngineSnapshot:
    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    num_running: int
    num_waiting: int
    num_importing: int
    num_prefix_fetches: int
    num_steps: int  # steps that ran a batch and committed it
    num_failed_steps: int  # steps a fetch or a port failed (nothing kept)
    stages: tuple[tuple[int, int, bool], ...]  # (start, end, remote) per stage
    num_layers_held: int
    num_located_seqs: int  # own sequences with blocks on a helper
    num_remote_blocks: int  # those blocks
    hosted_layers: tuple[HostedRange, ...]  # layer ranges run here for other engines
    num_hosted_blocks: int  # blocks held here for other engines' attention
    memory: MemoryReport
    num_preemptions: int = 0  # sequences preempted so far (their KV freed, recomputed)

    @property
    def num_hosted_layers(self) -> int:
        """Layers run here for other engines, over every hosted range (a load report's)."""
        return sum(r.end - r.start for r in self.hosted_layers)

    @property
    def num_hosted_layer_blocks(self) -> int:
        """KV blocks in use for the hosted layers (their own pools, not this engine's)."""
        return sum(r.num_blocks_used for r in self.hosted_layers)


@dataclass(frozen=True)
class LoopSnapshot:
    """``EngineLoop.snapshot`` (loop.py): the engine's snapshot and the loop's own counters,
    published together after every step and every batch of commands."""

    engine: EngineSnapshot
    num_waiting_tokens: int  # tokens the waiting sequences have still to compute
    num_steps: int  # steps that ran a batch
    num_failed_steps: int  # steps that raised: their requests failed
    num_prefix_fallbacks: int  # requests whose prefix fetch failed, recomputed
    num_commands: int  # commands run
    num_idle_waits: int  # times the engine thread slept for lack of work
