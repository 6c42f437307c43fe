"""Exact event order on small scenarios: known step times in, exact TTFT and finish times out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.coordinator.policy_types import ActionKind, Decision
from services.launcher import Mode
from services.sim.cluster import SimCluster, SimSpec
from services.sim.profile import PrefillModel
from services.sim.worker import Offload
from tests.sim.factories import assert_no_leaks, make_profile, request


def test_colocated_two_requests_one_worker_exact_times():
    # t=0: A (10 tokens) prefills alone: 10 x 10 ms -> first token at 0.1.
    # B (20 tokens) arrives at 0.05, waits; at 0.1 one mixed step: A decodes, B prefills:
    # 20 x 10 ms + the decode step's 0.1 (no second fixed cost: prefill's a is 0) -> 0.4.
    # At 0.4 both decode together (0.1): A's third token and B's second at 0.5: both done.
    cluster = SimCluster(SimSpec(Mode.COLOCATED, 1), make_profile())
    a, b = cluster.run([request(0, 0.0, 10, 3), request(1, 0.05, 20, 2)])
    assert (a.first_token_s, a.done_s, a.num_output_tokens) == pytest.approx((0.1, 0.5, 3))
    assert (b.first_token_s, b.done_s, b.num_output_tokens) == pytest.approx((0.4, 0.5, 2))
    assert a.status == b.status == "OK"
    worker = cluster.workers["mixed-000"]
    assert worker.stats.num_steps == 3
    assert worker.stats.busy_s == pytest.approx(0.5)
    assert_no_leaks(cluster)


def test_static_pd_prefill_transfer_decode_exact_times():
    # P prefills 32 tokens: 0.32 s, first token then. KV of 2 blocks x 2 layers x 1000 B,
    # streamed layer by layer while P computes: at its end the last layer is left, 10 ms +
    # 2000 B / 200 kB/s = 20 ms -> joins D at 0.34; one decode step: done at 0.44.
    cluster = SimCluster(SimSpec(Mode.STATIC_PD, 2), make_profile())
    (r,) = cluster.run([request(0, 0.0, 32, 2)])
    assert (r.first_token_s, r.done_s) == pytest.approx((0.32, 0.44))
    assert r.decode_worker == "decode-000"
    record = r.record()
    assert record.ttft_s == pytest.approx(0.32) and record.tpot_s == pytest.approx(0.12)
    # P keeps the prompt's two full blocks in its prefix cache, D its three blocks' hashes.
    assert cluster.workers["prefill-000"].block_manager.num_cached_blocks == 2
    assert_no_leaks(cluster)


def test_the_prefix_cache_is_the_engines_a_repeated_prompt_is_a_hit():
    # The same 33-token prompt twice on one worker: the second prefills only its last token
    # (two 16-token blocks are hits): 0.33 s, then 0.01 s.
    cluster = SimCluster(SimSpec(Mode.COLOCATED, 1), make_profile())
    first, second = request(0, 0.0, 33, 1), request(0, 1.0, 33, 1)
    second.request_id = "again"
    cluster.run([first, second])
    assert first.done_s == pytest.approx(0.33)
    assert second.done_s - second.at_s == pytest.approx(0.01)
    assert_no_leaks(cluster)


def test_a_decode_worker_takes_only_the_blocks_after_a_prefix_it_holds():
    # The 33-token prompt twice through static PD. First: 0.33 s of prefill, its 3 blocks'
    # KV (6,000 B) streamed meanwhile but its last layer, 10 ms + 15 ms -> joins D at 0.355,
    # one decode step: done 0.455. Again at 1.0: P prefills the last token (0.01), D holds the
    # first two blocks (the last token's block always comes): 2,000 B, of which the 0.01 s
    # step carries all but its last layer, 10 ms + 5 ms -> joins at 1.025, done at 1.125.
    cluster = SimCluster(SimSpec(Mode.STATIC_PD, 2), make_profile())
    first, second = request(0, 0.0, 33, 2), request(0, 1.0, 33, 2)
    second.request_id = "again"
    cluster.run([first, second])
    assert (first.first_token_s, first.done_s) == pytest.approx((0.33, 0.455))
    assert (second.first_token_s, second.done_s) == pytest.approx((1.01, 1.125))
    assert_no_leaks(cluster)
    # Without the reuse (decode --no-reuse-cached-prefix) all 3 blocks come again: the step
    # carries 2,000 B of the 6,000, 4,000 are left (more than the last layer's 3,000): 10 ms
    # + 20 ms -> joins at 1.04, done at 1.14.
    cluster = SimCluster(SimSpec(Mode.STATIC_PD, 2, reuse_cached_prefix=False), make_profile())
    first, second = request(0, 0.0, 33, 2), request(0, 1.0, 33, 2)
    second.request_id = "again"
    cluster.run([first, second])
    assert second.done_s == pytest.approx(1.14)
    assert_no_leaks(cluster)


def test_the_prompts_of_one_prefill_step_join_their_decode_worker_together():
    # r9 (16 tokens, 1 output token) holds P in (0, 0.16]; r0-r2 (16, 32, 48
    # tokens) queue and are prefilled in one step, (0.16, 1.12]. Their KV streamed meanwhile:
    # what is left is each one's last layer, 15, 20, 25 ms. The real decode worker's engine
    # thread takes their end frames in one batch of commands: all three join at 1.145 and
    # take one decode step together, done at 1.245 (one at a time, the first would have
    # started a step alone and the others finished a step later, at 1.345).
    cluster = SimCluster(SimSpec(Mode.STATIC_PD, 2), make_profile())
    first, *three = cluster.run(
        [request(9, 0.0, 16, 1), request(0, 0.05, 16, 2), request(1, 0.05, 32, 2),
         request(2, 0.05, 48, 2)]
    )  # fmt: skip
    assert first.first_token_s == pytest.approx(0.16)
    assert [r.first_token_s for r in three] == pytest.approx([1.12] * 3)
    assert [r.done_s for r in three] == pytest.approx([1.245] * 3)
    assert_no_leaks(cluster)


def test_a_short_suffix_on_a_prefix_d_holds_is_prefilled_on_d():
    # As above with the router's --local-prefill-max-tokens 1: again at 1.0, D's cache holds
    # all but the last token, so D prefills it (0.01 s, first token at 1.01) with no handoff,
    # then one decode step: done at 1.11. P saw only the first request.
    spec = SimSpec(Mode.STATIC_PD, 2, local_prefill_max_tokens=1)
    cluster = SimCluster(spec, make_profile())
    first, second = request(0, 0.0, 33, 2), request(0, 1.0, 33, 2)
    second.request_id = "again"
    cluster.run([first, second])
    assert (first.first_token_s, first.done_s) == pytest.approx((0.33, 0.455))
    assert (second.first_token_s, second.done_s) == pytest.approx((1.01, 1.11))
    assert cluster.workers["prefill-000"].stats.num_steps == 1
    assert_no_leaks(cluster)


def test_a_long_prefill_queue_sends_any_prompt_to_d():
    # --local-prefill-queue-tokens 20: B (40 tokens) arrives at 0.05 while P has A's 40 queued
    # (routed, not yet reported: the router's own estimate): D prefills B itself (0.4 s) while
    # P prefills A. Nothing is cached anywhere, so only the queue rule applies.
    spec = SimSpec(Mode.STATIC_PD, 2, local_prefill_queue_tokens=20)
    cluster = SimCluster(spec, make_profile())
    a, b = cluster.run([request(0, 0.0, 40, 1), request(1, 0.05, 40, 1)])
    assert (a.first_token_s, b.first_token_s) == pytest.approx((0.4, 0.45))
    assert cluster.workers["prefill-000"].stats.num_steps == 1
    assert cluster.workers["decode-000"].stats.num_steps == 1  # the profile's chunk: 256
    assert_no_leaks(cluster)
    # The decode worker's --max-num-batched-tokens 16 (banaserve's chunk, made small): B's 40
    # tokens take three of its steps, 16 + 16 + 8 (10 ms a token: the same 0.4 s here).
    cluster = SimCluster(replace(spec, decode_max_num_batched_tokens=16), make_profile())
    a, b = cluster.run([request(0, 0.0, 40, 1), request(1, 0.05, 40, 1)])
    assert (a.first_token_s, b.first_token_s) == pytest.approx((0.4, 0.45))
    assert cluster.workers["decode-000"].stats.num_steps == 3
    assert cluster.workers["prefill-000"].stats.num_steps == 1  # its chunk is the profile's
    assert_no_leaks(cluster)


def test_decode_workers_take_their_cap_on_prompt_tokens_while_decoding():
    spec = SimSpec(Mode.STATIC_PD, 2, decode_max_prefill_tokens_while_decoding=8)
    cluster = SimCluster(spec, make_profile())
    caps = {w: cluster.workers[w].scheduler.max_prefill_tokens_while_decoding
            for w in ("prefill-000", "decode-000")}  # fmt: skip
    assert caps == {"prefill-000": 0, "decode-000": 8}
    colocated = SimCluster(replace(spec, mode=Mode.COLOCATED), make_profile())
    mixed = colocated.workers.values()
    assert {w.scheduler.max_prefill_tokens_while_decoding for w in mixed} == {8}


def test_a_request_unfinished_at_the_deadline_fails():
    cluster = SimCluster(SimSpec(Mode.COLOCATED, 1, deadline_s=0.2), make_profile())
    (r,) = cluster.run([request(0, 0.0, 10, 50)])
    assert r.status == "DEADLINE_EXCEEDED" and r.first_token_s == pytest.approx(0.1)
    assert r.record().e2e_s is None


def test_scheduler_limits_come_from_the_real_scheduler():
    # max_num_seqs 1: the second request waits for the first to finish (strict FCFS).
    cluster = SimCluster(SimSpec(Mode.COLOCATED, 1), make_profile(max_num_seqs=1))
    a, b = cluster.run([request(0, 0.0, 10, 2), request(1, 0.0, 10, 2)])
    assert (a.first_token_s, a.done_s) == pytest.approx((0.1, 0.2))
    assert (b.first_token_s, b.done_s) == pytest.approx((0.3, 0.4))
    assert_no_leaks(cluster)


def test_a_layer_offload_stretches_the_donors_step_and_charges_a_busy_helper():
    cluster = SimCluster(SimSpec(Mode.STATIC_PD, 2), make_profile())
    helper = cluster.workers["prefill-000"]
    # two equal parts, a flow shop: the donor's 0.03 + 0.03, the helper's 0.02 of each after
    # its hop in, a hop back: the helper waits for the donor's second part
    two = Offload(helper, share=0.4, hop_s=0.001, num_micro_batches=2)
    assert two.stretch(0.1) == pytest.approx(0.06 + 0.001 + 0.02 + 0.001)
    assert helper.hosted_debt_s == 0.0  # idle: its core runs the remote part at once
    # a helper with 0.03 s of its own work left shares its core with the 0.04 s remote part
    # for 0.03 s: the donor's step and the helper's next one each 0.03 s longer
    helper.busy_ahead_s = lambda: 0.03  # type: ignore[method-assign]
    one = Offload(helper, share=0.4, hop_s=0.001, num_micro_batches=1)
    assert one.stretch(0.1, parts=(1.0,)) == pytest.approx(0.1 + 0.002 + 0.03)
    assert helper.hosted_debt_s == pytest.approx(0.03)
    helper.busy_ahead_s = lambda: 5.0  # type: ignore[method-assign]
    assert one.stretch(0.1, parts=(1.0,)) == pytest.approx(0.1 + 0.002 + 0.04)  # all of it
    assert helper.hosted_debt_s == pytest.approx(0.07)
    # two step streams: halves of (0.1 + 0.02) / 2 each, the donor's 0.6 of both per token
    helper.busy_ahead_s = lambda: 0.0  # type: ignore[method-assign]
    helper.hosted_debt_s = 0.0
    streams = Offload(helper, share=0.4, hop_s=0.001, num_micro_batches=2, pipelined=True)
    assert streams.stretch(0.1, fixed=0.02) == pytest.approx(0.12 * 0.6 + 0.004)
    assert streams.stretch(0.1, fixed=0.02, parts=(1.0,)) == pytest.approx(0.1 + 0.002)
    # eight equal parts inside one step (a prefill donor's): the donor's 0.06, then the last
    # part's 0.005 with its two hops
    eight = Offload(helper, share=0.4, hop_s=0.001, num_micro_batches=8)
    assert eight.stretch(0.1, parts=(1.0,) * 8) == pytest.approx(0.06 + 0.002 + 0.04 / 8)
    assert eight.stretch(0.1, parts=(1.0,) * 3) == pytest.approx(0.06 + 0.002 + 0.04 / 3)
    assert eight.stretch(0.1, parts=(1.0,)) == pytest.approx(0.1 + 0.002)
    # the step's fixed cost stays on the donor, once
    # (here the helper's chain bounds it: each of its parts 0.02 between two hops)
    assert eight.stretch(0.1, fixed=0.02, parts=(1.0, 1.0)) == pytest.approx(
        0.02 + 0.02 + 2 * (0.001 + 0.02 + 0.001) - 0.001
    )
    # one long prompt and a short one: the long part's two halves run one after the other
    assert eight.stretch(0.1, parts=(9.0, 1.0)) == pytest.approx(
        0.054 + 0.001 + 0.036 + 0.001 + 0.004 + 0.001
    )
    # a helper's part longer than the donor's: it bounds the step
    assert Offload(helper, 0.7, 0.0, 4).stretch(0.1, parts=(1.0,) * 4) == pytest.approx(
        0.03 / 4 + 0.07
    )


def test_a_worker_is_busy_ahead_for_its_step_and_its_longest_sequences_tokens():
    # mixed, prefill 10 ms a token, decode 100 ms a step: a 10-token prompt asking 4 tokens
    cluster = SimCluster(SimSpec(Mode.COLOCATED, 1), make_profile())
    worker = next(iter(cluster.workers.values()))
    assert worker.busy_ahead_s() == 0.0  # idle
    worker.on_token = worker.on_finished = lambda seq: None  # no client: the worker alone
    worker.add("r0", list(range(1, 11)), 4)
    worker.kick()
    # the prefill step (its token the first), then three steps at its pace for the other three
    assert worker.busy_ahead_s() == pytest.approx(0.1 + 3 * 0.1)
    cluster.loop.run(until=0.15)  # the first token sampled; the first decode step in flight
    # 0.05 s of that step, then two more steps for the 3rd and 4th tokens
    assert worker.busy_ahead_s() == pytest.approx(0.05 + 2 * 0.1)
    cluster.loop.run()
    assert worker.busy_ahead_s() == 0.0


@pytest.mark.parametrize(
    ("prompts", "whole", "parts"),
    [
        ([400, 400, 400, 400], False, 4),  # as the engine cuts: one part a sequence here
        ([1436, 179, 33, 227], False, 4),
        ([1000], False, 1),
        ([400, 400, 400, 400], True, 1),  # a pending prefix fetch keeps the step whole
    ],
)
def test_an_offloaded_prefill_step_is_cut_as_the_engine_cuts_it(prompts, whole, parts):
    profile = make_profile(
        max_num_batched_tokens=2048, num_kv_blocks=512, prefill=PrefillModel(0.05, 0.001, 1e-7)
    )
    cluster = SimCluster(SimSpec(Mode.STATIC_PD, 2), profile)
    donor, helper = cluster.workers["prefill-000"], cluster.workers["decode-000"]
    donor.offload = Offload(helper, share=0.5, hop_s=0.0, num_micro_batches=8)
    for i, n in enumerate(prompts):
        donor.add(f"r{i}", list(range(10_000 * i + 1, 10_000 * i + n + 1)), 1)
    batch = donor.scheduler.schedule()
    costs = donor._parts(batch, whole)
    assert len(costs) == parts
    assert sum(costs) >= donor.step_time(batch)[0]  # each part pays the fixed cost apart
    expected = [donor.step_time(run)[0] for run in ([batch] if whole else batch.split(8))]
    assert list(costs) == pytest.approx(expected)
    t, fixed = donor.step_time(batch)
    stretched = donor.offload.stretch(t, fixed, costs)
    if parts == 1:
        assert stretched == pytest.approx(t)  # nothing overlaps: the step is as long
    else:
        assert fixed < stretched < t


def test_a_decode_donor_pipelines_and_a_prefill_donor_does_not():
    cluster = SimCluster(SimSpec(Mode.BANASERVE, 2), make_profile())
    decode, prefill = cluster.workers["decode-000"], cluster.workers["prefill-000"]
    assert cluster.migrations is not None
    for donor, helper, pipelined in ((decode, prefill, True), (prefill, decode, False)):
        cluster.migrations.play(
            Decision(ActionKind.LAYERS, donor.worker_id, helper.worker_id, 0.5, 0.5, {},
                     start_layer=1, end_layer=2)
        )  # fmt: skip
        cluster.loop.run()
        assert donor.offload is not None and donor.offload.pipelined is pipelined
        donor.offload = None


def test_runs_on_one_cluster_carry_the_prefix_cache_and_cancel_at_their_deadline():
    # Run 1 (deadline 0.5 s): A's 60 tokens prefill in 0.6 s, so A is cancelled at 0.5: its
    # worker aborts it (blocks freed) while the step runs on. The settle samples every 0.25 s
    # until the worker is idle: at 0.75 (the step ended at 0.6 and committed nothing of A).
    cluster = SimCluster(SimSpec(Mode.COLOCATED, 1, deadline_s=0.5), make_profile())
    (a,) = cluster.run([request(0, 0.0, 60, 5)])
    assert a.status == "DEADLINE_EXCEEDED" and a.first_token_s is None
    worker = cluster.workers["mixed-000"]
    assert worker.busy and worker.scheduler.num_unfinished == 0
    assert worker.block_manager.num_free_blocks == worker.block_manager.num_blocks
    assert cluster.settle(1.0) == pytest.approx(0.25) and cluster.quiet()
    assert worker.block_manager.num_cached_blocks == 0
    # Run 2 from t=1: C's 33 tokens end at 1.33; B, the same prompt at 1.4, hits C's two cached
    # blocks and prefills 1 token: its first (and last) token at 1.41.
    c, b = request(1, 1.0, 33, 1), request(1, 1.4, 33, 1)
    b.request_id = "b"
    assert [r.status for r in cluster.run([c, b], start_s=1.0)] == ["OK", "OK"]
    assert c.done_s == pytest.approx(1.33) and b.done_s == pytest.approx(1.41)
    assert_no_leaks(cluster)
    with pytest.raises(ValueError, match="simulated already"):
        cluster.run([request(1, 2.0, 4, 1)], start_s=2.0)
