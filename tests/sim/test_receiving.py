"""A PD decode worker's steps while a prompt bound for it is prefilled: read back from a run's
token times (``steps.decode_worker_steps``), fitted (``serving.fit_receiving_scale``) and
simulated (``ServingModel.receiving_scale``).

The "real" records of the fit are made by a small PD pair written here (the prefill worker
computes one prompt at a time, the decode worker steps at the profile's model, slower by a
known factor while a prompt is computed): what the fit must find is known."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.launcher import Mode
from services.sim.cluster import SimCluster, SimSpec
from services.sim.profile import ServingModel
from services.sim.serving import fit, fit_receiving_scale
from services.sim.steps import DecodeStep, decode_worker_steps
from tests.sim.factories import make_profile, request
from tests.sim.test_serving import simulated_report_of
from tests.sim.test_steps import step_profile


def pd_record(index: int, prompt: int, sent: float, tokens: list[float], prefill_s: float,
              decode_worker: str | None = None) -> dict:  # fmt: skip
    """A PD request as ``bench compare`` records it: its first token from the prefill worker
    (``prefill_s`` after that worker took it), the rest from its decode worker."""
    server = {"routing_s": 0.0, "num_cached_tokens": 0, "prefill_worker": "prefill-a",
              "prefill_s": prefill_s}  # fmt: skip
    if decode_worker is not None:
        server["decode_worker"] = decode_worker
    return {"index": index, "num_prompt_tokens": prompt, "sent_at_s": sent, "status": "OK",
            "chunks": [[t - sent, 1] for t in tokens], "server": server}  # fmt: skip


def test_decode_steps_are_read_and_marked_while_a_hand_off_is_computed():
    # A decodes in steps of 0.1 s; B's prompt is computed in (0.4, 0.8], and meanwhile A's
    # steps take 0.13 s. B's first decode token comes in the step (0.79, 0.89]: it joined
    # during it, so that step is left out; after it, both decode in steps of 0.1 s.
    a = pd_record(0, 10, 0.0, [0.1, 0.2, 0.3, 0.4, 0.53, 0.66, 0.79, 0.89, 0.99, 1.09], 0.1)
    b = pd_record(1, 20, 0.4, [0.8, 0.892, 0.992, 1.092], 0.4)
    steps = decode_worker_steps({"requests": [a, b]}, one_decode_worker=True)
    took = lambda s: pytest.approx(s, abs=0.005)  # noqa: E731 - to the relay's jitter
    assert steps == [
        DecodeStep(1, 12, took(0.1), False),
        DecodeStep(1, 13, took(0.1), False),
        DecodeStep(1, 14, took(0.13), True),
        DecodeStep(1, 15, took(0.13), True),
        DecodeStep(1, 16, took(0.13), True),
        DecodeStep(2, 18 + 22, took(0.1), False),
        DecodeStep(2, 19 + 23, took(0.1), False),
    ]
    # Records without their decode worker count only for a cluster of one.
    assert decode_worker_steps({"requests": [a, b]}, one_decode_worker=False) == []
    # With it, each decode worker's steps are its own: C on another worker, stepping at other
    # times, makes no step of A's; B's prompt was not computed for it, so none is marked.
    a, b = (dict(q, server=dict(q["server"], decode_worker="decode-a")) for q in (a, b))
    c = pd_record(2, 10, 0.0, [0.1, 0.25, 0.45, 0.65], 0.1, decode_worker="decode-b")
    steps = decode_worker_steps({"requests": [a, b, c]}, one_decode_worker=False)
    assert sorted(round(s.seconds, 2) for s in steps if s.context < 17) == [
        0.1, 0.1, 0.13, 0.13, 0.13, 0.2, 0.2  # A's five, then C's two (decode-b)
    ]  # fmt: skip
    assert [s.receiving for s in steps if s.seconds > 0.15] == [False, False]
    # A request prefilled on its decode worker (no prefill_s: conditional disaggregation)
    # has no decode step of its own here.
    local = pd_record(3, 10, 0.0, [0.1, 0.2, 0.3], 0.1)
    del local["server"]["prefill_s"]
    assert decode_worker_steps({"requests": [local]}, one_decode_worker=True) == []


def pd_pair_records(p, receiving: float) -> list[dict]:  # noqa: ANN001
    """Requests through a small PD pair: the prefill worker computes each 100-token prompt
    alone in 0.3 s, first come first served; the decode worker steps every joined sequence at
    ``p``'s decode model, ``receiving`` times that while a prompt is being computed."""
    arrivals = [0.45 * i + 0.1 * (i % 3) for i in range(30)]
    windows, free = [], 0.0
    for at in arrivals:
        start = max(free, at)
        free = start + 0.3
        windows.append((start, free))
    tokens = {i: [windows[i][1]] for i in range(len(arrivals))}
    pending, running, now = list(range(len(arrivals))), {}, 0.0
    while pending or running:
        for i in [i for i in pending if windows[i][1] <= now]:
            pending.remove(i)
            running[i] = 1
        if not running:
            now = windows[pending[0]][1]
            continue
        context = sum(100 + k for k in running.values())
        slower = receiving if any(s <= now < e for s, e in windows) else 1.0
        now += p.decode.time(len(running), context) * slower
        for i in list(running):
            tokens[i].append(now + 0.001 * (i % 3))
            running[i] += 1
            if running[i] == 8:
                del running[i]
    return [pd_record(i, 100, at, tokens[i], windows[i][1] - windows[i][0])
            for i, at in enumerate(arrivals)]  # fmt: skip


def test_the_receiving_scale_is_fitted_on_the_decode_workers_steps():
    p = step_profile()
    report = simulated_report_of(("static-pd",))
    report["runs"] = [{"mode": "static-pd", "workload": "mixed",
                       "requests": pd_pair_records(p, 1.25)}]  # fmt: skip
    found = fit_receiving_scale(report, p)
    assert found is not None
    scale, marked, unmarked = found
    assert scale == pytest.approx(1.25, rel=0.03)
    assert marked >= 6 and unmarked >= 6
    # sim serving keeps it (the replays then fit decode_scale with it) and says how.
    fitted, _, _ = fit(report, p, traces_dir=None)
    assert fitted.serving.receiving_scale == scale
    assert f"receiving x{scale:.3f} from {marked} decode steps" in fitted.serving.source
    # Steps of one kind only (the decode worker never stepped while a prompt was computed):
    # nothing to compare, no receiving scale.
    report["runs"][0]["requests"] = pd_pair_records(p, 1.25)[:1]
    assert fit_receiving_scale(report, p) is None
    assert fit(report, p, traces_dir=None)[0].serving.receiving_scale == 1.0


def decode_step_gaps(cluster: SimCluster, worker_id: str) -> list[float]:
    """Record the times the worker's steps hand out tokens; the gaps, once run."""
    w, times = cluster.workers[worker_id], []
    passed = w.on_token

    def on_token(seq) -> None:  # noqa: ANN001
        if not times or times[-1] != cluster.loop.now:
            times.append(cluster.loop.now)
        passed(seq)

    w.on_token = on_token
    return times


def test_a_decode_step_costs_more_while_a_prompt_for_it_is_prefilled():
    # make_profile: prefill 10 ms a token, decode 0.1 s a step, a block's KV 20 ms (10 ms a
    # layer). A (16 tokens) is prefilled in (0, 0.16], its last layer's KV arrives at 0.175
    # and it decodes in steps of 0.1 s. B's 50-token prompt is computed in (0.5, 1.0]: A's
    # steps that start meanwhile (at 0.575, 0.775 and 0.975) take 0.2 s with receiving_scale
    # 2; the rest 0.1 s.
    p = replace(make_profile(), serving=ServingModel(receiving_scale=2.0))
    cluster = SimCluster(SimSpec(Mode.STATIC_PD, 2, 1), p)
    [decode_id] = [w for w in cluster.workers if w.startswith("decode")]
    times = decode_step_gaps(cluster, decode_id)
    a, b = cluster.run([request(0, 0.0, 16, 12), request(1, 0.5, 50, 2)])
    assert a.status == b.status == "OK"
    assert times[:9] == pytest.approx(
        [0.275, 0.375, 0.475, 0.575, 0.775, 0.975, 1.175, 1.275, 1.375]
    )
    # The engine alone (the default): every step 0.1 s.
    cluster = SimCluster(SimSpec(Mode.STATIC_PD, 2, 1), make_profile())
    times = decode_step_gaps(cluster, decode_id)
    cluster.run([request(0, 0.0, 16, 12), request(1, 0.5, 50, 2)])
    assert times[:6] == pytest.approx([0.275, 0.375, 0.475, 0.575, 0.675, 0.775])


def test_only_the_decode_worker_a_prompt_is_handed_to_is_receiving():
    # One prefill worker, two decode workers: A and C decode on one each; B's prompt,
    # computed in (0.5, 1.0], goes to one of them. Only that one's steps slow down.
    p = replace(make_profile(), serving=ServingModel(receiving_scale=2.0))
    cluster = SimCluster(SimSpec(Mode.STATIC_PD, 3, 1), p)
    decode_ids = sorted(w for w in cluster.workers if w.startswith("decode"))
    gaps = {w: decode_step_gaps(cluster, w) for w in decode_ids}
    a, c, b = cluster.run([request(0, 0.0, 16, 14), request(2, 0.0, 16, 14),
                           request(1, 0.5, 50, 2)])  # fmt: skip
    assert a.decode_worker != c.decode_worker  # the router spread them (precondition)
    slow = [w for w in decode_ids if max(_gaps(gaps[w][:8])) > 0.15]
    assert slow == [b.decode_worker]
    # and on a colocated cluster nobody receives a hand-off: no step slows
    cluster = SimCluster(SimSpec(Mode.COLOCATED, 2), p)
    times = {w: decode_step_gaps(cluster, w) for w in cluster.workers}
    cluster.run([request(0, 0.0, 16, 6), request(1, 0.5, 50, 2)])
    assert all(w.receiving == 0 for w in cluster.workers.values())
    assert max(g for t in times.values() for g in _gaps(t)) < 0.6  # B's own 0.5 s prompt step


def _gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]
