"""A load test's report: samples → figures per RPC → JSON, CSV and a markdown table.

Pure (no network). For every name in a run (the iteration, and each RPC or point inside it):

- count, successes, and errors by status code (gRPC status names; data-plane errors mapped to
  them: ``bench.loadtest.driver.status_of``);
- throughput: successful samples per second over the run's *measured window*, from the first
  iteration's start to the last sample's end;
- latency of the successful samples: mean, p50, p90, p99 (numpy's linear interpolation, via
  ``bench.serve_report.distribution``) and max, in milliseconds;
- GB/s (10^9 bytes) and tokens/s of the successful samples of an RPC that moves any.

Open loop, the iterations' lag behind their Poisson schedule shows whether the generator kept
up (if not, the rate it reached is not the one asked for). The client's CPU seconds over the
run's wall time says how busy the generator itself was: on a shared machine it competes with
the service for the same cores; the service's own (``--server-pid``, local processes) says
how busy it was.

A run of several steps (``--rate 100,200,400``) is a sweep: with an SLO (one name and a p99
target), a step passes when neither that name nor the iteration had an error, its p99 is within
the target and, open loop, the generator's own lag behind schedule stayed within it too (else
the latencies were not measured at the rate asked); the best step is the passing one with the
highest throughput of that name.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.loadtest.driver import OK, Loop, RunResult, Sample, SampleKind
from bench.serve_report import distribution, fmt

CSV_FIELDS = (
    "step", "load", "name", "kind", "count", "ok", "errors", "error_codes", "throughput_per_s",
    "mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "gb_per_s", "tokens_per_s",
)  # fmt: skip
SAMPLE_FIELDS = ("step", "name", "kind", "start_s", "latency_ms", "status", "bytes", "tokens")


@dataclass(frozen=True)
class Slo:
    name: str  # the iteration or RPC the target applies to
    p99_ms: float


def window_s(samples: Sequence[Sample]) -> float:
    """First iteration start to the last end of any sample, in seconds."""
    if not samples:
        return 0.0
    return max(s.start_s + s.latency_s for s in samples) - min(s.start_s for s in samples)


def per_second(value: float, seconds: float) -> float | None:
    return value / seconds if seconds > 0 else None


def rpc_row(name: str, kind: SampleKind, samples: Sequence[Sample], seconds: float) -> dict:
    ok = [s for s in samples if s.status == OK]
    latency = distribution([s.latency_s for s in ok])
    latency["max"] = float(np.max([s.latency_s for s in ok]) * 1000) if ok else None
    num_bytes = sum(s.num_bytes for s in ok)
    num_tokens = sum(s.num_tokens for s in ok)
    rate_bytes = per_second(num_bytes, seconds)
    return {
        "name": name,
        "kind": kind.value,
        "count": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "error_codes": dict(Counter(s.status for s in samples if s.status != OK).most_common()),
        "throughput_per_s": per_second(len(ok), seconds),
        "latency_ms": latency,
        "bytes": num_bytes,
        "gb_per_s": rate_bytes / 1e9 if num_bytes and rate_bytes is not None else None,
        "tokens": num_tokens,
        "tokens_per_s": per_second(num_tokens, seconds) if num_tokens else None,
    }


def rows_of(samples: Sequence[Sample], seconds: float) -> list[dict]:
    """One row per (kind, name), iterations first, then RPCs in the order first seen."""
    groups: dict[tuple[SampleKind, str], list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.kind is not SampleKind.ITERATION):
        groups.setdefault((s.kind, s.name), []).append(s)
    return [rpc_row(name, kind, group, seconds) for (kind, name), group in groups.items()]


def step_summary(
    result: RunResult, server_after: dict, server_cpu_s: dict[int, float] | None = None
) -> dict:
    """Everything about one run at one load, without the samples. ``server_cpu_s``: CPU
    seconds the service's processes (by pid) used during the run, when they were watched."""
    seconds = window_s(result.samples)
    iterations = [s for s in result.samples if s.kind is SampleKind.ITERATION]
    spec = result.spec
    return {
        "load": spec.label,
        "loop": spec.loop.value,
        "users": spec.users if spec.loop is Loop.CLOSED else None,
        "rate": spec.rate if spec.loop is Loop.OPEN else None,
        "duration_s": seconds,
        "wall_s": result.wall_s,
        "num_iterations": len(iterations),
        "schedule_lag_ms": distribution([s.lag_s for s in iterations])
        if spec.loop is Loop.OPEN
        else None,
        "client_cpu_s": result.client_cpu_s,
        "client_cpu_share": per_second(result.client_cpu_s, result.wall_s),
        "server_cpu_share": None
        if server_cpu_s is None
        else per_second(sum(server_cpu_s.values()), result.wall_s),
        "server_cpu_s": server_cpu_s,
        "rpcs": rows_of(result.samples, seconds),
        "error_messages": {f"{n} {s}": m for (n, s), m in result.messages.items()},
        "server_after": server_after,
    }


def row_named(step: dict, name: str) -> dict | None:
    return next((r for r in step["rpcs"] if r["name"] == name), None)


def judge(step: dict, slo: Slo) -> dict:
    row = row_named(step, slo.name)
    if row is None or not row["ok"]:
        return {"pass": False, "why": f"no successful {slo.name!r}"}
    p99 = row["latency_ms"]["p99"]
    reached = row["throughput_per_s"] or 0.0
    iterations = step["rpcs"][0]
    why = []
    if row["errors"] or iterations["errors"]:
        why.append("errors")
    if p99 > slo.p99_ms:
        why.append(f"p99 {p99:.2f} ms > {slo.p99_ms:g} ms")
    lag = step["schedule_lag_ms"]
    if lag and lag["p99"] is not None and lag["p99"] > slo.p99_ms:
        why.append(f"generator behind schedule (lag p99 {lag['p99']:.2f} ms)")
    return {"pass": not why, "why": ", ".join(why), "p99_ms": p99, "throughput_per_s": reached}


def sweep_summary(steps: list[dict], slo: Slo | None) -> dict | None:
    if slo is None:
        return None
    verdicts = [judge(step, slo) for step in steps]
    for step, verdict in zip(steps, verdicts, strict=True):
        step["slo"] = verdict
    passing = [(v["throughput_per_s"], i) for i, v in enumerate(verdicts) if v["pass"]]
    best = max(passing)[1] if passing else None
    return {
        "name": slo.name,
        "p99_ms": slo.p99_ms,
        "best_step": best,
        "best_load": None if best is None else steps[best]["load"],
        "best_throughput_per_s": None if best is None else verdicts[best]["throughput_per_s"],
        "best_p99_ms": None if best is None else verdicts[best]["p99_ms"],
    }


# ---- files ------------------------------------------------------------------------------


def csv_rows(report: dict) -> list[dict]:
    rows = []
    for i, step in enumerate(report["steps"]):
        for r in step["rpcs"]:
            lat = r["latency_ms"]
            codes = ";".join(f"{c}:{n}" for c, n in r["error_codes"].items())
            rows.append({
                "step": i, "load": step["load"], "name": r["name"], "kind": r["kind"],
                "count": r["count"], "ok": r["ok"], "errors": r["errors"], "error_codes": codes,
                "throughput_per_s": r["throughput_per_s"],
                **{f"{k}_ms": lat[k] for k in ("mean", "p50", "p90", "p99", "max")},
                "gb_per_s": r["gb_per_s"], "tokens_per_s": r["tokens_per_s"],
            })  # fmt: skip
    return rows


def write_csv(path: Path, fields: Sequence[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def write_files(report: dict, results: list[RunResult], out: Path, stem: str) -> list[Path]:
    """``STEM.json`` (the report), ``STEM.csv`` (a row per step and name) and
    ``STEM-samples.csv`` (every sample); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.csv", out / f"{stem}-samples.csv"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    write_csv(paths[1], CSV_FIELDS, csv_rows(report))
    samples = [
        {
            "step": i,
            "name": s.name,
            "kind": s.kind.value,
            "start_s": round(s.start_s, 6),
            "latency_ms": round(s.latency_s * 1000, 4),
            "status": s.status,
            "bytes": s.num_bytes,
            "tokens": s.num_tokens,
        }  # fmt: skip
        for i, result in enumerate(results)
        for s in result.samples
    ]
    write_csv(paths[2], SAMPLE_FIELDS, samples)
    return paths


# ---- markdown ---------------------------------------------------------------------------


def rate_cell(row: dict) -> str:
    parts = []
    if row["tokens_per_s"] is not None:
        parts.append(f"{row['tokens_per_s']:.1f} tok/s")
    if row["gb_per_s"] is not None:
        parts.append(f"{row['gb_per_s']:.3f} GB/s")
    return ", ".join(parts)


def step_table(step: dict) -> list[str]:
    lines = [
        "| name | ok / count | errors | per s | p50 ms | p90 ms | p99 ms | max ms | data |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in step["rpcs"]:
        lat = r["latency_ms"]
        codes = ", ".join(f"{c} × {n}" for c, n in r["error_codes"].items()) or "0"
        name = f"**{r['name']}**" if r["kind"] == SampleKind.ITERATION.value else r["name"]
        lines.append(
            f"| {name} | {r['ok']} / {r['count']} | {codes} | {fmt(r['throughput_per_s'])} | "
            f"{fmt(lat['p50'], 2)} | {fmt(lat['p90'], 2)} | {fmt(lat['p99'], 2)} | "
            f"{fmt(lat['max'], 2)} | {rate_cell(r)} |"
        )
    return lines


def leak_text(server_after: dict) -> str:
    failed = server_after.get("leak_check_failed")
    if failed:
        return f"LEAK CHECK FAILED: {failed}"
    leaks = server_after.get("leaks")
    return f"LEAKS: {leaks}" if leaks else "no leaks"


def step_lines(i: int, step: dict) -> list[str]:
    lag = step["schedule_lag_ms"]
    lag_text = f" · schedule lag p99 {fmt(lag['p99'], 1)} ms" if lag else ""
    verdict = step.get("slo")
    slo_text = ""
    if verdict is not None:
        slo_text = " · SLO " + ("pass" if verdict["pass"] else f"fail ({verdict['why']})")
    server = step.get("server_cpu_share")
    server_text = "" if server is None else f" · server CPU {fmt(server, 2)} cores"
    head = (
        f"### step {i}: {step['load']} · {step['duration_s']:.2f} s measured · client CPU "
        f"{fmt(step['client_cpu_share'], 2)} cores{server_text}{lag_text}{slo_text}"
    )
    after = [f"Server after the run: {leak_text(step['server_after'])}"]
    return [head, "", *step_table(step), "", *after, ""]


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Load test: {report['service']}",
        "",
        f"{m['date']} · target `{report['target']}` · {m['cpu_model']} ({m['cpus']} CPUs) · "
        f"load avg {m['loadavg_before']} → {m.get('loadavg_after')}",
        "",
        "Scenario: " + ", ".join(f"{k} {v}" for k, v in report["scenario"].items()),
        "",
    ]
    for i, step in enumerate(report["steps"]):
        lines += step_lines(i, step)
    sweep = report.get("sweep")
    if sweep:
        best = sweep["best_load"]
        lines.append(
            f"SLO p99({sweep['name']}) ≤ {sweep['p99_ms']:g} ms: "
            + (
                f"best {fmt(sweep['best_throughput_per_s'])}/s at {best} "
                f"(p99 {fmt(sweep['best_p99_ms'], 2)} ms)"
                if best is not None
                else "no step passed"
            )
        )
    return "\n".join(lines) + "\n"
