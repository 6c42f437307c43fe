"""What a worker's memory holds: weights and KV pools, against an optional budget (DESIGN.md §5).

Without a budget the engine's KV pool has the block count its config names (``num_kv_blocks``,
or ``kv_cache_bytes`` worth) and keeps it. With ``EngineConfig.memory_budget_bytes`` every byte
of weights and KV counts (activations and the runtime do not), and the engine's own pool gets
every whole block the rest leaves:

    num_blocks = (budget - weights held - hosted pools) // bytes per block (layers held)

That count is recomputed whenever one of its terms changes, on the engine thread, between steps:

1. layers ``[k, L)`` leave (``drop_layers``): their weights and KV are freed and the pool for the
   layers kept grows by what that frees (a block now spans fewer layers, so more fit);
2. they come back (``restore_layers``): the pool shrinks first. Blocks in use above the new
   count move below it (their KV copied, every table that names them rewritten); if they do not
   fit, or the pool would no longer hold one full context, nothing changes and
   ``ResourceExhaustedError`` says why;
3. a layer range is hosted for another engine, or released: its pool's bytes (and those of
   the weights its owner ships, when this engine lacks them) come out of, or go back to, the
   engine's own pool the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from services.common.config import EngineConfig
from services.common.errors import ConfigError, ResourceExhaustedError
from services.engine.block_manager import BlockManager
from services.engine.kv_cache import KVCache
from services.engine.models.llama import ModelSpec


@dataclass(frozen=True)
class MemoryReport:
    budget_bytes: int | None
    weight_bytes: int  # weights held (shared ones counted once)
    kv_bytes: int  # the engine's own KV pool
    hosted_bytes: int  # KV pools (and shipped weights) of layer ranges hosted for others

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.hosted_bytes


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by ``tensors``, each tensor once (tied weights are one tensor)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def module_bytes(modules: Iterable[nn.Module]) -> int:
    return tensor_bytes(t for m in modules for t in [*m.parameters(), *m.buffers()])


_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device: str) -> int | None:
    """The memory a pool on ``device`` can have at most: a GPU's total memory, or this
    machine's physical memory (its cgroup's limit, when lower); None where unknown."""
    kind = torch.device(device).type
    if kind == "cuda":
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    if kind != "cpu":
        return None
    try:
        limits = [physical_memory_bytes()]
    except (ValueError, OSError):  # not a POSIX system that says
        return None
    for path in _CGROUP_LIMITS:
        with contextlib.suppress(OSError, ValueError):  # absent, or "max": no limit
            limits.append(int(Path(path).read_text().strip()))
    return min(limits)


def check_fits(what: str, num_bytes: int, weight_bytes: int, device: str) -> None:
    """A KV pool the device cannot hold beside the weights is a ``ConfigError``
    before it is allocated (it was torch's "can't allocate memory" RuntimeError, or the
    kernel's OOM killer once the pool's pages were touched)."""
    limit = device_memory_bytes(device)
    if limit is not None and num_bytes + weight_bytes > limit:
        raise ConfigError(
            f"{what} needs {num_bytes / 2**30:,.2f} GiB beside {weight_bytes / 2**30:,.2f} GiB "
            f"of weights; {device} has {limit / 2**30:,.2f} GiB"
        )


def blocks_for(budget: int, weight_bytes: int, hosted_bytes: int, block_bytes: int) -> int:
    return max(0, budget - weight_bytes - hosted_bytes) // block_bytes


def initial_num_blocks(config: EngineConfig, weight_bytes: int, block_bytes: int) -> int:
    """The engine's pool at start: the configured size, or what the budget leaves."""
    if config.memory_budget_bytes is None:
        return config.num_kv_blocks or config.kv_cache_bytes // block_bytes
    num_blocks = blocks_for(config.memory_budget_bytes, weight_bytes, 0, block_bytes)
    if num_blocks == 0:
        raise ConfigError(
            f"memory_budget_bytes {config.memory_budget_bytes} leaves no KV block after "
            f"{weight_bytes} bytes of weights ({block_bytes} bytes per block)"
        )
    return num_blocks


def max_model_len(config: EngineConfig, spec: ModelSpec, num_blocks: int) -> int:
    """The longest sequence served: the model's limit, the configured one, and what the pool
    holds (so a single sequence always fits and preemption cannot livelock)."""
    limit = spec.max_position_embeddings
    if spec.sliding_window:
        limit = min(limit, spec.sliding_window)
    requested = config.max_model_len
    if requested is not None and requested > limit:
        raise ConfigError(f"max_model_len {requested} exceeds the model's limit {limit}")
    capacity = num_blocks * config.block_size
    if requested is not None and requested > capacity:
        raise ConfigError(f"max_model_len {requested} exceeds the KV pool ({capacity} tokens)")
    return min(requested or limit, capacity)


class PoolSizer:
    """Keeps the engine's own KV pool at the size the budget allows (engine thread only)."""

    def __init__(
        self,
        budget_bytes: int | None,
        model: nn.Module,
        kv_cache: KVCache,
        block_manager: BlockManager,
        hosted_bytes: Callable[[], int],
        remap: Callable[[dict[int, int]], None],
        min_blocks: int,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.model = model
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.hosted_bytes = hosted_bytes
        self.remap = remap
        self.min_blocks = min_blocks  # one full context must always fit
        self.weight_bytes = module_bytes([model])

    def refresh(self) -> None:
        """Count the weights again (after layers left or came back)."""
        self.weight_bytes = module_bytes([self.model])

    def report(self) -> MemoryReport:
        return MemoryReport(
            self.budget_bytes, self.weight_bytes, self.kv_cache.nbytes, self.hosted_bytes()
        )

    def target(self, num_layers: int, extra_weight_bytes: int = 0, extra_hosted: int = 0) -> int:
        """Blocks the budget allows with ``num_layers`` layers of KV and the extras counted."""
        if self.budget_bytes is None:
            raise RuntimeError("no memory budget: the pool keeps its configured size")
        block_bytes = self.kv_cache.layer_block_bytes * num_layers
        weights = self.weight_bytes + extra_weight_bytes
        return blocks_for(
            self.budget_bytes, weights, self.hosted_bytes() + extra_hosted, block_bytes
        )

    def check_shrink(self, num_blocks: int) -> dict[int, int]:
        """The block moves a shrink to ``num_blocks`` needs, or why it cannot happen."""
        if num_blocks < self.min_blocks:
            raise ResourceExhaustedError(
                f"the KV pool would shrink to {num_blocks} blocks, below the {self.min_blocks} "
                "one full context needs"
            )
        moves = self.block_manager.plan_shrink(num_blocks)
        if moves is None:
            used = self.block_manager.num_blocks - self.block_manager.num_free_blocks
            raise ResourceExhaustedError(
                f"{used} KV blocks are in use; only {num_blocks} fit in the budget"
            )
        return moves

    def resize(self, num_blocks: int, moves: dict[int, int] | None = None) -> None:
        """Grow, or shrink after ``check_shrink`` (pass its moves): KV and tables follow."""
        bm, kv = self.block_manager, self.kv_cache
        if num_blocks >= bm.num_blocks:
            kv.resize(num_blocks)
            bm.grow(num_blocks - bm.num_blocks)
            return
        moves = self.check_shrink(num_blocks) if moves is None else moves
        kv.move_blocks(moves)
        self.remap(moves)
        bm.shrink(num_blocks, moves)
        kv.resize(num_blocks)

    def fit(self) -> None:
        """Resize the pool to what the budget allows now (no-op without a budget)."""
        if self.budget_bytes is not None:
            self.resize(self.target(self.kv_cache.num_layers))
