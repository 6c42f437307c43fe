"""The migration invariant with the layers on a helper reached over a real TCP data plane.

The same workload and reference as tests/engine/test_migration_invariant.py, but the moves are
made by two ``MigrationAgent``s (prepare, staged copy, switch, optional drop, revert or abort at
seeded random steps) and the donor's remote stage is a ``DataStagePort``: hidden states, KV
copies and deltas all cross 127.0.0.1. Greedy float32 output of every request, on both engines,
equals the run without migrations; both engines end with nothing held.
"""

from __future__ import annotations

import random

import pytest

from tests.engine.coordinator import A_BLOCKS, owner_engine
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.engine.test_migration_invariant import B_WORKLOAD, WORKLOAD, params, plain_run
from tests.migration.harness import AgentPair


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    return plain_run(tiny_llama)


def act(pair: AgentPair, rng: random.Random, k: int, micro: int, drop: bool) -> None:
    """Maybe one move, at random among those possible now."""
    if rng.random() > 0.35:
        return
    if pair.state == "idle":
        pair.prepare(k)
        pair.copy()
    elif pair.state == "copying":
        roll = rng.random()
        if roll < 0.1:
            pair.abort()
        elif roll < 0.4:
            pair.copy()  # another stage: the delta since the last
        else:
            pair.switch(micro, drop)
    elif rng.random() < 0.1:
        pair.abort()
    else:
        pair.revert()


def run_scenario(model, loop, seed: int, k: int, micro: int, drop: bool):
    a, b = owner_engine(model, drop), make_engine(model, num_kv_blocks=128)
    a_blocks = a.block_manager.num_blocks
    pair, rng = AgentPair(loop, a, b), random.Random(seed)
    tokens: dict[str, list[int]] = {}
    most_blocks, step = a_blocks, 0
    while step <= 40 or a.has_unfinished_requests or b.has_unfinished_requests:
        for engine, workload in ((a, WORKLOAD), (b, B_WORKLOAD)):
            for rid, prompt, max_tokens, arrival in workload:
                if arrival == step:
                    engine.add_request(rid, prompt, params(max_tokens))
        act(pair, rng, k, micro, drop)
        most_blocks = max(most_blocks, a.block_manager.num_blocks)
        for out in pair.a_thread.step() + pair.b_thread.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    if pair.state == "switched":
        assert pair.revert()
    elif pair.state == "copying":
        pair.release()
    b.step()
    pair.close()
    assert a.block_manager.num_blocks == a_blocks
    assert a.snapshot.num_layers_held == a.spec.num_layers
    assert a.migration.stage_layout.ranges == ((0, a.spec.num_layers, False),)
    assert_no_leaks(a)
    assert_no_leaks(b)
    assert not b.migration.hosted_layers
    return tokens, pair.events, most_blocks


SCENARIOS = [(0, 1, 1, False), (1, 2, 2, False), (2, 3, 1, True), (3, 1, 2, True)]


@pytest.mark.parametrize(("seed", "k", "micro", "drop"), SCENARIOS)
def test_migrations_over_tcp_never_change_output(tiny_llama, reference, loop, seed, k, micro, drop):
    tokens, events, most_blocks = run_scenario(tiny_llama, loop, seed, k, micro, drop)
    assert tokens == reference
    assert "switch" in events and "revert" in events, events
    assert (most_blocks > A_BLOCKS) == drop, events
