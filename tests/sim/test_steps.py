"""A colocated worker's steps read back from token times (``steps.py``), and the colocated
costs ``sim serving`` fits on them.

The "real" records are made by a small engine written here (every arrived prompt whole in the
next step, every running sequence one token a step, step times from the profile's model at known
scales): what the reading must find is known step by step, and so are the scales."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.launcher import Mode
from services.router.registry import WorkerRole
from services.sim.cluster import SimCluster, SimSpec
from services.sim.events import EventLoop
from services.sim.profile import DecodeModel, PrefillModel
from services.sim.serving import fit, fit_mixed_steps, mixed_step_points
from services.sim.steps import StepPoint, worker_steps
from services.sim.worker import SimWorker
from tests.sim.factories import make_profile, request
from tests.sim.test_serving import simulated_report
from tests.sim.test_validate import profile as validate_profile


def record(index: int, prompt: int, sent: float, tokens: list[float], routing: float = 0.0,
           worker: str = "mixed-a", cached: int = 0) -> dict:  # fmt: skip
    """A request as ``bench compare`` records it: chunk times since it was sent."""
    return {
        "index": index,
        "num_prompt_tokens": prompt,
        "sent_at_s": sent,
        "status": "OK",
        "chunks": [[t - sent, 1] for t in tokens],
        "server": {"routing_s": routing, "num_cached_tokens": cached, "prefill_worker": worker},
    }


def test_steps_are_read_from_the_token_times():
    # A decodes from 0.1; B arrives at 0.25 during the step (0.2, 0.3] and is prefilled whole
    # in (0.3, 1.0] beside A's decode. Tokens reach the client up to 4 ms after the step end.
    a = record(0, 10, 0.0, [0.1, 0.202, 0.3, 1.003, 1.1, 1.2])
    b = record(1, 200, 0.25, [1.0, 1.104, 1.201], cached=40)
    steps = worker_steps({"requests": [a, b]})
    took = lambda s: pytest.approx(s, abs=0.005)  # noqa: E731 - to the relay's jitter
    assert steps == [
        StepPoint(1, 11, 0, 0, took(0.1)),
        StepPoint(1, 12, 0, 0, took(0.1)),
        StepPoint(1, 13, 160, 160 * 200, took(0.7)),  # uncached x context
        StepPoint(2, 14 + 201, 0, 0, took(0.1)),
        StepPoint(2, 15 + 202, 0, 0, took(0.1)),
    ]


def test_steps_the_records_do_not_pin_down_are_left_out():
    # C: the worker idle before its prompt (no sequence in both clusters: a pause, not a step).
    c = record(0, 10, 2.0, [2.1, 2.2, 2.3, 2.4, 2.6, 2.7])
    # D reached the worker at 2.15, before the step (2.2, 2.4]; its first token only at 2.6:
    # a chunk of it may be in (2.2, 2.4], and in (2.4, 2.6] it may not be whole. Both out.
    d = record(1, 3000, 2.1, [2.6, 2.7], routing=0.05)
    steps = worker_steps({"requests": [c, d]})
    assert [(s.num_decodes, s.prompt_tokens, round(s.seconds, 3)) for s in steps] == [
        (1, 0, 0.1),  # (2.1, 2.2]: C alone, D not there yet
        (2, 0, 0.1),  # (2.6, 2.7]
    ]
    # E, alive across (0.2, 0.3] without a token in it (preempted, or the reading split the
    # step): that step is left out, and so is the one F's two-token chunk sits in.
    e = record(0, 10, 0.0, [0.1, 0.2, 0.4, 0.5, 0.6, 0.7])
    f = record(1, 10, 0.0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    f["chunks"][5:7] = [[0.65, 2]]
    steps = worker_steps({"requests": [e, f]})
    assert [round(s.seconds, 3) for s in steps] == [0.1, 0.1, 0.1]  # ends 0.2, 0.4, 0.5
    # Another worker's tokens never make a step of this one (together: steps of 0.05 s).
    g = record(2, 10, 0.0, [0.15, 0.25, 0.35], worker="mixed-b")
    steps = worker_steps({"requests": [g, record(0, 10, 0.0, [0.1, 0.2])]})
    assert [round(s.seconds, 3) for s in steps] == [0.1, 0.1, 0.1]


def step_profile():
    return replace(validate_profile(), prefill=PrefillModel(0.05, 0.002, 1e-7),
                   decode=DecodeModel(0.05, 0.002, 1e-5))  # fmt: skip


def engine_records(p, prefill_scale: float, decode_scale: float) -> list[dict]:  # noqa: ANN001
    """Requests through a small colocated engine whose steps cost ``p``'s model at these
    scales (a mixed step: the decode step's, plus the prefill model past its fixed cost)."""
    arrivals = [(0.37 * i, 40 + 97 * (i % 5), 6 + (i % 4)) for i in range(24)]
    pending = list(range(len(arrivals)))
    tokens: dict[int, list[float]] = {i: [] for i in pending}
    running: dict[int, int] = {}  # index -> output tokens so far
    now = 0.0
    while pending or running:
        arrived = [i for i in pending if arrivals[i][0] <= now]
        if not arrived and not running:
            now = arrivals[pending[0]][0]
            continue
        n = sum(arrivals[i][1] for i in arrived)
        attention = sum(arrivals[i][1] ** 2 for i in arrived)
        context = sum(arrivals[i][1] + k for i, k in running.items())
        t = 0.0
        if running:
            t = decode_scale * p.decode.time(len(running), context)
            if arrived:
                t += prefill_scale * (p.prefill.time(n, attention) - p.prefill.a)
        else:
            t = prefill_scale * p.prefill.time(n, attention)
        now += t
        for i in list(running):
            tokens[i].append(now + 0.001 * (i % 3))
            running[i] += 1
            if running[i] == arrivals[i][2]:
                del running[i]
        for i in arrived:
            pending.remove(i)
            tokens[i].append(now + 0.001 * (i % 3))
            running[i] = 1
    return [record(i, arrivals[i][1], arrivals[i][0], tokens[i]) for i in range(len(arrivals))]


def test_a_colocated_worker_is_fitted_on_its_steps():
    p = step_profile()
    report = simulated_report()
    report["runs"] = [{"mode": "colocated", "workload": "mixed",
                       "requests": engine_records(p, 1.4, 0.9)}]  # fmt: skip
    points = mixed_step_points(report, p)
    with_prompts = [q for q in points if q[1] > 0]
    assert len(with_prompts) >= 6 and len(points) - len(with_prompts) >= 6
    # The engine's own step times, recovered to the clock's jitter (a 2 ms spread).
    decode_scale, prefill_scale = fit_mixed_steps(points)
    assert decode_scale == pytest.approx(0.9, rel=0.03)
    assert prefill_scale == pytest.approx(1.4, rel=0.03)
    # sim serving --colocated-apart takes them as the colocated worker's costs, held fixed.
    fitted, _, _ = fit(report, p, traces_dir=None, colocated_apart=True)
    mixed = fitted.serving.costs(mixed=True)
    assert (mixed.decode_scale, mixed.prefill_scale) == (decode_scale, prefill_scale)
    assert mixed.prefill_step_s == 0.0
    assert f"colocated rows (both scales from {len(points)} of their workers' steps)" in (
        fitted.serving.source
    )
    # Too few steps of either kind to tell the two scales apart: no step fit.
    decode_only = [q for q in points if q[1] == 0]
    assert fit_mixed_steps(decode_only + with_prompts[:5]) is None
    assert fit_mixed_steps(with_prompts + decode_only[:5]) is None


def test_a_mixed_step_pays_the_decode_steps_fixed_cost():
    # Decode 0.1 s a step whatever the batch; prefill 0.15 s + 10 ms a token. A's decode and
    # B's 20-token prompt in one step: 0.1 + 0.2 = 0.3 s (the prefill's 0.15 is not paid).
    p = make_profile(prefill=PrefillModel(0.15, 0.01, 0.0))
    cluster = SimCluster(SimSpec(Mode.COLOCATED, 1), p)
    a, b = cluster.run([request(0, 0.0, 20, 4), request(1, 0.4, 20, 2)])
    assert a.first_token_s == pytest.approx(0.35)  # a prompt alone pays its fixed cost
    # B arrives during A's first decode step (0.35, 0.45]; it runs in the next: (0.45, 0.75].
    assert b.first_token_s == pytest.approx(0.75)


def test_a_worker_reports_as_the_real_engine_loop_publishes():
    """services/engine/loop.py: the meter counts the step in flight as busy; the report's
    queue and batch are the snapshot published after the last step or command, and a command
    sent during a step runs (and shows) only once the step ended."""
    loop = EventLoop()
    w = SimWorker("mixed-000", WorkerRole.MIXED, make_profile(), loop, max_model_len=2048)
    loop.after(0.0, lambda: w.add("a", list(range(1, 51)), 3))  # a 0.5 s prefill step
    loop.run(0.3)
    r = w.load()
    assert r.busy_fraction == pytest.approx(0.3)  # 0.3 s of the 1 s window, still running
    assert (r.num_queued_prefill_tokens, r.num_running_seqs, r.num_waiting_seqs) == (50, 0, 1)
    assert r.admitted == ("a",)  # the first report to count a names it, once
    w.add("b", list(range(100, 120)), 2)  # during the step: not in the reports yet
    r = w.load()
    assert (r.num_queued_prefill_tokens, r.admitted) == (50, ())
    loop.run(0.55)  # a's step ended at 0.5; b's prompt and a's first decode now run
    r = w.load()
    assert (r.num_queued_prefill_tokens, r.num_running_seqs, r.num_waiting_seqs) == (20, 1, 1)
    assert r.busy_fraction == pytest.approx(0.55)
    assert r.admitted == ("b",)
