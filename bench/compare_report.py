"""``bench compare``'s arithmetic and report: one run (workload × mode) → a row → the table.

Pure (no network). A run's request metrics are ``bench serve``'s (``bench/serve_report.py``:
TTFT, TPOT, throughputs over first send → last completion, which is the makespan, and SLO
attainment over every request sent, goodput the requests meeting the SLO per second), at the
workload's SLO. Added here: the migrations the coordinator performed during the run (ids first
seen in it, and how many reached ACTIVE, were reverted or aborted), each worker's mean and peak
utilisation over the run's samples, and per workload the ratios of ``banaserve`` to each
baseline: output throughput, goodput and TTFT p99 (the issue's targets).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bench.serve_report import RequestRecord, fmt, summarise

BASELINES = ("static-pd", "colocated")
SUBJECT = "banaserve"


def migrations_during(events: Sequence[dict], known_before: Mapping[str, dict]) -> dict:
    """Counts of the migrations that started during a run, from the watcher's state events;
    ``known_before``: the coordinator's migrations (by id) when the run began, of which those
    ACTIVE then are listed: they carried over from the workload before."""
    new = {e["id"] for e in events if e["id"] not in known_before}
    reached = {state: {e["id"] for e in events if e["state"] == state} for state in
               ("ACTIVE", "DONE", "ABORTED")}  # fmt: skip
    return {
        "num_started": len(new),
        "num_activated": len(reached["ACTIVE"]),
        "num_reverted": len(reached["DONE"]),
        "num_aborted": len(reached["ABORTED"]),
        "ids": sorted(new),
        "active_at_start": sorted(i for i, m in known_before.items() if m["state"] == "ACTIVE"),
    }


def utilisation_summary(samples: Sequence[dict]) -> dict[str, dict]:
    """Per worker: role, mean and max utilisation U over the samples that list it."""
    out: dict[str, dict] = {}
    for worker in sorted({w for s in samples for w in s["workers"]}):
        seen = [s["workers"][worker] for s in samples if worker in s["workers"]]
        values = [w["utilisation"] for w in seen]
        out[worker] = {
            "role": seen[-1]["role"],
            "mean": float(np.mean(values)),
            "max": float(np.max(values)),
            "num_samples": len(values),
        }
    return out


def run_result(
    mode: str, workload: str, records: Sequence[RequestRecord], slo: tuple[float, float],
    samples: Sequence[dict], events: Sequence[dict], known_before: Mapping[str, dict],
) -> dict:  # fmt: skip
    """Everything kept of one run (the JSON's ``runs`` entries)."""
    return {
        "mode": mode,
        "workload": workload,
        "summary": summarise(records, *slo),
        "migrations": migrations_during(events, known_before),
        "utilisation": utilisation_summary(samples),
        "timeline": {"samples": list(samples), "events": list(events)},
        "requests": [r.to_json() for r in records],
    }


def row(run: dict) -> dict:
    """The table's numbers of one run (times in ms, throughputs per second)."""
    s = run["summary"]
    return {
        "workload": run["workload"],
        "mode": run["mode"],
        "num_ok": s["num_ok"],
        "num_requests": s["num_requests"],
        "makespan_s": s["duration_s"],
        "output_throughput": s["output_throughput"],
        "total_token_throughput": s["total_token_throughput"],
        "ttft_p50_ms": s["ttft_ms"]["p50"],
        "ttft_p99_ms": s["ttft_ms"]["p99"],
        "tpot_p50_ms": s["tpot_ms"]["p50"],
        "tpot_p99_ms": s["tpot_ms"]["p99"],
        "slo_attainment": s["slo"]["attainment"],
        "goodput": s["slo"]["goodput"],
        "num_migrations": run["migrations"]["num_started"],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(rows: Sequence[dict]) -> dict[str, dict]:
    """Per workload, ``banaserve`` over each baseline (throughput, goodput, TTFT p99)."""
    by = {(r["workload"], r["mode"]): r for r in rows}
    out: dict[str, dict] = {}
    for workload in dict.fromkeys(r["workload"] for r in rows):
        subject = by.get((workload, SUBJECT))
        if subject is None:
            continue
        by_base = {
            base: {
                "output_throughput": ratio(subject["output_throughput"], b["output_throughput"]),
                "goodput": ratio(subject["goodput"], b["goodput"]),
                "ttft_p99": ratio(subject["ttft_p99_ms"], b["ttft_p99_ms"]),
            }
            for base in BASELINES
            if (b := by.get((workload, base))) is not None
        }
        if by_base:
            out[workload] = by_base
    return out


# ---- markdown ---------------------------------------------------------------------------

COLUMNS = (
    "workload", "mode", "ok / sent", "makespan (s)", "out tok/s", "total tok/s",
    "TTFT p50 / p99 (ms)", "TPOT p50 / p99 (ms)", "SLO att. (%)", "goodput (req/s)", "migr.",
)  # fmt: skip


def table_line(r: dict) -> str:
    attainment = None if r["slo_attainment"] is None else 100 * r["slo_attainment"]
    cells = [
        r["workload"], r["mode"], f"{r['num_ok']} / {r['num_requests']}",
        fmt(r["makespan_s"], 1), fmt(r["output_throughput"], 1),
        fmt(r["total_token_throughput"], 1),
        f"{fmt(r['ttft_p50_ms'], 0)} / {fmt(r['ttft_p99_ms'], 0)}",
        f"{fmt(r['tpot_p50_ms'], 0)} / {fmt(r['tpot_p99_ms'], 0)}",
        fmt(attainment, 1), fmt(r["goodput"], 3), str(r["num_migrations"]),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def ratio_lines(by_workload: dict[str, dict]) -> list[str]:
    if not by_workload:
        return []
    lines = [
        "",
        "banaserve ÷ baseline (throughput and goodput: higher is better; TTFT p99: lower is):",
        "",
        "| workload | vs | output tok/s | goodput | TTFT p99 |",
        "|---|---|---:|---:|---:|",
    ]
    for workload, bases in by_workload.items():
        for base, r in bases.items():
            cells = [fmt(r["output_throughput"], 2), fmt(r["goodput"], 2), fmt(r["ttft_p99"], 2)]
            lines.append(f"| {workload} | {base} | " + " | ".join(cells) + " |")
    return lines


def mode_line(mode: str, config: dict) -> str:
    """``up`` flags of ``mode``, and the cluster they make when the report recorded it."""
    line = f"`{mode}`: `up {' '.join(config['up_args'][mode])}`"
    if (c := config.get("mode_clusters", {}).get(mode)) is None:
        return line
    parts = [f"{c[f'num_{r}']} {r}" for r in ("prefill", "decode", "mixed") if c[f"num_{r}"]]
    parts += [f"{c['policy']} routing", f"{c['num_kvstore']} store nodes"]
    flags = c["service_args"]
    if c["coordinator"]:
        parts.append(" ".join(["coordinator", *flags.get("coordinator", [])]))
    # the other services' flags the mode gave (banaserve: its router's rule, its decode chunk)
    parts += [" ".join([k, *v]) for k, v in flags.items() if v and k != "coordinator"]
    return f"{line} ({', '.join(parts)})"


def render_markdown(report: dict) -> str:
    config = report["config"]
    slo_lines = [
        f"- {name}: {w['description']}; {w['num_requests']} requests; SLO TTFT ≤ "
        f"{w['slo_ttft_ms']:g} ms, TPOT ≤ {w['slo_tpot_ms']:g} ms"
        for name, w in report["workloads"].items()
    ]
    lines = [
        "# BanaServe vs colocated vs static PD (`banaserve bench compare`)",
        "",
        f"{report['machine']['date']} · model {config['model']} · {config['profile']} profile: "
        f"{config['duration_s']:g} s of arrivals per workload (rates × {config['rate_scale']:g})"
        f" · seed {config['seed']} · `--pin`, {config['threads']} thread per worker, 2 workers",
        "",
        *slo_lines,
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---:|" * (len(COLUMNS) - 2),
        *(table_line(r) for r in report["table"]),
        *ratio_lines(report["ratios"]),
        "",
        "Modes: " + "; ".join(mode_line(m, config) for m in config["up_args"]),
        "",
        "Method: " + METHOD,
    ]
    return "\n".join(lines) + "\n"


METHOD = (
    "each mode on a fresh `banaserve up` cluster, the workloads one after another with the "
    "same seeded requests and send times (token-id prompts, EOS ignored so each request asks "
    "for its full output); between workloads the cluster is left to drain (bounded). Makespan "
    "is first send → last completion; throughputs count successful requests over it; SLO "
    "attainment is over every request sent, goodput the requests meeting both SLOs per second "
    "of makespan. Utilisation per worker is max(busy fraction or queued prefill over capacity, "
    "KV used) from the router's ListWorkers; migrations from the coordinator's ListMigrations. "
    "Client-side clocks; every request and sample is in the JSON."
)
