"""``banaserve sim serving COMPARE.json``: fit a profile's serving overhead on a real run.

``sim calibrate`` times the engine's steps in-process, in CPU time. A real worker's step takes
longer: its engine loop, gRPC and token streaming, and the two cores it shares with the router,
Redis and the benchmark's client (docs/simulator.md, "Validate"). Those costs are not
modelled one by one; they are measured here as two multipliers (``ServingModel``) of the
calibrated step times, fitted on one real ``bench compare`` run and then held fixed — so a
``sim validate`` against *another* run is a test of the model, not of the fit:

1. the simulator replays the run's static-PD (and colocated) rows (``validate.compare_rows``: the same
   requests, cluster and deadlines) with the profile's current multipliers;
2. ``decode_scale`` is multiplied by the median over those rows of real TPOT p50 over simulated
   TPOT p50, and ``prefill_scale`` by the square root of the same ratio of TTFT p50 (a TTFT is
   queueing plus prefill, and the queue grows faster than the step: a full step each time
   overshoots); both start at 1.0;
3. repeated until both ratios are within 1 % of 1 (at most ``--iterations`` times); the profile
   is written back with its ``serving`` set (``--out``: elsewhere) and the fitted run's rows
   printed — in-sample errors, which say how well two numbers can fit; the test is the next run.

A PD worker's costs (the flat ``ServingModel`` fields) are fitted on the static-PD rows: a
prefill worker's and a decode worker's steps are each of one kind, so each multiplier sees its
own steps (banaserve adds the store path and migrations, which the simulator models apart). The
same costs serve every worker unless ``--colocated-apart`` fits a colocated worker's
(``ServingModel.mixed``) on the colocated rows too: it hands no KV off layer by layer and
imports none. That paid while the local cluster's data planes were UCX (a PD worker 1.1–1.2×
plus 65–90 ms a prefill step and 1.3–1.4× a decode step, a colocated one close to the engine;
held out, 25 → 27, 18 → 23 and 28 → 29 of 42 colocated cells within target) and did not once
they were TCP (the two kinds' costs within a few percent; 30 → 22 of 42 on the one held-out
pair): docs/simulator.md, session 13. Off by default; a run without colocated rows, or whose
colocated rows have nothing to fit on, leaves ``mixed`` unset either way. A colocated worker's
two scales are fitted on its own steps where the run's token times pin down enough of them
(``steps.py``: at least ``MIN_STEP_POINTS`` decode-only steps and as many with prompts), by
least squares of ``real = decode_scale · decode model + prefill_scale · (prefill model − its
fixed cost)`` — a mixed step's time as the simulator computes it — and held fixed; else as
below, from its lone prefills and the TPOT ratio.

A prefill worker's per-step cost is paid once per prompt a step completes: its layer hook
exports and sends each such prompt's KV layer by layer, one prompt at a time
(``SimWorker.step_time``). On the real runs of sessions 18-20 a step of 2, 3, 4 and 5 prompts
ran 24, 16, 108 and 33 ms (medians) past the once-a-step model, flat (-82 to +22 ms) once each
prompt pays it; held out on four runs, 1364 -> 1387 of 1512 cells within target, and the
saturated mixed runs' static-PD TTFT p50 within 4-8 % instead of 13 %.

The prefill side, where the run recorded enough of them, is fitted on the real worker's own
steps instead: each request's server-side ``prefill_s`` (the prefill worker's time from the
step that took the prompt to its first token) is a step time when no other request's window
overlapped it (on the 2026-12-02 runs a 13-token prompt scheduled beside others read 2.9 s, so
only *lone* requests count; a colocated worker records no ``prefill_s``: its prefill is the
TTFT past the router's ``routing_s``, lone when no other request is in flight on it). Their real time against the calibrated model is a line, not a
ratio — on one run a 27–38-token prompt's step ran 1.6–2.8× its model, a 398–1,118-token
one's 1.0–1.3× (the per-layer KV hand-off and the step's loop cost the same whatever the
prompt) — so ``real = prefill_step_s · steps +
prefill_scale · model`` is fitted by least squares (``ServingModel.prefill_step_s``), and the
replays then fit ``decode_scale`` alone. The router's own median ``routing_s`` (its work and
the decode worker's reservation, 2-40 ms a request on a loaded run) becomes ``route_s``.

A PD decode worker's steps are slower while a prefill worker computes a prompt bound for it
(its KV streams in layer by layer meanwhile): on this machine's runs 1.20x the model against
1.05x otherwise (docs/simulator.md, session 20). One ``decode_scale`` averaged the two, too
slow for a workload whose decodes mostly run beside an idle prefill worker and too fast for one
whose prefill worker never rests. Where the run's token times pin down enough of both kinds
(``steps.decode_worker_steps``: at least ``MIN_STEP_POINTS`` each), their ratio of medians of
real over modelled step time becomes ``receiving_scale``, held fixed while the replays fit
``decode_scale``.

A banaserve PD worker is a little dearer than a static-PD one on this machine: the store node,
Redis and the coordinator share its two cores, and its prefill worker asks the store before
each prompt. On the real runs of sessions 18-20 its lone prefill steps cost 3-11 ms a step more
and its decode steps up to ~2 % more, and its TTFT p50 ran ~5-10 % above static PD's where the
simulator, with one set of costs, gave both modes the same. ``--banaserve-apart`` fits its own
set (``ServingModel.store``) the same way as static PD's on the banaserve rows that made no
migration (a move changes both workers' steps; ``_unmigrated``), and the simulator gives it to
the PD workers of a cluster with a store (docs/simulator.md, session 21). Off by default.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

from bench.workloads_trace import DEFAULT_TRACES_DIR
from services.common.arg_types import path_arg, positive
from services.common.errors import ConfigError
from services.common.paths import output_file
from services.launcher import Mode
from services.sim.calibrate import find_profile
from services.sim.fit import fit_step_overhead, fit_two_terms
from services.sim.inputs import read_compare
from services.sim.profile import Profile, ServingModel, StepCosts
from services.sim.steps import decode_worker_steps, worker_steps
from services.sim.validate import compare_rows, render, up_spec

# The mode whose rows fit a PD worker's costs (the flat ``ServingModel`` fields), the one
# whose rows fit a colocated worker's (``ServingModel.mixed``) and the one whose rows fit a
# banaserve PD worker's (``ServingModel.store``) when the run has them and the fit is asked for.
PD_MODE, MIXED_MODE, BANA_MODE = "static-pd", "colocated", "banaserve"
# Fewer lone prefill steps than this (or all of one size): the TTFT ratio fits prefill_scale.
MIN_STEP_POINTS = 6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("compare_json", type=path_arg, help="the `bench compare` JSON to fit on")
    p.add_argument("--profile", type=path_arg, default=None,
                   help="sim profile to start from (default: as `sim validate` finds it)")  # fmt: skip
    p.add_argument("--out", type=path_arg, default=None,
                   help="write here (default: over --profile)")  # fmt: skip
    p.add_argument("--iterations", type=positive(int), default=8,
                   help="at most this many replays")  # fmt: skip
    p.add_argument("--colocated-apart", action="store_true",
                   help="fit a colocated worker's costs on the colocated rows, apart from a PD "
                        "worker's (default: one set, fitted on static PD, for every worker)")  # fmt: skip
    p.add_argument("--banaserve-apart", action="store_true",
                   help="fit banaserve's PD workers' costs on its rows without a migration, "
                        "apart from static PD's (the store's and coordinator's share of the "
                        "cores; default: static PD's for both)")  # fmt: skip
    p.add_argument("--traces-dir", type=path_arg, default=DEFAULT_TRACES_DIR)


def ratios(rows: list[dict], mode: str = PD_MODE) -> tuple[float, float]:
    """Median real / simulated TTFT p50 and TPOT p50 over ``mode``'s rows."""
    fit_rows = [r for r in rows if r["mode"] == mode and not _migrated(r["real"])
                and not r["sim"].get("num_migrations")]  # fmt: skip

    def median(key: str) -> float:
        values = [r["real"][key] / r["sim"][key] for r in fit_rows
                  if r["real"].get(key) and r["sim"].get(key)]  # fmt: skip
        if not values:
            raise ConfigError(f"no {mode} row of the compare run has a {key} to fit on")
        return statistics.median(values)

    return median("ttft_p50_ms"), median("tpot_p50_ms")


def _migrated(row: dict) -> bool:
    """Whether a real workload's table row or run made a migration or began with one live:
    banaserve's costs are fitted on its rows without one (a move changes both workers' steps)."""
    moved = row.get("migrations") or {}
    return bool(row.get("num_migrations") or moved.get("num_started")
                or moved.get("active_at_start"))  # fmt: skip


def _unmigrated(report: dict) -> dict:
    """``report`` without its runs and rows that made a migration."""
    return {**report, "runs": [r for r in report.get("runs", []) if not _migrated(r)],
            "table": [r for r in report.get("table", []) if not _migrated(r)]}  # fmt: skip


def prefill_model_s(profile: Profile, num_prompt: int, num_cached: int) -> tuple[float, int]:
    """The calibrated model's time for a prompt after ``num_cached`` cached tokens, in chunks of
    the engine's token budget as its scheduler cuts them, and the number of steps."""
    total, done, steps = 0.0, num_cached, 0
    while done < num_prompt:
        n = min(profile.max_num_batched_tokens, num_prompt - done)
        total += profile.prefill.time(n, n * (done + n))
        done, steps = done + n, steps + 1
    return total, steps


def _prefill_windows(q: dict, mode: str) -> tuple[float, float, float, float] | None:
    """(start, end) of a request's prefill on the client's clock and (start, end) of the span
    in which it shares its worker's steps with another's prefill; None: not recorded.

    A prefill worker records ``prefill_s`` (from the step that took the prompt to the first
    token) and does nothing but prefill: only another's prefill shares a step. A colocated
    worker records none: its prefill is the TTFT past the router's ``routing_s``, and it also
    steps every request it is decoding, so another's whole life shares its steps."""
    server = q.get("server") or {}
    if q.get("ttft_s") is None:
        return None
    end = q["sent_at_s"] + q["ttft_s"]
    if mode == MIXED_MODE:
        real = q["ttft_s"] - (server.get("routing_s") or 0.0)
        if real <= 0:
            return None
        return end - real, end, q["sent_at_s"], q["sent_at_s"] + (q.get("e2e_s") or q["ttft_s"])
    if not server.get("prefill_s"):
        return None
    return end - server["prefill_s"], end, end - server["prefill_s"], end


def lone_prefill_steps(
    report: dict, profile: Profile, mode: str = PD_MODE
) -> list[tuple[int, float, float]]:
    """(steps, model s, real s) of every ``mode`` request whose prefill shared its worker's
    steps with no other request (``_prefill_windows``): a step of its own."""
    points = []
    for run in report.get("runs", []):
        if run.get("mode") != mode:
            continue
        spans = []
        for q in run.get("requests", []):
            w = _prefill_windows(q, mode)
            if w is not None:
                spans.append((w, (q.get("server") or {}).get("prefill_worker"), q))
        for (start, end, _, _), worker, q in spans:
            if any(o is not q and wo == worker and s < end and e > start
                   for (_, _, s, e), wo, o in spans):  # fmt: skip
                continue
            cached = q["server"].get("num_cached_tokens", 0)
            model, steps = prefill_model_s(profile, q["num_prompt_tokens"], cached)
            if steps:
                points.append((steps, model, end - start))
    return points


def median_routing_s(report: dict) -> float:
    """The router's median ``routing_s`` over the run's static-PD requests (0: none recorded)."""
    values = [
        q["server"]["routing_s"]
        for run in report.get("runs", [])
        if run.get("mode") == PD_MODE
        for q in run.get("requests", [])
        if (q.get("server") or {}).get("routing_s") is not None
    ]
    return statistics.median(values) if values else 0.0


def fit_prefill_steps(points: list[tuple[int, float, float]]) -> tuple[float, float] | None:
    """(prefill_step_s, prefill_scale) of ``real = step_s * steps + scale * model`` by least
    squares; None with too few points or no spread in size to tell the two apart."""
    if len(points) < MIN_STEP_POINTS:
        return None
    models = [p[1] for p in points]
    if max(models) < 2 * min(models):
        return None
    step_s, scale = fit_step_overhead(points)
    if scale <= 0:
        return None
    return step_s, scale


def mixed_step_points(report: dict, profile: Profile) -> list[tuple[float, float, float]]:
    """(decode model s, prompt model s, real s) of every step of the run's colocated workers
    that their token times pin down (``steps.py``): the decode model at the step's batch and
    context, and for its prompts the prefill model less its fixed cost (a mixed step pays the
    decode step's; ``SimWorker.step_time``)."""
    p, d = profile.prefill, profile.decode
    points = []
    for run in report.get("runs", []):
        if run.get("mode") != MIXED_MODE:
            continue
        for s in worker_steps(run):
            prompt = p.time(s.prompt_tokens, s.attention_work) - p.a if s.prompt_tokens else 0.0
            points.append((d.time(s.num_decodes, s.context), prompt, s.seconds))
    return points


def fit_mixed_steps(points: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    """(decode_scale, prefill_scale) fitted on real steps; None with fewer than
    ``MIN_STEP_POINTS`` steps of each kind (decode-only and with prompts) to tell them apart."""
    with_prompts = sum(1 for _, prompt, _ in points if prompt > 0)
    if with_prompts < MIN_STEP_POINTS or len(points) - with_prompts < MIN_STEP_POINTS:
        return None
    decode, prefill = fit_two_terms(points)
    if decode <= 0 or prefill <= 0:
        return None
    return decode, prefill


def fit_receiving_scale(
    report: dict, profile: Profile, mode: str = PD_MODE
) -> tuple[float, int, int] | None:
    """A PD decode worker's steps while it receives a hand-off against its steps otherwise
    (``ServingModel.receiving_scale``): the ratio of the medians of real over modelled step
    time in the two kinds of the ``mode`` rows' decode steps (``steps.decode_worker_steps``),
    and how many of each; None with fewer than ``MIN_STEP_POINTS`` of either."""
    d = profile.decode
    one = up_spec(Mode(mode), report.get("config", {})).num_decode == 1
    ratios: dict[bool, list[float]] = {True: [], False: []}
    for run in report.get("runs", []):
        if run.get("mode") == mode:
            for s in decode_worker_steps(run, one):
                ratios[s.receiving].append(s.seconds / d.time(s.num_decodes, s.context))
    if min(len(ratios[True]), len(ratios[False])) < MIN_STEP_POINTS:
        return None
    scale = statistics.median(ratios[True]) / statistics.median(ratios[False])
    return scale, len(ratios[True]), len(ratios[False])


def _fittable(report: dict, mode: str) -> bool:
    """Whether some real ``mode`` row has the TTFT and TPOT p50 that its fit compares."""
    return any(r["mode"] == mode and r.get("ttft_p50_ms") and r.get("tpot_p50_ms")
               for r in report.get("table", []))  # fmt: skip


def _serving(costs: dict[str, StepCosts], route_s: float) -> ServingModel:
    pd = costs[PD_MODE]
    return ServingModel(pd.prefill_scale, pd.decode_scale, prefill_step_s=pd.prefill_step_s,
                        route_s=route_s, mixed=costs.get(MIXED_MODE),
                        receiving_scale=pd.receiving_scale, store=costs.get(BANA_MODE))  # fmt: skip


def _refit(costs: StepCosts, rows: list[dict], mode: str, prefill_fitted: bool) -> StepCosts:
    """``costs`` moved by one replay's ratios; the same object when they are within 1 %."""
    ttft, tpot = ratios(rows, mode)
    if abs(tpot - 1) < 0.01 and (prefill_fitted or abs(ttft - 1) < 0.01):
        return costs
    costs = replace(costs, decode_scale=costs.decode_scale * tpot)
    if not prefill_fitted:
        costs = replace(costs, prefill_scale=costs.prefill_scale * math.sqrt(ttft))
    return costs


def fit(
    report: dict,
    profile: Profile,
    traces_dir: Path,
    iterations: int = 8,
    colocated_apart: bool = False,
    banaserve_apart: bool = False,
) -> tuple[Profile, list[dict], int]:
    """The profile with its serving overhead fitted on ``report`` (a PD worker's on the
    static-PD rows; with ``colocated_apart`` a colocated worker's on the colocated rows, with
    ``banaserve_apart`` a banaserve PD worker's on the banaserve rows without a migration, when
    there are any), the replay of the run with it, and how many replays the fit took."""
    if iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}")
    modes = {r["mode"] for r in report.get("table", [])}
    if PD_MODE not in modes:
        raise ConfigError("the compare run has no static-pd rows to fit the serving overhead on")
    costs, lone, stepped = {}, {}, {}
    receiving: dict[str, tuple[float, int, int]] = {}
    apart = {MIXED_MODE: colocated_apart, BANA_MODE: banaserve_apart}
    own = _unmigrated(report)  # what each mode's costs are fitted on
    for mode in (PD_MODE, MIXED_MODE, BANA_MODE):
        if mode not in modes or (mode != PD_MODE and not (apart[mode] and _fittable(own, mode))):
            continue
        if mode == MIXED_MODE:
            points = mixed_step_points(report, profile)
            scales = fit_mixed_steps(points)
            if scales is not None:
                costs[mode] = StepCosts(prefill_scale=scales[1], decode_scale=scales[0])
                stepped[mode] = len(points)
                continue
        points = lone_prefill_steps(own, profile, mode)
        steps_fit = fit_prefill_steps(points)
        costs[mode] = StepCosts(*(() if steps_fit is None else (steps_fit[1], 1.0, steps_fit[0])))
        lone[mode] = len(points) if steps_fit is not None else None
        if mode != MIXED_MODE and (found := fit_receiving_scale(own, profile, mode)) is not None:
            costs[mode] = replace(costs[mode], receiving_scale=found[0])
            receiving[mode] = found
    route_s = median_routing_s(report)
    for done in range(1, iterations + 1):  # noqa: B007 - the count is returned
        rows = compare_rows(report, replace(profile, serving=_serving(costs, route_s)), traces_dir)
        moved = {m: c if m in stepped else _refit(c, rows, m, lone[m] is not None)
                 for m, c in costs.items()}  # fmt: skip
        if all(moved[m] is costs[m] for m in costs):
            break  # these rows are the fitted profile's
        costs = moved
    else:  # not within 1 %: the replay of the last update
        rows = compare_rows(report, replace(profile, serving=_serving(costs, route_s)), traces_dir)
    config, machine = report.get("config", {}), report.get("machine", {})

    def how_scales(m: str) -> str:
        if m in stepped:
            return f"both scales from {stepped[m]} of their workers' steps"
        return "prefill from " + (
            f"{lone[m]} lone steps" if lone[m] is not None else "the TTFT ratio"
        )

    def how(m: str) -> str:
        told = how_scales(m)
        if m in receiving:
            r = receiving[m]
            told += (f"; receiving x{r[0]:.3f} from {r[1]} decode steps while "
                     f"a hand-off was computed and {r[2]} without")  # fmt: skip
        return told

    fitted = " and ".join(f"{m} rows ({how(m)})" for m in costs)
    source = (
        f"fitted on the {fitted} of a bench compare of {machine.get('date', '?')} "
        f"(rate x{config.get('rate_scale', 1.0)}, {config.get('duration_s', '?')} s) at "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {done} replays"
    )
    serving = replace(_serving(costs, route_s), source=source)
    return replace(profile, serving=serving), rows, done


def run(args: argparse.Namespace) -> int:
    report = read_compare(args.compare_json)
    model = report["config"].get("model", "smollm2-135m")
    path = find_profile(model, args.profile)
    loaded = Profile.load(path)
    out = output_file(args.out or path, "--out")  # before the replays
    profile, rows, _ = fit(
        report,
        loaded,
        args.traces_dir,
        args.iterations,
        args.colocated_apart,
        args.banaserve_apart,
    )
    profile.save(out)
    s = profile.serving
    print(render(rows))
    print()
    print(s.describe())
    print(f"wrote {out}")
    return 0
