"""Small hand-made profiles and request lists for the simulator's tests."""

from __future__ import annotations

from dataclasses import replace

from services.sim.profile import (
    DecodeModel,
    MigrationModel,
    PrefillModel,
    Profile,
    TransportModel,
)
from services.sim.requests import SimRequest


def make_profile(**fields) -> Profile:
    """Round numbers: prefill 10 ms/token, decode 100 ms a step, a transfer of the 2 layers'
    KV of one 16-token block = 10 ms + 2,000 B / 200 kB/s = 20 ms."""
    base = Profile(
        model="test",
        num_layers=2,
        block_size=16,
        kv_bytes_per_block_layer=1000,
        num_kv_blocks=64,
        max_num_seqs=8,
        max_num_batched_tokens=256,
        prefill=PrefillModel(0.0, 0.01, 0.0),
        decode=DecodeModel(0.1, 0.0, 0.0),
        transports={"tcp": TransportModel(0.01, 200_000.0)},
        migration=MigrationModel(0.0, 0.01, 0.02),
        layer_share=0.4,
        source="hand-made (tests)",
    )
    return replace(base, **fields)


def request(index: int, at_s: float, num_prompt: int, max_tokens: int) -> SimRequest:
    prompt = tuple(1000 + (index * 31 + j) % 500 for j in range(num_prompt))
    return SimRequest(f"r{index}", index, prompt, max_tokens, at_s)


def assert_no_leaks(cluster) -> None:
    for w in cluster.workers.values():
        bm = w.block_manager
        assert bm.num_free_blocks == bm.num_blocks, w.worker_id
        assert all(b.ref_count == 0 for b in bm.blocks), w.worker_id
        assert w.scheduler.num_unfinished == 0 and not w.imported and not w.busy, w.worker_id
