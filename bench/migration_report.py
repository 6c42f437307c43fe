"""The markdown of ``banaserve bench migration``'s report (pure: the report dict in, text out)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from bench.serve_report import fmt

MIB = 1 << 20


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.1f}"


def _s(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.3f}"


def _mib(num_bytes: int | None) -> str:
    return "–" if num_bytes is None else f"{num_bytes / MIB:.2f}"


def _median(runs: Sequence[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def costs_section(costs: dict) -> list[str]:
    lines = [
        "## k: the split that balances a step",
        "",
        "| load | rows/micro-batch | L | ms/layer | norm+LM head ms | other ms | k | donor ms | helper ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("decode", "prefill"):
        c = costs[kind]
        lines.append(
            f"| {kind} | {c['rows']} | {c['num_layers']} | {c['layer_ms']:.2f} | "
            f"{c['head_ms']:.2f} | {c['rest_ms']:.2f} | {c['k']}{' (given)' if c['k_given'] else ''}"
            f" | {c['donor_share_ms']:.1f} | {c['helper_share_ms']:.1f} |"
        )
    return lines + [
        "",
        "The donor keeps the embedding, scheduling, sampling, the final norm and the LM head "
        "besides layers [0, k); the helper runs [k, L). k minimises the slower of the two "
        "shares (donor/helper ms at the balanced k; measured in-process, one thread, at the "
        "rows one micro-batch carries), which bounds a step when two micro-batches pipeline.",
        "",
    ]


def load_section(title: str, section: dict | None, metrics: Sequence[tuple[str, str]]) -> list:
    lines = [f"## {title}", ""]
    if section is None:
        return lines + ["not run", ""]
    runs = section["runs"]
    if unavailable := next((r["unavailable"] for r in runs if r.get("unavailable")), None):
        return lines + [f"not available: the migration ended before ACTIVE ({unavailable})", ""]
    header = "| round | variant | " + " | ".join(label for _, label in metrics) + " | failed |"
    lines += [header, "|---|---|" + "---:|" * (len(metrics) + 1)]
    for r in runs:
        values = " | ".join(fmt(r.get(key)) for key, _ in metrics)
        lines.append(f"| {r['round']} | {r['variant']} | {values} | {len(r.get('failed', []))} |")
    for variant in ("baseline", "migrated"):
        chosen = [r for r in runs if r["variant"] == variant]
        values = " | ".join(fmt(_median(chosen, key)) for key, _ in metrics)
        lines.append(f"| median | {variant} | {values} | |")
    key = metrics[0][0]
    base = _median([r for r in runs if r["variant"] == "baseline"], key)
    moved = _median([r for r in runs if r["variant"] == "migrated"], key)
    if base and moved:
        lines += ["", f"migrated / baseline {metrics[0][1]}: **{moved / base:.2f}×**"]
    return lines + [""]


def migration_rows(report: dict) -> list[tuple[str, dict]]:
    rows = [("idle (T_sync)", report["t_sync"])]
    for load in ("decode", "prefill"):
        for r in (report.get(load) or {}).get("runs", []):
            if r.get("migration") and r["migration"]["reached_active"]:
                rows.append((f"{load} r{r['round']}", r["migration"]))
    return rows


def time_section(report: dict) -> list[str]:
    b = report.get("bandwidth") or {}
    rate = b.get("bytes_per_s")
    t_sync = report["t_sync"]["to_active_s"]
    lines = [
        "## Migration time vs bytes moved",
        "",
        f"B = {fmt(rate / 1e6 if rate else None)} MB/s ({b.get('transport')}, one-way transfers "
        f"of {_mib(b.get('size_bytes'))} MiB{', ' + b['error'] if 'error' in b else ''}); "
        f"T_sync = {_s(t_sync)} s (median PLANNED→ACTIVE of migrations with nothing to copy: "
        f"{', '.join(_s(t) for t in report['t_sync'].get('to_active_samples_s', []))} s).",
        "",
        "| migration | layers | seqs | weights MiB | KV MiB (copy + switch) | weights s | KV copy s "
        "| SWITCHING s | switch pause ms | requests' max gap ms | T to ACTIVE s | S/B s "
        "| S/B + T_sync s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in migration_rows(report):
        s_over_b = m["bytes_before_active"] / rate if rate else None
        predicted = None if s_over_b is None else s_over_b + t_sync
        weights = "skipped" if m["weights_skipped"] else _mib(m["num_weight_bytes"])
        lines.append(
            f"| {name} | [{m['layers'][0]}, {m['layers'][1]}) | {m['num_sequences']} | {weights} "
            f"| {_mib(m['num_kv_bytes_before_active'])} | {_s(m['weights_s'])} "
            f"| {_s(m['kv_copy_s'])} | {_s(m['switching_s'])} | {_ms(m['switch_pause_s'])} "
            f"| {_ms(m.get('requests_max_gap_s'))} | {_s(m['to_active_s'])} | {_s(s_over_b)} "
            f"| {_s(predicted)} |"
        )
    return lines + [
        "",
        "T to ACTIVE = COPYING + SWITCHING as the coordinator timed them; the switch pause is "
        "the donor's engine pause; requests' max gap is the longest wait between two tokens of "
        "any request from StartMigration to ACTIVE (the decode loads only).",
        "",
    ]


def _schedule(config: dict) -> str:
    if config["micro_batches"] != 2:
        return ""
    pipelined = config.get("pipelined_steps", True)
    return ", two step streams" if pipelined else ", both inside one step"


def render_markdown(report: dict) -> str:
    c, m = report["config"], report["machine"]
    lines = [
        f"# Layer migration: {c['model']}, 1P1D, {c['threads']} thread(s) per worker"
        f"{', pinned' if c['pin'] else ''}, {c['micro_batches']} micro-batch(es)"
        f"{_schedule(c)}",
        "",
        f"{m['date']}, {m['cpu_model']} ×{m['cpus']}, load average {m['loadavg_before']} → "
        f"{m.get('loadavg_after')}, {m.get('wall_seconds')} s; {c['rounds']} round(s) per "
        "load, variants alternating which goes first.",
        "",
        *costs_section(report["costs"]),
        *load_section(
            f"(a) Decode-heavy: {c['decode_concurrency']} × ({c['decode_input_len']} in, "
            f"{c['decode_output_len']} out); migrated = decode worker's [k, L) on the prefill "
            "worker, from ACTIVE to the first request's end",
            report["decode"],
            [
                ("tokens_per_s", "decode tok/s"),
                ("tpot_p50_ms", "TPOT p50 ms"),
                ("tpot_p99_ms", "TPOT p99 ms"),
                ("max_wait_ms", "longest wait ms"),
                ("window_s", "window s"),
            ],
        ),  # fmt: skip
        *load_section(
            f"(b) Prefill-heavy: {c['prefill_requests']} × ({c['prefill_input_len']} in, "
            f"{c['prefill_output_len']} out); migrated = prefill worker's [k, L) on the decode "
            "worker",
            report["prefill"],
            [
                ("prompt_tokens_per_s", "prompt tok/s"),
                ("ttft_p50_ms", "TTFT p50 ms"),
                ("ttft_p99_ms", "TTFT p99 ms"),
                ("window_s", "window s"),
            ],
        ),  # fmt: skip
        *time_section(report),
    ]
    return "\n".join(lines)
