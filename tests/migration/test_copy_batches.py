"""A copy stage exports many sequences per visit of the donor's engine thread.

Each ``engine_call`` waits for the donor's step to end, so a copy that visited once per
sequence took a step's time per sequence (issue 10's figures: 46 MiB of KV for 16 sequences in
~2 s). Now a visit exports sequences until ``AgentConfig.copy_batch_bytes`` and their chunks go
out as one exchange; the switch's pause sends every sequence's last delta in one exchange too.
Deltas are token ranges (``kv_tokens``), both ways: the tokens written since the last copy,
not the blocks they fall in."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from services.common.errors import InvalidRequestError
from services.common.types import SamplingParams
from services.engine.ports import StageSeq
from services.migration import donor, layer_agent
from services.migration.donor import TokenDelta
from services.migration.link import HelperLink
from services.migration.records import Peer, Role
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.migration.harness import MIGRATION, AgentPair

NUM_SEQS, K = 6, 2


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


@pytest.mark.parametrize(
    ("batch_bytes", "precopy_skip_bytes", "export_visits", "switch_visits"),
    [
        (64 << 20, 16 << 20, 1, 1),  # the copy moved little: the switch only pauses
        (1, 0, NUM_SEQS, NUM_SEQS + 1),  # it copies once more first, then pauses
    ],
)
def test_a_copy_stage_visits_the_engine_once_per_batch(
    tiny_llama, loop, batch_bytes, precopy_skip_bytes, export_visits, switch_visits
):
    """Each visit waits for the step in flight: a second or more on a loaded prefill worker,
    where a migration that visited 11 times took 13 s to become ACTIVE. The switch reads
    the sequences still running in its pause's visit; activating without dropping weights
    makes none."""
    pair = running_pair(tiny_llama, loop)
    config = pair.donor.config
    pair.donor.config = replace(
        config, copy_batch_bytes=batch_bytes, precopy_skip_bytes=precopy_skip_bytes
    )
    pair.prepare(K)
    visits = count_visits(pair)
    num_bytes, moved, _ = pair.copy()
    # the first visit lists the running sequences and exports the first batch
    assert visits[0] == export_visits
    assert moved == NUM_SEQS and num_bytes > 0
    held = loop.call(
        pair.donor._link(pair.donor.records["m-1"]).held([f"r{i}" for i in range(NUM_SEQS)])
    )
    expected = {s.request_id: s.num_computed_tokens for s in pair.a.scheduler.running}
    assert held == expected  # every sequence's KV of every moved layer, whole
    pair.a_thread.step()
    visits[0] = 0
    loop.call(pair.donor.switch(MIGRATION, 1, None))
    assert visits[0] == switch_visits
    loop.call(pair.donor.activate(MIGRATION, False))
    assert visits[0] == switch_visits
    pair.state = "switched"
    finish_exactly(pair, tiny_llama)


def test_a_donor_answers_prepare_without_a_visit_once_it_learnt_its_layers(tiny_llama, loop):
    pair = running_pair(tiny_llama, loop)
    visits = count_visits(pair)
    pair.prepare(K)  # the harness's agent never learnt them: it asks the engine
    assert visits[0] == 1
    pair.release()
    loop.call(pair.donor.learn_layers())
    visits[0] = 0
    pair.prepare(K)
    assert visits[0] == 0
    with pytest.raises(InvalidRequestError, match="only \\[k, "):
        loop.call(pair.donor.prepare("m-2", Role.DONOR, range(0, 2), Peer("A"), Peer("B"), None))
    assert visits[0] == 0
    pair.release()
    pair.close()
    while pair.a.has_unfinished_requests:
        pair.a_thread.step()
    assert_no_leaks(pair.a)


@pytest.mark.parametrize("skip_bytes", [16 << 20, 0])
def test_a_copy_with_little_kv_in_use_is_left_to_the_pause(tiny_llama, loop, skip_bytes):
    """Once the agent learnt its layers it bounds the KV in use from the snapshot (blocks in
    use, whole): at most ``precopy_skip_bytes`` and neither the copy nor the switch's own
    stage visits the engine; the pause sends every sequence whole and the output is
    unchanged. Below the bound (0 here) both copy as before."""
    pair = running_pair(tiny_llama, loop)
    pair.donor.config = replace(pair.donor.config, precopy_skip_bytes=skip_bytes)
    loop.call(pair.donor.learn_layers())
    layers = range(K, pair.a.spec.num_layers)
    in_use = pair.a.block_manager.num_blocks - pair.a.block_manager.num_free_blocks
    assert pair.donor.kv_bound(layers) == in_use * pair.a.kv_cache.layer_block_bytes * len(layers)
    assert 0 < pair.donor.kv_bound(layers) <= 16 << 20
    pair.prepare(K)
    visits = count_visits(pair)
    num_bytes, moved, _ = pair.copy()
    skipped = skip_bytes > 0
    assert visits[0] == (0 if skipped else 1)
    assert (num_bytes == 0, moved) == (skipped, 0 if skipped else NUM_SEQS)
    visits[0] = 0
    result = loop.call(pair.donor.switch(MIGRATION, 1, None))
    assert visits[0] == (1 if skipped else 2)
    if skipped:  # the pause carried every sequence whole
        tokens = sum(s.num_computed_tokens for s in pair.a.scheduler.running)
        assert result.num_bytes == tokens * donor.token_bytes(pair.a, layers)
        assert len(result.request_ids) == NUM_SEQS
    else:  # copied twice before it: nothing new since
        assert (result.num_bytes, result.request_ids) == (0, ())
    pair.state = "switched"
    finish_exactly(pair, tiny_llama)


def test_a_revert_copies_back_what_the_helper_held_in_one_listing_visit(tiny_llama, loop):
    """The helper is asked first (for the sequences sent to it); one visit restores the
    weights and lists what it held of each, even if a step ran since (``partial``: the rest
    is the pause's); one visit writes each batch back; the pause is the last. Output
    unchanged."""
    pair = running_pair(tiny_llama, loop)
    pair.prepare(K)
    pair.copy()
    pair.switch(1, drop=False)
    for _ in range(3):
        pair.a_thread.step()
    layers = range(K, pair.a.spec.num_layers)
    behind = {f"r{i}": s.num_computed_tokens - 2 for i, s in enumerate(pair.a.scheduler.running)}
    whole = donor.lacking(pair.a, layers, behind, 1 << 30)
    part = donor.lacking(pair.a, layers, behind, 1 << 30, partial=True)
    assert whole == []  # in the pause: a sequence the helper lacks recomputes
    assert [s.end for s in part[0]] == [behind[s.request_id] for s in part[0]]
    assert len(part[0]) == NUM_SEQS
    visits = count_visits(pair)
    result = loop.call(pair.donor.revert(MIGRATION))
    assert visits[0] == 3
    assert len(result.request_ids) == NUM_SEQS
    assert all(not pair.a.placement.missing(f"r{i}") for i in range(NUM_SEQS))
    pair.release()
    finish_exactly(pair, tiny_llama, revert=False)


def test_a_revert_with_nothing_on_the_helper_is_the_pause_alone(tiny_llama, loop):
    pair = running_pair(tiny_llama, loop)
    pair.prepare(K)
    for i in range(NUM_SEQS):  # nothing moved before the switch: none of them on the helper
        pair.a.abort(f"r{i}")
    pair.copy()
    pair.switch(1, drop=False)
    visits = count_visits(pair)
    result = loop.call(pair.donor.revert(MIGRATION))
    assert (visits[0], result.num_bytes) == (1, 0)
    pair.release()
    pair.close()
    assert_no_leaks(pair.a)
    assert_no_leaks(pair.b)


def finish_exactly(pair: AgentPair, model, revert: bool = True) -> None:
    """Run the donor to the end (through the helper), revert if asked, and compare with an
    engine that never migrated (the first steps' tokens were not collected: the tails)."""
    tokens: dict[str, list[int]] = {}
    while pair.a.has_unfinished_requests:
        for out in pair.a_thread.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert not revert or pair.revert()
    pair.release()
    reference = make_engine(model, num_kv_blocks=128)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompts = [prompt_ids(20 + 7 * i, 40 + i) for i in range(NUM_SEQS)]
    expected_tokens = [c.token_ids for c in reference.generate(prompts, params)]
    for i, want in enumerate(expected_tokens):
        got = tokens.get(f"r{i}", [])
        assert got == want[len(want) - len(got) :]
    pair.close()
    assert_no_leaks(pair.a)


def test_deltas_carry_only_the_tokens_written_since_the_last_copy(tiny_llama, loop):
    """A copy stage after steps, and the switch's pause, send each sequence's new tokens in
    every moved layer, not the blocks they fall in (the pause's bytes grew with the number of
    sequences times a block: 2,432 blocks, 59.8 MB, at 128 sequences of smollm2)."""
    pair = running_pair(tiny_llama, loop)
    pair.prepare(K)
    pool = pair.a.kv_cache
    token_bytes = pool.layer_block_bytes // pool.block_size * (pair.a.spec.num_layers - K)
    pair.copy()
    for _ in range(2):
        pair.a_thread.step()
    num_bytes, moved, _ = pair.copy()
    assert (num_bytes, moved) == (2 * NUM_SEQS * token_bytes, NUM_SEQS)
    pair.a_thread.step()

    async def no_stage(record):  # the pause itself carries the step's delta
        return 0, 0

    pair.donor.layers._copy_stage = no_stage
    result = loop.call(pair.donor.switch(MIGRATION, 1, None))
    assert result.num_bytes == NUM_SEQS * token_bytes
    assert sorted(result.request_ids) == [f"r{i}" for i in range(NUM_SEQS)]
    pair.state = "switched"
    for _ in range(4):
        pair.a_thread.step()
    # the revert copies back the 4 tokens a sequence the donor lacks in the moved layers
    result = loop.call(pair.donor.revert(MIGRATION))
    assert (result.num_bytes, len(result.request_ids)) == (4 * NUM_SEQS * token_bytes, NUM_SEQS)
    assert all(not pair.a.placement.missing(f"r{i}") for i in range(NUM_SEQS))
    pair.release()
    finish_exactly(pair, tiny_llama, revert=False)


def test_kv_coming_back_skips_sequences_that_ended_or_fell_behind(tiny_llama):
    """``restore_tokens`` writes what still fits its sequence: one aborted since the fetch,
    or now short of the span's end (preempted and recomputing), takes nothing."""
    a = make_engine(tiny_llama, num_kv_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for i in range(3):
        a.add_request(f"r{i}", prompt_ids(20 + i, 50 + i), params)
    a.step()
    layers = range(K, a.spec.num_layers)
    spans = [StageSeq(f"r{i}", 5, 15) for i in range(3)]
    data = a.kv.export_tokens(spans, layers)
    a.abort("r1")
    late = StageSeq("r2", 5, 40)  # r2 has computed 22 tokens
    delta = TokenDelta(
        (spans[0], spans[1], late),
        layers,
        a.fingerprint,
        torch.cat([data, torch.zeros(*data.shape[:2], 25, *data.shape[3:])], dim=2),
    )
    num_bytes, moved = donor.restore_tokens(a, [delta])
    assert (num_bytes, moved) == (15 * donor.token_bytes(a, layers), ["r0"])
    with pytest.raises(InvalidRequestError, match="another model"):
        donor.restore_tokens(a, [replace(delta, fingerprint="other")])
    a.abort("r0")
    a.abort("r2")
    assert_no_leaks(a)


def test_spans_are_cut_to_fit_a_message_and_keep_their_order():
    a, b, c = StageSeq("a", 0, 10), StageSeq("b", 5, 25), StageSeq("c", 0, 3)
    assert donor.groups([a, b, c], 2, 16) == [
        [StageSeq("a", 0, 8)],
        [StageSeq("a", 8, 2)],
        [StageSeq("b", 5, 8)],
        [StageSeq("b", 13, 8)],
        [StageSeq("b", 21, 8)],
        [StageSeq("b", 29, 1), StageSeq("c", 0, 3)],
    ]
    assert donor.groups([c], 2, 1 << 20) == [[c]] and donor.groups([], 2, 16) == []
    assert donor.groups([c], 1 << 20, 16) == [[StageSeq("c", i, 1)] for i in range(3)]


def test_a_copy_in_messages_of_a_few_tokens_arrives_whole_and_in_order(
    tiny_llama, loop, monkeypatch
):
    """Every sequence longer than a message goes in pieces, each after the one before (the
    helper refuses a piece beyond what it holds), both ways; output unchanged."""
    pair = running_pair(tiny_llama, loop)
    pair.prepare(K)
    layers = range(K, pair.a.spec.num_layers)
    monkeypatch.setattr(layer_agent, "BATCH_BYTES", 5 * donor.token_bytes(pair.a, layers))
    sent: list[int] = []
    link_send = HelperLink.send_tokens

    async def counted(self, deltas):
        sent.extend(len(d.spans) for d in deltas)
        return await link_send(self, deltas)

    monkeypatch.setattr(HelperLink, "send_tokens", counted)
    num_bytes, moved, _ = pair.copy()
    tokens = sum(s.num_computed_tokens for s in pair.a.scheduler.running)
    assert (num_bytes, moved) == (tokens * donor.token_bytes(pair.a, layers), NUM_SEQS)
    assert len(sent) >= tokens // 5  # at most 5 tokens a message
    pair.switch(1, False)
    for _ in range(3):
        pair.a_thread.step()
    result = loop.call(pair.donor.revert(MIGRATION))
    assert len(result.request_ids) == NUM_SEQS
    assert all(not pair.a.placement.missing(f"r{i}") for i in range(NUM_SEQS))
    pair.release()
    finish_exactly(pair, tiny_llama, revert=False)
