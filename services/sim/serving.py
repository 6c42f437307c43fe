"""``banaserve sim serving COMPARE.json``: fit a profile's serving overhead on a real run.

``sim calibrate`` times the engine's steps in-process, in CPU time. A real worker's step takes
longer: its engine loop, gRPC and token streaming, and the two cores it shares with the router,
Redis and the benchmark's client (docs/simulator.md, "Validation"). Those costs are not
modelled one by one; they are measured here as two multipliers (``ServingModel``) of the
calibrated step times, fitted on one real ``bench compare`` run and then held fixed — so a
``sim validate`` against *another* run is a test of the model, not of the fit:

1. the simulator replays the run's static-PD rows (``validate.compare_rows``: the same
   requests, cluster and deadlines) with the profile's current multipliers;
2. ``decode_scale`` is multiplied by the median over those rows of real TPOT p50 over simulated
   TPOT p50, and ``prefill_scale`` by the square root of the same ratio of TTFT p50 (a TTFT is
   queueing plus prefill, and the queue grows faster than the step: a full step each time
   overshoots); both start at 1.0;
3. repeated until both ratios are within 1 % of 1 (at most ``--iterations`` times); the profile
   is written back with its ``serving`` set (``--out``: elsewhere) and the fitted run's rows
   printed — in-sample errors, which say how well two numbers can fit; the test is the next run.

Static PD only: a prefill worker's and a decode worker's steps are each of one kind, so each
multiplier sees its own steps (colocated workers mix them; banaserve adds the store path and
migrations, which the simulator models apart). The router's per-request ``prefill_s`` does not
measure a step: on the 2026-12-02 runs a 13-token prompt read 2.9 s, scheduled beside others
(prefill ratios 1.1-130× the model's), so it is not used.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

from bench.workloads_trace import DEFAULT_TRACES_DIR
from services.common.errors import ConfigError
from services.sim.calibrate import find_profile
from services.sim.profile import Profile, ServingModel
from services.sim.validate import compare_rows, render

FIT_MODES = ("static-pd",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("compare_json", type=Path, help="the `bench compare` JSON to fit on")
    p.add_argument("--profile", type=Path, default=None,
                   help="sim profile to start from (default: as `sim validate` finds it)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="write here (default: over --profile)")
    p.add_argument("--iterations", type=int, default=8, help="at most this many replays")
    p.add_argument("--traces-dir", type=Path, default=DEFAULT_TRACES_DIR)


def ratios(rows: list[dict]) -> tuple[float, float]:
    """Median real / simulated TTFT p50 and TPOT p50 over the static-PD rows."""
    fit_rows = [r for r in rows if r["mode"] in FIT_MODES]

    def median(key: str) -> float:
        values = [r["real"][key] / r["sim"][key] for r in fit_rows
                  if r["real"].get(key) and r["sim"].get(key)]  # fmt: skip
        if not values:
            raise ConfigError(f"no static-pd row of the compare run has a {key} to fit on")
        return statistics.median(values)

    return median("ttft_p50_ms"), median("tpot_p50_ms")


def fit(
    report: dict, profile: Profile, traces_dir: Path, iterations: int = 8
) -> tuple[Profile, list[dict], int]:
    """The profile with its serving multipliers fitted on ``report``, the replay of the run
    with them, and how many replays the fit took."""
    if iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}")
    if not any(r["mode"] in FIT_MODES for r in report.get("table", [])):
        raise ConfigError("the compare run has no static-pd rows to fit the serving overhead on")
    serving, rows = ServingModel(), []
    for done in range(1, iterations + 1):  # noqa: B007 - the count is returned
        rows = compare_rows(report, replace(profile, serving=serving), traces_dir)
        ttft, tpot = ratios(rows)
        if abs(ttft - 1) < 0.01 and abs(tpot - 1) < 0.01:
            break  # these rows are the fitted profile's
        serving = replace(
            serving,
            prefill_scale=serving.prefill_scale * math.sqrt(ttft),
            decode_scale=serving.decode_scale * tpot,
        )
    else:  # not within 1 %: the replay of the last update
        rows = compare_rows(report, replace(profile, serving=serving), traces_dir)
    config, machine = report.get("config", {}), report.get("machine", {})
    source = (
        f"fitted on the static-pd rows of a bench compare of {machine.get('date', '?')} "
        f"(rate x{config.get('rate_scale', 1.0)}, {config.get('duration_s', '?')} s) at "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {done} replays"
    )
    return replace(profile, serving=replace(serving, source=source)), rows, done


def run(args: argparse.Namespace) -> int:
    report = json.loads(Path(args.compare_json).read_text())
    model = report["config"].get("model", "smollm2-135m")
    path = find_profile(model, args.profile)
    profile, rows, _ = fit(report, Profile.load(path), args.traces_dir, args.iterations)
    out = args.out or path
    profile.save(out)
    s = profile.serving
    print(render(rows))
    print(f"\nprefill x{s.prefill_scale:.3f}, decode x{s.decode_scale:.3f} ({s.source})")
    print(f"wrote {out}")
    return 0
