"""The migration invariant in one process (DESIGN.md §5): migrations never change output.

Owner A serves a mixed workload (prompts of many lengths, some sharing a cached prefix, chunked
prefill, a KV pool small enough to preempt) while a seeded schedule, at random steps, moves its
layers ``[k, L)`` to helper B and back (copy, delta, switch, revert; optionally dropping the
layers from A under a memory budget), or moves leading blocks of its longest sequences to B and
back. B serves requests of its own meanwhile. Greedy float32 output of every request, on both
engines, must equal a run without migrations, token for token; both engines end with nothing
held.
"""

from __future__ import annotations

import random

import pytest

from services.common.types import SamplingParams
from services.engine import paged_decode
from services.engine.engine import Engine
from tests.engine.coordinator import A_BLOCKS, Migrations, owner_engine, prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine

SHARED = prompt_ids(64, 100)  # 4 blocks: later prompts that start with it hit the cache
# (request id, prompt, max_tokens, step it arrives at)
WORKLOAD = [
    ("r0", SHARED + prompt_ids(21, 1), 30, 0),
    ("r1", prompt_ids(7, 2), 40, 0),
    ("r2", prompt_ids(118, 3), 24, 1),
    ("r3", SHARED + prompt_ids(5, 4), 36, 4),
    ("r4", prompt_ids(40, 5), 28, 6),
    ("r5", SHARED + prompt_ids(50, 6), 20, 12),
    ("r6", prompt_ids(3, 7), 44, 15),
    ("r7", SHARED + prompt_ids(1, 8), 16, 30),
]
B_WORKLOAD = [("b0", prompt_ids(33, 20), 40, 0), ("b1", prompt_ids(70, 21), 30, 10)]


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def plain_run(model) -> dict[str, list[int]]:
    """Every request alone, without migrations: the reference."""
    engine = make_engine(model)
    out = {}
    for rid, prompt, max_tokens, _ in WORKLOAD + B_WORKLOAD:
        [done] = engine.generate([prompt], params(max_tokens))
        out[rid] = done.token_ids
    return out


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    return plain_run(tiny_llama)


class Counters:
    def __init__(self, engine: Engine) -> None:
        self.preemptions = 0
        inner = engine.scheduler.on_preempt

        def on_preempt(seq):
            self.preemptions += 1
            inner(seq)

        engine.scheduler.on_preempt = on_preempt


def migrate(m: Migrations, rng: random.Random, k: int) -> None:
    """Maybe one migration action, chosen at random among those possible now."""
    if rng.random() > 0.3:
        return
    located = m.located()
    if m.k is not None:  # a layer migration in flight: usually move it on, sometimes undo it
        if m.switched or rng.random() < 0.2:
            m.revert_layers()
        else:
            m.switch_layers()
    elif located and rng.random() < 0.6:
        m.recall(rng.choice(sorted(located)))
    elif located or rng.random() < 0.5:
        offload_longest(m, rng)
    else:
        m.copy_layers(k, num_blocks=128)


def offload_longest(m: Migrations, rng: random.Random) -> None:
    candidates = [
        s
        for s in m.a.scheduler.running
        if s.request_id not in m.a.placement.located
        and len(s.block_hashes) >= 1
        and s.num_computed_tokens >= s.num_prompt_tokens
    ]
    if candidates:
        seq = max(candidates, key=lambda s: s.num_computed_tokens)
        m.offload(seq.request_id, rng.randint(1, len(seq.block_hashes)))


def run_scenario(
    model, seed: int, k: int, micro: int, drop: bool
) -> tuple[dict, Migrations, Counters]:
    # ``micro`` micro-batches for located sequences' steps too (1: the whole batch waits)
    a = owner_engine(model, drop, located_micro_batches=micro)
    b = make_engine(model, num_kv_blocks=128)
    a_blocks = a.block_manager.num_blocks
    m, counters, rng = Migrations(a, b, micro, drop), Counters(a), random.Random(seed)
    tokens: dict[str, list[int]] = {}
    step = 0
    while step <= 40 or a.has_unfinished_requests or b.has_unfinished_requests:
        for engine, workload in ((a, WORKLOAD), (b, B_WORKLOAD)):
            for rid, prompt, max_tokens, arrival in workload:
                if arrival == step:
                    engine.add_request(rid, prompt, params(max_tokens))
        migrate(m, rng, k)
        for out in a.step() + b.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    for rid in list(m.offloaded):
        m.offloaded.discard(rid)
    if m.k is not None:
        assert m.revert_layers()  # nothing runs any more: the pool can always shrink back
    b.step()  # B frees what A released (hosted blocks go back at its next step)
    num_layers = a.spec.num_layers
    assert a.block_manager.num_blocks == a_blocks and a.snapshot.num_layers_held == num_layers
    assert_no_leaks(a)
    assert_no_leaks(b)
    assert not b.migration.hosted_layers and b.migration.hosted_blocks.num_blocks == 0
    assert a.migration.stage_layout.ranges == ((0, num_layers, False),)
    return tokens, m, counters


# (seed of the schedule, drop the moved layers from A under a memory budget, k, micro-batches of
# a layer split and of a step with located sequences): every k with one and two micro-batches
# (and 4 and 8), with and without dropping.
SCENARIOS = [
    (0, False, 1, 1),
    (0, False, 2, 2),
    (0, False, 3, 1),
    (1, False, 1, 2),
    (1, False, 3, 2),
    (5, True, 1, 2),
    (5, True, 2, 1),
    (5, True, 3, 2),
    (6, True, 2, 2),
    (0, False, 2, 4),  # more micro-batches inside each step (a prefill donor's schedule)
    (6, True, 2, 8),
]


@pytest.mark.parametrize(("seed", "drop", "k", "micro"), SCENARIOS)
def test_migrations_at_random_steps_never_change_output(
    tiny_llama, reference, seed, drop, k, micro, monkeypatch
):
    batched = []  # located decode rows: both parts through the kernel, one call per batch
    decode_lse = paged_decode.decode_lse
    monkeypatch.setattr(
        paged_decode, "decode_lse", lambda *args: batched.append(1) or decode_lse(*args)
    )
    tokens, m, counters = run_scenario(tiny_llama, seed, k, micro, drop)
    assert tokens == reference
    assert batched
    assert "switch" in m.events and "revert" in m.events, m.events
    assert any(e.startswith("offload") for e in m.events), m.events
    assert any(e.startswith("recall") for e in m.events), m.events
    assert counters.preemptions > 0
    assert (m.most_blocks > A_BLOCKS) == drop  # dropping [k, L) grew A's pool


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "drop", "k", "micro"), [(0, False, 10, 1), (5, True, 24, 2)])
def test_migrations_never_change_smollm2_output(smollm2, seed, drop, k, micro):
    tokens, m, _ = run_scenario(smollm2, seed, k, micro, drop)
    assert tokens == plain_run(smollm2)
    assert "switch" in m.events and any(e.startswith("offload") for e in m.events), m.events
