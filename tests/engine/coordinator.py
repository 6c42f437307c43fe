"""An in-process coordinator for tests: layer and attention migrations between two engines.

Owner A serves requests; helper B hosts A's layers ``[k, L)`` (``LocalStagePort``) or holds
leading blocks of A's longest sequences (``LocalAttentionPort``). Every call here runs between
steps, on the test's thread, doing what the coordinator will do over the data plane:

- layer migration: ``copy_layers`` (B hosts the range, A's KV for it is copied), ``switch_layers``
  (the delta written since the copy, then A's layout sends the range to B, optionally dropping
  it from A), ``revert_layers`` (A takes the layers back, KV copied back, B releases);
- attention migration: ``offload`` (B holds a copy of the blocks, A frees them), ``recall``.
"""

from __future__ import annotations

import torch

from services.common.errors import ResourceExhaustedError
from services.engine.engine import Engine
from services.engine.local_ports import LocalAttentionPort, LocalStagePort
from services.engine.memory import module_bytes
from services.engine.stages import StageLayout
from tests.engine.helpers import make_engine

OWNER = "A"
A_BLOCKS = 24  # the owner's pool in the migration tests: small enough that they preempt
A_CONFIG = dict(max_num_batched_tokens=48, max_model_len=256)  # chunked prefill


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 4000, (n,), generator=g).tolist()


def owner_engine(model, drop: bool, **config) -> Engine:
    """The owner: ``A_BLOCKS`` blocks, given as a count or (``drop``) as a memory budget;
    ``config``: more EngineConfig fields."""
    config = {**A_CONFIG, **config}
    if not drop:
        return make_engine(model, num_kv_blocks=A_BLOCKS, **config)
    probe = make_engine(model, num_kv_blocks=1)
    budget = module_bytes([probe.model]) + A_BLOCKS * probe.kv_cache.block_bytes
    return make_engine(model, num_kv_blocks=None, memory_budget_bytes=budget, **config)


class Migrations:
    def __init__(self, a: Engine, b: Engine, num_micro_batches: int = 1, drop: bool = False):
        self.a, self.b = a, b
        self.num_micro_batches = num_micro_batches
        self.drop = drop
        self.k: int | None = None  # layers [k, L) copied to or hosted by B
        self.port: LocalStagePort | None = None
        self.attention = LocalAttentionPort(b.migration.hosted_blocks, OWNER)
        self.offloaded: set[str] = set()
        self.events: list[str] = []
        self.most_blocks = a.block_manager.num_blocks  # the largest pool A had

    @property
    def layers(self) -> range:
        return range(self.k or 0, self.a.spec.num_layers)

    @property
    def switched(self) -> bool:
        return self.port is not None

    # -- layer migration -----------------------------------------------------------------

    def copy_layers(self, k: int, num_blocks: int = 64) -> None:
        self.k = k
        hosted = self.b.migration.host_layers(
            OWNER, k, self.a.spec.num_layers, num_blocks, self.a.fingerprint
        )
        for seq in self.a.scheduler.running:
            if seq.num_computed_tokens:
                for layer in self.layers:
                    hosted.import_kv(seq.request_id, *self.a.export_kv(seq.request_id, layer))
        self.events.append(f"copy {k}")

    def switch_layers(self) -> None:
        hosted = self.b.migration.hosted_layers[OWNER]
        for seq in self.a.scheduler.running:  # the delta: KV written since the copy
            held, done = hosted.num_tokens(seq.request_id), seq.num_computed_tokens
            for layer in self.layers if done > held else ():
                hosted.import_kv(seq.request_id, *self.a.export_kv(seq.request_id, layer, held))
        self.port = LocalStagePort(hosted)
        split = StageLayout.split(self.a.spec.num_layers, self.k, self.port, self.num_micro_batches)
        self.a.migration.set_stages(split)
        if self.drop:
            self.a.migration.drop_layers(self.k)
            self.most_blocks = max(self.most_blocks, self.a.block_manager.num_blocks)
        self.events.append("switch")

    def revert_layers(self) -> bool:
        """Take the layers back; False (nothing changed) if A's pool cannot shrink yet."""
        if self.switched:
            try:
                self.a.migration.restore_layers()
            except ResourceExhaustedError:
                return False
            self._copy_back()
            self.a.migration.set_stages(StageLayout.local(self.a.spec.num_layers))
            self.port.close()
            self.port = None
        self.b.migration.release_hosted_layers(OWNER)
        self.k = None
        self.events.append("revert")
        return True

    def _copy_back(self) -> None:
        """Each running sequence's KV that A lacks, from the first token it lacks (a delta)."""
        hosted = self.b.migration.hosted_layers[OWNER]
        for seq in self.a.scheduler.running:
            rid, done = seq.request_id, seq.num_computed_tokens
            if done > hosted.num_tokens(rid):
                continue  # B never saw all of it: A recomputes it
            for layer, held in self.a.placement.missing(rid).items():
                data, layout = hosted.export_kv(rid, layer, held, done)
                self.a.migration.restore_kv(rid, data, layout)

    # -- attention migration -----------------------------------------------------------

    def offload(self, request_id: str, num_blocks: int) -> None:
        seq = self.a._seq(request_id)
        blocks = self.b.migration.hosted_blocks
        blocks.hold(OWNER, request_id, seq.block_hashes[:num_blocks])
        for layer in range(self.a.spec.num_layers):
            data, layout = self.a.export_kv(request_id, layer, 0, num_blocks * seq.block_size)
            blocks.import_kv(OWNER, request_id, data, layout)
        self.a.migration.offload_blocks(request_id, num_blocks, self.attention)
        self.offloaded.add(request_id)
        self.events.append(f"offload {request_id} {num_blocks}")

    def recall(self, request_id: str) -> bool:
        """Bring the blocks back; False (nothing changed) if A has no free blocks for them."""
        try:
            self.a.migration.begin_recall(request_id)
        except ResourceExhaustedError:
            return False
        for layer in range(self.a.spec.num_layers):
            data, layout = self.b.migration.hosted_blocks.export_kv(OWNER, request_id, layer)
            self.a.migration.import_recalled(request_id, data, layout)
        self.a.migration.finish_recall(request_id)
        self.offloaded.discard(request_id)
        self.events.append(f"recall {request_id}")
        return True

    def located(self) -> list[str]:
        """Offloaded requests A still runs with blocks on B."""
        return [r for r in self.offloaded if r in self.a.placement.located]
