"""The automatic policy as scenario tables: given these load histories, exactly these decisions.

Every scenario runs ``Policy.decide`` once a second over reports taken every 0.5 s (phase tables,
tests/coordinator/policy_scenarios.py); a decision becomes a migration at once (ACTIVE, or DONE
for a revert). Defaults unless said: PolicyConfig() — gap_high 0.5, gap_low 0.2, 2 s window of
at least 3 reports, sustain 3 s, revert after 5 s, cool-down 15 s — and a 4-layer model, whose
prior layer share is (1 - 0.15) / 4 = 0.2125.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.common.errors import ConfigError
from services.common.migration_states import MigrationState
from services.coordinator.migration import MigrationKind
from services.coordinator.policy import (
    ActionKind,
    Measurements,
    Policy,
    PolicyConfig,
    Rejected,
    Sample,
    Utilisation,
    WorkerView,
    utilisation_of,
)
from tests.coordinator.policy_scenarios import Run, active, brief, report

D, P = "decode-0", "prefill-0"
D2, P2 = "decode-1", "prefill-1"
S = MigrationState
IDLE = {D: (0.1, 20), P: (0.1, 0)}
BURST = {D: (0.9, 100), P: (0.1, 0)}  # decode-heavy: the decode worker busy, the prefill idle
AFTER = {D: (0.05, 10), P: (0.0, 0)}


DEFAULTS = PolicyConfig()


def run(phases, until, config=DEFAULTS, **kw):
    r = Run(Policy(config, kw.pop("layer_share", None)), phases, **kw)
    return r, brief(r.run(until))


# -- a decode-heavy burst ------------------------------------------------------------------


def test_burst_moves_half_the_layers_then_reverts_once_it_ends():
    r, rows = run([(3, IDLE), (20, BURST), (60, AFTER)], 60)
    # Gap 0.64 first seen at 5 s (window [3, 5]), held 3 s. While active the measured 0.9 / 0.1
    # is 0.5175 / 0.4825 once the two moved layers count on the helper: balanced, but undoing
    # it would reopen 0.8, so it stays. The burst ends at 20; from the window [19, 21] on (0.56 /
    # 0.06 measured) a revert would leave a gap under 0.5, held 5 s, past the cool-down
    # (8 + 15 = 23): reverted at 26.
    assert rows == [
        (8.0, "layers", D, P, (2, 4)),
        (26.0, "revert", D, P, "m-1"),
    ]
    start = r.log[0][1]
    # Moving m layers shifts 0.9 * m * 0.2125 of the donor's compute: m = 2 gives
    # max(0.9 - 0.3825, 0.195) = 0.5175 and 0.1 + 0.3825 = 0.4825.
    assert start.utilisations == {
        D: Utilisation(
            0.9, memory=100 / 512, num_blocks_used=100, num_blocks=512, peak_compute=0.9
        ),
        P: Utilisation(0.1, memory=0.0, num_blocks_used=0, num_blocks=512, peak_compute=0.1),
    }
    assert start.predicted_max == pytest.approx(0.5175)
    assert start.rejected == (
        Rejected(f"layers {D} -> {P} [3, 4)", "predicted max U 0.71 vs 0.52"),
        Rejected(f"layers {D} -> {P} [1, 4)", "predicted max U 0.67 vs 0.52"),
    )
    assert start.reason == "gap 0.80 for 3.0 s"
    # 100 blocks x 2 layers x 16 KiB at 100 MB/s, + 0.2 s of switch, + two of the donor's
    # 10 ms steps (STEP_WAITS: the copy's round and the switch each wait for one).
    assert start.estimated_time_s == pytest.approx(100 * 2 * 16384 / 100e6 + 0.2 + 2 * 0.01)
    revert = r.log[1][1]
    # 0.05 * (1 - 0.425) vs 0 + 0.05 * 0.425 as attributed; 0.05 vs 0 once reverted.
    assert revert.reason == "gap 0.01 < 0.2, 0.05 once reverted for 5.0 s"
    assert [m.state for m in r.migrations] == [S.DONE]


def test_a_gap_that_does_not_hold_for_sustain_s_does_nothing():
    _, rows = run([(3, IDLE), (5, BURST), (30, IDLE)], 30)
    assert rows == []


def test_balanced_by_the_migration_is_not_reverted():
    """Once active the donor still measures 0.9 (its steps wait for the moved layers) and the
    helper 0.3 (it runs them beside its steps): as attributed, 0.5175 and 0.6825, balanced;
    undoing it would open the gap again."""
    balanced = {D: (0.9, 100), P: (0.3, 0)}
    _, rows = run([(3, IDLE), (10, BURST), (60, balanced)], 60)
    assert rows == [(8.0, "layers", D, P, (2, 4))]


def test_a_helper_that_got_hot_gets_its_layers_back():
    inverted = {D: (0.2, 100), P: (0.95, 0)}
    _, rows = run([(3, IDLE), (10, BURST), (60, inverted)], 40)
    # Inverted from the window [11, 13] on (0.2 - 0.085 = 0.115 and 0.95 + 0.085 as attributed)
    # at 12 s, held 5 s: reverted at 17 s, inside the cool-down (8 + 15 = 23): a move that made
    # the pair worse is not kept for the cool-down's sake.
    assert rows == [(8.0, "layers", D, P, (2, 4)), (17.0, "revert", D, P, "m-1")]


@pytest.mark.parametrize(
    ("queued", "at_once"),
    [((900, 900), True), ((0, 900), False), ((100, 100), False)],
)
def test_a_helper_whose_own_prompts_queue_gets_its_layers_back_at_once(queued, at_once):
    """Session 29 (docs/benchmarks.md): a decode worker's layers moved onto the idle prefill
    worker 1 s into mooncake; then the trace's long prompts queued there, every decode step
    waited for the hosted layers behind them, and the "helper hotter" revert came 10 s later
    (TPOT p99 4.7 s). A helper hotter with at least ``min_queued_prefill_tokens`` of its own
    prompt tokens queued in its last two reports is undone at the first decision; one report,
    or fewer tokens, wait ``revert_after_s`` as before."""
    policy = Policy(PolicyConfig())
    m = active("m-1", D, P, 2.0)  # layers [2, 4) of the decode worker on the prefill worker
    decode = tuple(Sample(t / 2, report(0.9, 100)) for t in range(10, 21))  # 5 .. 10 s
    prefill = [Sample(t / 2, report(1.0, 0)) for t in range(10, 19)]
    prefill += [
        Sample(t, replace(report(1.0, 0), num_queued_prefill_tokens=q))
        for t, q in zip((9.5, 10.0), queued, strict=True)
    ]
    views = [WorkerView(D, 4, decode), WorkerView(P, 4, tuple(prefill))]
    outcome = policy.decide(10.0, views, [m])
    if not at_once:
        assert outcome.decisions == ()
        return
    (revert,) = outcome.decisions
    assert (revert.kind, revert.migration_id) == (ActionKind.REVERT, "m-1")
    # 1.0 + 0.3825 on the helper against 0.9 - 0.3825 on the donor, as attributed: 0.865
    assert revert.reason == "helper hotter by 0.86, 900 prompt tokens of its own queued for 0.0 s"


@pytest.mark.parametrize("automatic", [True, False])
def test_only_the_policys_own_migrations_are_reverted(automatic):
    """Session 40's probe: one started by hand was reverted ~5 s after it went ACTIVE (the gap
    between two idle workers is small). It keeps its workers out of the policy's decisions:
    no revert, and no start on them either."""
    policy = Policy(PolicyConfig())
    m = active("m-1", D, P, 0.0, automatic=automatic)
    idle = tuple(Sample(t / 2, report(0.1, 0)) for t in range(0, 61))  # 0 .. 30 s
    views = [WorkerView(D, 4, idle), WorkerView(P, 4, idle)]
    decisions = [d for t in range(1, 31) for d in policy.decide(float(t), views, [m]).decisions]
    if automatic:  # (asked again each second: m stays ACTIVE here)
        assert {(d.kind, d.migration_id) for d in decisions} == {(ActionKind.REVERT, "m-1")}
    else:
        assert decisions == []


# -- cool-down, actions in flight, oscillation ---------------------------------------------


def test_none_while_cooling_down():
    _, rows = run([(3, IDLE), (20, BURST), (30, AFTER), (90, BURST)], 90)
    # The second burst's gap is there from 31 s, but the revert at 26 cools both until 41;
    # the gap must then hold 3 s with both free.
    assert rows == [
        (8.0, "layers", D, P, (2, 4)),
        (26.0, "revert", D, P, "m-1"),
        (44.0, "layers", D, P, (2, 4)),
    ]


def test_none_on_a_worker_with_an_action_in_flight():
    policy = Policy(PolicyConfig())
    r = Run(policy, [(30, BURST)])
    r.migrations.append(active("m-9", D, P, 0.0, state=S.COPYING, automatic=False))  # by hand
    assert r.run(30) == []
    outcome = policy.decide(30.0, r.views(), r.migrations)
    assert outcome.decisions == ()
    assert outcome.rejected == (Rejected(D, "in m-9 (COPYING)"), Rejected(P, "in m-9 (COPYING)"))


def test_another_pair_moves_while_one_is_busy():
    busy_pair = {D: (0.9, 100), P: (0.1, 0), D2: (0.8, 100), P2: (0.2, 0)}
    r = Run(Policy(PolicyConfig()), [(30, busy_pair)])
    r.migrations.append(active("m-9", D, P, 0.0))
    # D2 - P2 = 0.6, from the first full window at 2 s: 5 s.
    assert brief(r.run(30)) == [(5.0, "layers", D2, P2, (2, 4))]


@pytest.mark.parametrize("period_s", [1, 2])
def test_a_load_flipping_faster_than_sustain_never_moves(period_s):
    flip = [
        (t + period_s, BURST if (t // period_s) % 2 == 0 else {D: (0.1, 100), P: (0.9, 0)})
        for t in range(0, 120, period_s)
    ]
    assert run(flip, 100)[1] == []


def test_a_load_flipping_faster_than_the_cool_down_moves_once():
    """Flips every 5 s: past sustain, so it moves once; then neither direction holds long
    enough (revert_after_s) to undo it, and a worker never acts twice within the cool-down."""
    flip = [
        (t + 5, BURST if (t // 5) % 2 == 0 else {D: (0.1, 100), P: (0.9, 0)})
        for t in range(0, 120, 5)
    ]
    assert run(flip, 100)[1] == [(5.0, "layers", D, P, (2, 4))]


@pytest.mark.parametrize("drained", [False, True])
def test_no_move_off_a_worker_that_has_just_drained(drained):
    """The decode worker's window still reads busy (0.8) but its last report has no work: the
    load it held has finished (a phase's tail), so there is nothing to move."""
    policy = Policy(PolicyConfig())
    busy = [Sample(t / 2, report(1.0, 100)) for t in range(10, 21)]  # 5 .. 10 s, 25 running
    last = Sample(10.5, report(0.0, 0) if drained else report(1.0, 100))
    idle = tuple(Sample(t / 2, report(0.0, 0)) for t in range(10, 22))
    views = [WorkerView(D, 4, (*busy, last)), WorkerView(P, 4, idle, can_donate=False)]
    assert policy.decide(7.0, views, []).decisions == ()  # the gap's hold starts
    outcome = policy.decide(10.5, views, [])
    if drained:
        assert outcome.decisions == ()
        assert Rejected(f"{D} -> {P}", f"{D} has no work at its last report") in outcome.rejected
    else:
        assert [d.describe() for d in outcome.decisions] == [f"layers {D} -> {P} [2, 4)"]


@pytest.mark.parametrize(
    ("last", "started"),
    [
        (dict(num_running_seqs=5), (False, False)),  # busy, a small batch, nothing waiting
        (dict(num_running_seqs=5, num_waiting_seqs=2), (False, True)),  # prompts wait for room
        (dict(num_running_seqs=5, num_queued_prefill_tokens=900), (False, True)),  # queued
        (dict(num_running_seqs=5, num_queued_prefill_tokens=256), (False, True)),  # from 256
        # a short prompt the router's rule had the decode worker prefill: done in one step
        (dict(num_running_seqs=5, num_queued_prefill_tokens=57), (False, False)),
        (dict(num_running_seqs=16), (True, True)),  # min_running_seqs: a batch a split pays for
        (dict(num_running_seqs=5, num_blocks_used=480, num_blocks_free=32), (True, True)),  # KV
    ],
)
@pytest.mark.parametrize("prefill", [False, True], ids=["decode-donor", "prefill-donor"])
def test_a_move_needs_a_backlog_on_the_hot_worker(last, started, prefill):
    """A decode worker stepping a few sequences reads busy ~1 at any batch size; splitting its
    layers cannot pay there (the two micro-batches each read every weight: docs/migration.md),
    and in bench compare such moves cost throughput. So the hot worker's last two reports must
    show a backlog: its KV pool the bound, or at least ``min_running_seqs`` (16) running; on a
    prefill worker also sequences waiting or prompt tokens queued, from
    ``min_queued_prefill_tokens`` (256), a prompt no longer than that being done in one step.
    A decode worker's own prompts (the router's conditional disaggregation) are no backlog:
    its two step streams overlap decodes only, and session 30 measured a split of its layers
    halving its token rate at 4 sequences with prompts queued (docs/coordinator.md)."""
    outcome = _decide_after(last, last, prefill)
    assert bool(outcome.decisions) == started[prefill]
    if not started[prefill]:
        hot, cold = (P, D) if prefill else (D, P)
        queued, waiting = last.get("num_queued_prefill_tokens", 0), last.get("num_waiting_seqs", 0)
        prompts = (
            f"{waiting} waiting, {queued} prompt tokens queued (< 256)"
            if prefill
            else f"{waiting} waiting and {queued} prompt tokens queued of its own, which a split "
            "does not take"
        )
        why = (
            f"{hot} has no backlog in its last two reports (the last: 5 running (< 16), {prompts})"
        )
        assert Rejected(f"{hot} -> {cold}", why) in outcome.rejected


@pytest.mark.parametrize(
    "blip",
    [
        dict(num_running_seqs=5, num_waiting_seqs=1, num_queued_prefill_tokens=300),
        dict(num_running_seqs=5, num_queued_prefill_tokens=900),
        dict(num_running_seqs=16),
    ],
)
def test_a_backlog_in_one_report_only_moves_nothing(blip):
    """Session 16 (docs/benchmarks.md): a decode worker stepping one sequence read busy ~1 for
    4 s; a prompt the router's rule sent it showed as waiting and queued in the one report
    before its prefill step, and its layers `[12, 30)` moved onto the prefill worker just as
    ``mixed``'s long prompts arrived there (6-8 of 32 requests missed the run's deadline). One
    report with a backlog, the one before without: nothing moves; in both: it moves (here a
    prefill worker's, whose queued prompts count)."""
    calm = dict(num_running_seqs=5)
    assert _decide_after(calm, blip, prefill=True).decisions == ()
    assert _decide_after(blip, calm, prefill=True).decisions == ()
    assert [d.describe() for d in _decide_after(blip, blip, prefill=True).decisions] == [
        f"layers {P} -> {D} [2, 4)"
    ]


def _decide_after(before_last: dict, last: dict, prefill: bool = False):
    """A hot worker busy ~1 with 5 sequences for 5 s, then two reports with these fields; an
    idle one of the other role (the decode worker, hot, by default; ``prefill``: the prefill
    worker hot, a prefill donor)."""
    policy = Policy(PolicyConfig(attention=True))
    busy = [Sample(t / 2, report(1.0, 20)) for t in range(10, 20)]  # 5 running, 20 blocks
    recent = [
        Sample(t, replace(report(1.0, 20), **f)) for t, f in ((10.0, before_last), (10.5, last))
    ]
    idle = tuple(Sample(t / 2, report(0.0, 0)) for t in range(10, 22))
    hot, cold = (P, D) if prefill else (D, P)
    views = [
        WorkerView(hot, 4, (*busy, *recent), is_prefill=prefill),
        WorkerView(cold, 4, idle, can_donate=False, is_prefill=not prefill),
    ]
    assert policy.decide(7.0, views, []).decisions == ()  # the gap's hold starts
    return policy.decide(10.5, views, [])


def test_a_helper_busy_at_its_peaks_is_no_host():
    """The prefill worker averages 0.15-0.32 over a window but is fully busy one report in six
    (a long prompt every 3 s): the decode worker's steps would wait for the hosted layers at
    each of those peaks, so as a host it counts at 1.0 and nothing moves (on the mean the gap
    would be 0.58 or more, every window). A steady helper at 0.35 does get a layer."""
    bursty = [(t / 2, {D: (0.9, 100), P: (1.0 if t % 6 == 0 else 0.15, 0)}) for t in range(1, 61)]
    steady = [(30, {D: (0.9, 100), P: (0.35, 0)})]
    assert run(bursty, 30)[1] == []
    assert run(steady, 30)[1] == [(5.0, "layers", D, P, (3, 4))]  # 0.71 / 0.54


@pytest.mark.parametrize(("queued", "started"), [((900, 900), False), ((0, 900), True)])
def test_no_move_onto_a_helper_whose_own_prompts_queue(queued, started):
    """Session 30 (docs/coordinator.md): a gap held through one workload's tail (the decode
    worker busy, the prefill worker idle) moved the decode worker's layers onto the prefill
    worker 1 s into the next, while that worker's own prompts were queued; the urgent revert
    undid it 7.6 s later. A host whose last two reports each show at least
    ``min_queued_prefill_tokens`` of its own prompt tokens queued is no host; one report is a
    prompt about to be prefilled."""
    policy = Policy(PolicyConfig())
    busy = tuple(Sample(t / 2, report(1.0, 100)) for t in range(10, 22))  # 25 running
    idle = [Sample(t / 2, report(0.0, 0)) for t in range(10, 20)]
    idle += [Sample(t, report(0.0, 0, queued=q)) for t, q in zip((10.0, 10.5), queued, strict=True)]
    views = [WorkerView(D, 4, busy), WorkerView(P, 4, tuple(idle), can_donate=False)]
    assert policy.decide(7.0, views, []).decisions == ()  # the gap's hold starts
    outcome = policy.decide(10.5, views, [])
    assert [d.kind for d in outcome.decisions] == ([ActionKind.LAYERS] if started else [])
    if not started:
        assert Rejected(P, "900 prompt tokens of its own queued") in outcome.rejected


def test_prefill_donors_are_not_chosen():
    prefill_hot = {D: (0.1, 0), P: (0.9, 0)}
    r = Run(Policy(PolicyConfig()), [(20, prefill_hot)], can_donate=lambda w: w != P)
    assert r.run(20) == []


# -- choosing k within the budget ---------------------------------------------------------


def test_k_follows_the_measured_layer_share():
    # A layer worth 0.12 of a step: m = 3 moves 0.324 -> max(0.576, 0.424); m = 2: 0.684.
    _, rows = run([(3, IDLE), (20, BURST)], 8, layer_share=0.12)
    assert rows == [(8.0, "layers", D, P, (1, 4))]


def test_layers_over_the_time_budget_are_rejected():
    # 100 blocks x 16 KiB per layer at 1 MB/s: 1.64 s per layer + 0.2 + two 10 ms steps:
    # only m = 1 fits 2.5 s.
    config = PolicyConfig(bandwidth_prior_bytes_per_s=1e6, budget_s=2.5)
    r, rows = run([(3, IDLE), (20, BURST)], 8, config=config)
    assert rows == [(8.0, "layers", D, P, (3, 4))]
    assert r.log[0][1].rejected == (
        Rejected(f"layers {D} -> {P} [2, 4)", "T 3.50 s > budget 2.5 s"),
        Rejected(f"layers {D} -> {P} [1, 4)", "T 5.14 s > budget 2.5 s"),
    )


@pytest.mark.parametrize("prefill", [False, True], ids=["decode-donor", "prefill-donor"])
def test_a_donor_in_long_steps_is_not_moved(prefill):
    """The copy and the switch each wait for the donor's step in progress. A prefill worker in
    a 2,048-token chunk (~10 s on the AMD VM; the load report gives the step so far when none
    ended in the window) cannot be moved within the 5 s budget, whatever B and T_sync say: on
    2026-12-05 such a move took 9.4 + 12.3 s of copies and a 15.8 s switch and was reverted as
    it landed. The same worker in 0.3 s steps is moved."""
    backlog = dict(num_running_seqs=16, num_waiting_seqs=1, num_queued_prefill_tokens=4096)
    long = _decide_after({**backlog, "step_time_s": 8.0}, {**backlog, "step_time_s": 8.0}, prefill)
    assert long.decisions == ()
    hot, cold = (P, D) if prefill else (D, P)
    over = [r for r in long.rejected if r.alternative.startswith(f"layers {hot} -> {cold}")]
    assert over and all("> budget 5.0 s" in r.reason for r in over), long.rejected
    short = _decide_after({**backlog, "step_time_s": 0.3}, {**backlog, "step_time_s": 0.3}, prefill)
    assert [d.kind for d in short.decisions] == [ActionKind.LAYERS]
    assert short.decisions[0].estimated_time_s > 0.6


def test_no_move_without_a_gain():
    # A layer worth 0.5 of a step: any move overshoots (m = 1: 0.45 moves, 0.55 on the helper).
    config = PolicyConfig(min_gain=0.4)
    policy = Policy(config, layer_share=0.5)
    r = Run(policy, [(20, BURST)])
    assert r.run(20) == []
    rejected = policy.decide(20.5, r.views(), []).rejected
    assert Rejected(f"layers {D} -> {P} [3, 4)", "predicted max U 0.55: gains < 0.4") in rejected


# -- attention migration ---------------------------------------------------------------------


MEMORY_HOT = {D: (0.3, 480), P: (0.2, 100)}  # U 0.94 and 0.20; decode memory-bound


def test_memory_bound_gap_moves_blocks_when_attention_is_on():
    r, rows = run([(20, MEMORY_HOT)], 10, config=PolicyConfig(attention=True, gap_high=0.9))
    # Even pools: (480 x 512 - 100 x 512) / 1024 = 190 blocks.
    assert rows == [(5.0, "attention", D, P, 190)]
    assert r.log[0][1].predicted_max == pytest.approx(290 / 512)


# A decode worker as real ones read: busy ~1 at any batch (load.py), 450 of 512 blocks used,
# the 62 free too few for any request the router holds for want of room (6 of them).
WAITING = {D: (0.97, 450, 6), P: (0.05, 0)}


def test_requests_waiting_for_its_room_make_a_busy_decode_worker_lend_blocks():
    """Its busy fraction (0.97) is no bound a move could lower, and it neither vetoes the move
    nor hides the memory bound: the requests waiting make its memory 1 (session 41: in a real
    1P1D cluster, no attention migration ever started on its own before)."""
    r, rows = run([(20, WAITING)], 10, config=PolicyConfig(attention=True))
    # Even pools: 450 x 512 / 1024 = 225 blocks; both pools then 225 / 512 used.
    assert rows == [(5.0, "attention", D, P, 225)]
    start = r.log[0][1]
    assert start.utilisations[D] == Utilisation(0.97, 1.0, 450, 512, peak_compute=0.97)
    assert start.predicted_max == pytest.approx(225 / 512)
    # The same worker with nobody waiting is compute-bound: its layers move, not blocks.
    _, rows = run([(20, {D: (0.97, 450), P: (0.05, 0)})], 10, config=PolicyConfig(attention=True))
    assert [row[1] for row in rows] == ["layers"]


def test_refilled_attention_lends_a_share_of_the_helpers_free_pool():
    """Refilled, the room lent is filled again at once by the requests waiting for it: the
    pools never even out, so the move takes ``attention_helper_share`` of the helper's free
    blocks (within the budget) instead of the 225 that even them out."""
    for share, blocks in ((0.5, 256), (0.25, 128)):
        config = PolicyConfig(attention=True, attention_refill=True, attention_helper_share=share)
        _, rows = run([(20, WAITING)], 10, config=config)
        assert rows == [(5.0, "attention", D, P, blocks)]
    # The budget still bounds it: T_sync 0.2 s + two 10 ms donor steps leave 0.03 s of a
    # 0.25 s budget, 3 MB at 100 MB/s, 45 blocks of 4 layers x 16 KiB.
    config = PolicyConfig(attention=True, attention_refill=True, budget_s=0.25)
    _, rows = run([(20, WAITING)], 10, config=config)
    assert rows == [(5.0, "attention", D, P, 45)]
    with pytest.raises(ConfigError, match="attention_helper_share must be in"):
        PolicyConfig(attention_helper_share=0.0)


def test_an_attention_move_whose_blocks_would_not_fit_back_is_not_reverted():
    """Session 41: the helper busy with the prompts that the lent room let in (0.9), the donor
    stepping its full pool (0.97): a balanced gap, which reverted the move 35 s into the load
    and recomputed 5 located sequences. Reverted, the located blocks come back to the donor's
    pool; while they do not fit, it is kept (the reason among the rejections), and once they
    do (the load gone, its sequences ended) the balanced gap reverts it."""
    policy = Policy(PolicyConfig(attention=True, attention_refill=True, cooldown_s=0.0))
    m = active("m-1", D, P, 0.0, 0, MigrationKind.ATTENTION)

    def views(t: float, donor_used: int, hosted: int) -> list[WorkerView]:
        times = [t - 1.5, t - 1.0, t - 0.5, t]
        donor = replace(report(0.97, donor_used, total=256), num_blocks_free=256 - donor_used)
        helper = replace(report(0.9, hosted, total=2048), num_hosted_blocks=hosted)
        return [
            WorkerView(D, 30, tuple(Sample(at, donor) for at in times)),
            WorkerView(P, 30, tuple(Sample(at, helper) for at in times), can_donate=False),
        ]

    decided = [policy.decide(float(t), views(float(t), 240, 479), [m]) for t in range(2, 20)]
    assert all(o.decisions == () for o in decided)
    assert Rejected("revert m-1", f"{D}'s pool cannot take its 479 located blocks back now") in (
        decided[-1].rejected
    )
    # The load gone: the donor holds 20 blocks, 100 still located (fits): after revert_after_s.
    later = [policy.decide(float(t), views(float(t), 20, 100), [m]) for t in range(20, 27)]
    rows = [
        (t, d.kind.value) for t, o in zip(range(20, 27), later, strict=True) for d in o.decisions
    ]
    assert rows == [(25, "revert")]


def test_memory_bound_gap_is_left_when_attention_is_off():
    policy = Policy(PolicyConfig(gap_high=0.9))
    r = Run(policy, [(20, MEMORY_HOT)])
    assert r.run(20) == []
    assert policy.decide(20.5, r.views(), []).rejected == (
        Rejected(f"{D} -> {P}", f"gap 0.74 < 0.9, {D} memory-bound"),
    )


def test_attention_is_weighed_against_layers_on_a_large_gap():
    config = PolicyConfig(attention=True)
    r, rows = run([(20, MEMORY_HOT)], 10, config=config)
    assert rows == [(5.0, "attention", D, P, 190)]
    # Layers move compute only: the donor stays at 480 / 512 = 0.94 of its memory.
    assert Rejected(f"layers {D} -> {P} [2, 4)", "predicted max U 0.94 vs 0.57") in (
        r.log[0][1].rejected
    )


# -- inputs and measurements -----------------------------------------------------------------


def test_utilisation_needs_enough_fresh_reports():
    config = PolicyConfig()
    samples = tuple(
        Sample(t, report(busy, 256)) for t, busy in ((1.0, 0.3), (1.5, 0.9), (2.0, 0.3))
    )
    view = WorkerView(D, 4, samples)
    assert utilisation_of(view, 2.0, config) == Utilisation(0.5, 0.5, 256, 512, peak_compute=0.9)
    assert utilisation_of(WorkerView(D, 4, samples[1:]), 2.0, config) is None  # 2 reports
    assert utilisation_of(view, 4.5, config) is None  # the last is 2.5 s old


def test_queued_prefill_counts_as_compute():
    samples = tuple(Sample(t, report(0.1, 0, queued=2048)) for t in (1.0, 1.5, 2.0))
    assert utilisation_of(WorkerView(P, 4, samples), 2.0, PolicyConfig()).compute == 0.5


def test_bandwidth_sync_and_kv_size_are_learned_from_its_migrations():
    policy = Policy(PolicyConfig())
    r = Run(policy, [(3, IDLE), (8, BURST)])
    r.run(8)
    decision = r.log[0][1]
    # It moved 6.4 MB in 0.3 s of COPYING and 0.1 s of SWITCHING; the donor had 100 blocks.
    m = active("m-1", D, P, 8.0, copying_s=0.3, switching_s=0.1, num_kv_bytes=6_400_000)
    r.migrations[:] = [m]
    policy.started(decision, "m-1")
    policy.decide(9.0, r.views(), r.migrations)
    assert policy.measurements(4) == Measurements(
        layer_share=0.2125,
        bandwidth_bytes_per_s=pytest.approx(16e6),
        sync_s=pytest.approx(0.1),
        kv_bytes_per_block_layer=32_000.0,
    )
    assert m.kind is MigrationKind.LAYERS


@pytest.mark.parametrize(
    "field, value",
    [
        ("gap_low", 0.6),
        ("gap_high", 1.5),
        ("window_s", 0.0),
        ("cooldown_s", -1.0),
        ("head_share", 1.0),
        ("num_micro_batches", 3),
        ("min_reports", 0),
    ],
)
def test_bad_config_is_refused(field, value):
    with pytest.raises(ConfigError):
        PolicyConfig(**{field: value})


def test_decision_kinds_cover_the_issue():
    assert {k.value for k in ActionKind} == {"layers", "attention", "revert"}


def test_many_workers_whose_extremes_change_every_period_still_move():
    """Four decode workers busy, two prefill workers idle: which decode worker is hottest and
    which prefill worker coolest changes every second (jitter), while the imbalance stays. The
    hold is the donor's (its gap to the coolest free host of each period), so the move comes as
    it would with one stable pair; a hold on the pair would start again every period."""
    decoders = ["decode-0", "decode-1", "decode-2", "decode-3"]
    prefills = ["prefill-0", "prefill-1"]

    def jitter(i: int) -> dict[str, tuple[float, int]]:
        load = {d: (0.86 + 0.04 * ((i + j) % 4 == 0), 100) for j, d in enumerate(decoders)}
        return load | {p: (0.1 + 0.05 * ((i + j) % 2), 0) for j, p in enumerate(prefills)}

    # The extremes do change: the hottest decode and the coolest prefill worker of each second.
    extremes = [
        (max(decoders, key=lambda d: jitter(i)[d][0]), min(prefills, key=lambda p: jitter(i)[p][0]))
        for i in range(4)
    ]
    assert len(set(extremes)) == 4
    r = Run(Policy(PolicyConfig()), [(float(t), jitter(t)) for t in range(1, 40)])
    rows = brief(r.run(39))
    assert rows[0][:2] == (5.0, "layers") and rows[0][2] in decoders and rows[0][3] in prefills
