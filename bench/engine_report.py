"""The engine benchmark's report: per-run summaries, ratios, targets, and the markdown table.

Pure (no torch, no subprocesses). Input is what the orchestrator gathered: one *run* per
``(system, dtype)``, either ``{"timings": [...], ...}`` from a runner or ``{"error": "..."}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.engine_workload import (
    Timing,
    Workload,
    decode_metric,
    prefill_metric,
    summarise,
)

OURS = "banaserve"
DISPLAY = {"banaserve": "BanaServe", "vllm": "vLLM", "transformers": "transformers"}
DTYPE_SHORT = {"bfloat16": "bf16", "float32": "fp32"}
MAX_REASON = 60

METHOD = (
    "Each system × dtype runs in its own process with `--threads` torch/OpenMP threads. "
    "Every system gets the same token ids (random over the vocabulary minus special tokens, "
    "fixed seed, fresh prompts for every call so no prefix cache helps), greedy sampling, "
    "EOS ignored. A warm-up round runs first and is discarded; then `repeats` rounds, each "
    "timing, in order: one {prompt_len}-token prompt with max_tokens=1 "
    "(prefill tok/s = {prompt_len} / time), and for each batch B, B prompts of "
    "{decode_prompt_len} tokens with max_tokens=1 (t1), then B fresh prompts with "
    "max_tokens={max_tokens} (tT): decode tok/s = B × {decode_steps} / (tT − t1). "
    "Figures are medians over rounds; all samples are in engine.json."
)
INTERLEAVED = (
    " Interleaved: every system of a dtype was loaded at once and ran each call in turn "
    "(the first one rotating from call to call), so load from other work fell on all alike."
)
NOISE = (
    "Timings come from a shared machine where other work may run concurrently; "
    "treat differences under ~10% as noise (compare the samples and load averages in engine.json)."
)


@dataclass(frozen=True)
class Target:
    """Ours / baseline ≥ ``factor`` on ``metric``."""

    metric: str
    baseline: str
    factor: float

    def label(self) -> str:
        return f"{metric_label(self.metric)} ≥ {self.factor:g}× {DISPLAY[self.baseline]}"


def targets(workload: Workload) -> list[Target]:
    """The issues' bar (9, after 2): decode at batch 16 and 64 ≥ vLLM, prefill ≥ 0.9× vLLM;
    decode (batch 16) and prefill ≥ 3× transformers. Without those batch sizes, the largest."""
    prefill = prefill_metric(workload.prompt_len)
    decodes = [decode_metric(b) for b in (16, 64) if b in workload.batches]
    decodes = decodes or [decode_metric(workload.max_batch)]
    return [
        *(Target(decode, "vllm", 1.0) for decode in decodes),
        Target(prefill, "vllm", 0.9),
        Target(decodes[0], "transformers", 3.0),
        Target(prefill, "transformers", 3.0),
    ]


def metric_label(metric: str) -> str:
    if metric.startswith("prefill_"):
        return f"prefill tok/s ({metric.removeprefix('prefill_')}-token prompt)"
    return f"decode tok/s, batch {metric.removeprefix('decode_b')}"


def run_key(system: str, dtype: str) -> str:
    return f"{system}/{dtype}"


def summarise_run(workload: Workload, run: dict) -> dict:
    """Add ``metrics`` (median and samples per metric) to a successful run."""
    if "error" in run:
        return run
    timings = [Timing(**t) for t in run["timings"]]
    out = {**run, "metrics": summarise(workload, timings)}
    if timings and all(t.cpu_seconds is not None for t in timings):
        out["cpu_metrics"] = summarise(workload, timings, cpu=True)
    return out


def median(
    runs: dict[str, dict], system: str, dtype: str, metric: str, key: str = "metrics"
) -> float | None:
    run = runs.get(run_key(system, dtype), {})
    return run.get(key, {}).get(metric, {}).get("median")


def cpu_ratio_lines(report: dict) -> list[str]:
    """BanaServe/baseline in tokens per CPU-second (``cpu_metrics``): what one core's work
    costs each system, which moves far less than wall clock when other work loads the machine."""
    runs, lines = report["runs"], []
    for dtype in report["dtypes"]:
        for base in sorted({r["system"] for r in runs.values()} - {OURS}):
            parts = []
            for m in report["metrics"]:
                r = ratio(
                    median(runs, OURS, dtype, m, "cpu_metrics"),
                    median(runs, base, dtype, m, "cpu_metrics"),
                )
                if r is not None:
                    parts.append(f"{metric_label(m)} {fmt_ratio(r)}")
            if parts:
                short = DTYPE_SHORT.get(dtype, dtype)
                lines.append(
                    f"- per CPU-second, {DISPLAY[OURS]}/{DISPLAY[base]} {short}: "
                    + "; ".join(parts)
                )
    return (
        ["", "CPU time (runner and child processes, medians over rounds):", *lines] if lines else []
    )


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours and theirs else None


def ratios(workload: Workload, runs: dict[str, dict], dtypes: Sequence[str]) -> dict:
    """``{"banaserve/vllm": {dtype: {metric: ratio}}}`` for every baseline present."""
    baselines = sorted({r["system"] for r in runs.values()} - {OURS})
    out: dict[str, dict] = {}
    for base in baselines:
        out[f"{OURS}/{base}"] = {
            dtype: {
                m: ratio(median(runs, OURS, dtype, m), median(runs, base, dtype, m))
                for m in workload.metrics
            }
            for dtype in dtypes
        }
    return out


def target_results(workload: Workload, runs: dict[str, dict], dtypes: Sequence[str]) -> list:
    rows = []
    for target in targets(workload):
        for dtype in dtypes:
            got = ratio(
                median(runs, OURS, dtype, target.metric),
                median(runs, target.baseline, dtype, target.metric),
            )
            met = None if got is None else got >= target.factor
            rows.append({**vars(target), "dtype": dtype, "ratio": got, "met": met})
    return rows


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def agreement(runs: dict[str, dict], dtypes: Sequence[str]) -> dict:
    """Leading tokens of one sample decode that match transformers' (a sanity check)."""
    out: dict[str, dict] = {}
    for dtype in dtypes:
        ref = runs.get(run_key("transformers", dtype), {}).get("first_output")
        if not ref:
            continue
        for key, run in runs.items():
            other = run.get("first_output")
            if run["dtype"] != dtype or run["system"] == "transformers" or not other:
                continue
            out[key] = {"matching": matching_prefix(ref, other), "of": len(ref)}
    return out


# ---- markdown ---------------------------------------------------------------------------


def fmt_rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def short_reason(error: str) -> str:
    first = error.strip().splitlines()[0] if error.strip() else "failed"
    first = first.replace("|", "/")
    return first if len(first) <= MAX_REASON else first[: MAX_REASON - 1] + "…"


def cell(run: dict | None, metric: str) -> str:
    if run is None:
        return "not run"
    if "error" in run:
        return f"n/a ({short_reason(run['error'])})"
    return fmt_rate(run["metrics"][metric]["median"])


def columns(systems: Sequence[str], dtypes: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(kind, a, b)``: ``("run", system, dtype)`` or ``("ratio", baseline, dtype)``."""
    cols: list[tuple[str, str, str]] = []
    for dtype in dtypes:
        cols += [("run", s, dtype) for s in systems]
        if OURS in systems:
            cols += [("ratio", s, dtype) for s in systems if s != OURS]
    return cols


def header(col: tuple[str, str, str]) -> str:
    kind, name, dtype = col
    if kind == "run":
        return f"{DISPLAY[name]} {DTYPE_SHORT[dtype]}"
    return f"{DISPLAY[OURS]}/{DISPLAY[name]} {DTYPE_SHORT[dtype]}"


def table(report: dict) -> list[str]:
    systems, dtypes = report["systems"], report["dtypes"]
    runs = report["runs"]
    cols = columns(systems, dtypes)
    lines = [
        "| metric | " + " | ".join(header(c) for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for metric in report["metrics"]:
        cells = []
        for kind, name, dtype in cols:
            if kind == "run":
                cells.append(cell(runs.get(run_key(name, dtype)), metric))
            else:
                cells.append(fmt_ratio(report["ratios"][f"{OURS}/{name}"][dtype][metric]))
        lines.append(f"| {metric_label(metric)} | " + " | ".join(cells) + " |")
    return lines


def target_lines(report: dict) -> list[str]:
    if not report["targets"]:
        return []
    lines = ["", "| target | dtype | ratio | met |", "|---|---|---:|:-:|"]
    for row in report["targets"]:
        target = Target(row["metric"], row["baseline"], row["factor"])
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {target.label()} | {row['dtype']} | {fmt_ratio(row['ratio'])} | {met} |")
    return lines


def agreement_line(report: dict) -> list[str]:
    parts = [
        f"{DISPLAY[report['runs'][k]['system']]} {DTYPE_SHORT[report['runs'][k]['dtype']]} "
        f"{v['matching']}/{v['of']}"
        for k, v in report["agreement"].items()
    ]
    if not parts:
        return []
    return ["", "Greedy tokens matching transformers on one sample decode: " + ", ".join(parts)]


def machine_line(machine: dict) -> str:
    load = machine.get("loadavg_before"), machine.get("loadavg_after")
    return (
        f"{machine['date']} · {machine['cpu_model']} ({machine['cpus']} CPUs) · "
        f"{machine['threads']} thread(s) · torch {machine['torch']} · "
        f"transformers {machine['transformers']} · vLLM {machine.get('vllm') or 'n/a'} · "
        f"load avg {load[0]} → {load[1]}"
    )


def render_markdown(report: dict) -> str:
    w = report["workload"]
    steps = w["max_tokens"] - 1
    lines = [
        f"# Engine benchmark: {report['model_name']}",
        "",
        machine_line(report["machine"]),
        "",
        *table(report),
        *target_lines(report),
        *agreement_line(report),
        *cpu_ratio_lines(report),
        "",
        "Method: "
        + METHOD.format(**w, decode_steps=steps)
        + (INTERLEAVED if report.get("interleaved") else ""),
        "",
        NOISE,
    ]
    return "\n".join(lines) + "\n"
