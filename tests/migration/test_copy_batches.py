"""A copy stage exports many sequences per visit of the donor's engine thread.

Each ``engine_call`` waits for the donor's step to end, so a copy that visited once per
sequence took a step's time per sequence (issue 10's figures: 46 MiB of KV for 16 sequences in
~2 s). Now a visit exports sequences until ``AgentConfig.copy_batch_bytes`` and their chunks go
out as one exchange; the switch's pause sends every sequence's last delta in one exchange too."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.common.types import SamplingParams
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.migration.harness import AgentPair, LoopThread

NUM_SEQS, K = 6, 2


@pytest.fixture
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


def running_pair(model, loop) -> AgentPair:
    a, b = make_engine(model, num_kv_blocks=128), make_engine(model, num_kv_blocks=128)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for i in range(NUM_SEQS):
        a.add_request(f"r{i}", prompt_ids(20 + 7 * i, 40 + i), params)
    pair = AgentPair(loop, a, b)
    for _ in range(3):
        pair.a_thread.step()
    return pair


def count_visits(pair: AgentPair) -> list[int]:
    visits = [0]
    inner = pair.donor.engine_call

    async def counted(fn):
        visits[0] += 1
        return await inner(fn)

    pair.donor.engine_call = counted
    return visits


@pytest.mark.parametrize(("batch_bytes", "export_visits"), [(64 << 20, 1), (1, NUM_SEQS)])
def test_a_copy_stage_visits_the_engine_once_per_batch(
    tiny_llama, loop, batch_bytes, export_visits
):
    pair = running_pair(tiny_llama, loop)
    pair.donor.config = replace(pair.donor.config, copy_batch_bytes=batch_bytes)
    pair.prepare(K)
    visits = count_visits(pair)
    num_bytes, moved, _ = pair.copy()
    # one visit lists the running sequences, then the exports
    assert visits[0] == 1 + export_visits
    assert moved == NUM_SEQS and num_bytes > 0
    held = loop.call(
        pair.donor._link(pair.donor.records["m-1"]).held([f"r{i}" for i in range(NUM_SEQS)])
    )
    expected = {s.request_id: s.num_computed_tokens for s in pair.a.scheduler.running}
    assert held == expected  # every sequence's KV of every moved layer, whole
    pair.switch(1, False)
    tokens: dict[str, list[int]] = {}
    while pair.a.has_unfinished_requests:
        for out in pair.a_thread.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert pair.revert()
    pair.release()
    reference = make_engine(tiny_llama, num_kv_blocks=128)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompts = [prompt_ids(20 + 7 * i, 40 + i) for i in range(NUM_SEQS)]
    expected_tokens = [c.token_ids for c in reference.generate(prompts, params)]
    # the first 3 steps' tokens were not collected: compare the tails
    for i, want in enumerate(expected_tokens):
        got = tokens.get(f"r{i}", [])
        assert got == want[len(want) - len(got) :]
    pair.close()
    assert_no_leaks(pair.a)
