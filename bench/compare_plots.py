"""``bench compare``'s figures (PNG, matplotlib's Agg backend), from the report dict alone.

- ``throughput.png``: output tokens/s and goodput per workload, one bar per mode;
- ``latency.png``: TTFT and TPOT per workload and mode, bars at p50 with a tick at p99;
- ``utilisation.png``: one panel per workload (rows) and mode (columns): each worker's
  utilisation U over the run, with a vertical marker where a migration entered a state
  (started, ACTIVE, reverted DONE, ABORTED).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODE_COLORS = {"colocated": "tab:blue", "static-pd": "tab:orange", "banaserve": "tab:green"}
EVENT_STYLES = {
    "PLANNED": ("tab:purple", ":"),
    "COPYING": ("tab:purple", ":"),
    "SWITCHING": ("tab:purple", ":"),
    "ACTIVE": ("tab:red", "-"),
    "REVERTING": ("tab:gray", "--"),
    "DONE": ("tab:gray", "-"),
    "ABORTED": ("black", "-."),
}


def _modes_and_workloads(report: dict) -> tuple[list[str], list[str]]:
    rows = report["table"]
    return list(dict.fromkeys(r["mode"] for r in rows)), list(
        dict.fromkeys(r["workload"] for r in rows)
    )


def _bars(ax, report: dict, key: str, title: str, p99_key: str | None = None) -> None:
    modes, workloads = _modes_and_workloads(report)
    by = {(r["workload"], r["mode"]): r for r in report["table"]}
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(workloads))]
        values = [by.get((w, mode), {}).get(key) or 0.0 for w in workloads]
        ax.bar(xs, values, width, label=mode, color=MODE_COLORS.get(mode))
        if p99_key:
            tops = [by.get((w, mode), {}).get(p99_key) or 0.0 for w in workloads]
            ax.scatter(xs, tops, marker="_", s=200, color="black", zorder=3)
    ax.set_xticks(range(len(workloads)), workloads, rotation=20)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def plot_throughput(report: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _bars(axes[0], report, "output_throughput", "output throughput (tok/s)")
    _bars(axes[1], report, "goodput", "goodput (req/s meeting the SLO)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_latency(report: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _bars(axes[0], report, "ttft_p50_ms", "TTFT (ms): bar p50, tick p99", "ttft_p99_ms")
    _bars(axes[1], report, "tpot_p50_ms", "TPOT (ms): bar p50, tick p99", "tpot_p99_ms")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _timeline(ax, run: dict) -> None:
    samples = run["timeline"]["samples"]
    workers = sorted({w for s in samples for w in s["workers"]})
    for worker in workers:
        points = [(s["t"], s["workers"][worker]["utilisation"]) for s in samples
                  if worker in s["workers"]]  # fmt: skip
        if points:
            ts, us = zip(*points, strict=True)
            ax.plot(ts, us, label=worker, linewidth=1)
    for event in run["timeline"]["events"]:
        color, style = EVENT_STYLES.get(event["state"], ("black", ":"))
        ax.axvline(event["t"], color=color, linestyle=style, linewidth=1)
        ax.annotate(f"{event['id']} {event['state'].lower()}", (event["t"], 0.02),
                    fontsize=6, rotation=90, va="bottom", color=color)  # fmt: skip
    peak = max((w["utilisation"] for s in samples for w in s["workers"].values()), default=0)
    ax.set_ylim(0, max(1.05, 1.05 * peak))  # queued prefill past capacity reads U > 1
    carried = run["migrations"].get("active_at_start") or []
    note = f" ({', '.join(carried)} active from the start)" if carried else ""
    ax.set_title(f"{run['workload']} · {run['mode']}{note}", fontsize=9)
    ax.grid(alpha=0.3)
    if workers:
        ax.legend(fontsize=6, loc="upper right")


def plot_utilisation(report: dict, path: Path) -> None:
    modes, workloads = _modes_and_workloads(report)
    runs = {(r["workload"], r["mode"]): r for r in report["runs"]}
    fig, axes = plt.subplots(
        len(workloads), len(modes), figsize=(4.5 * len(modes), 2.6 * len(workloads)),
        squeeze=False,
    )  # fmt: skip
    for i, workload in enumerate(workloads):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            if (run := runs.get((workload, mode))) is not None:
                _timeline(ax, run)
            if i == len(workloads) - 1:
                ax.set_xlabel("seconds since the workload's first send")
            if j == 0:
                ax.set_ylabel("utilisation U")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_plots(report: dict, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}-{name}.png" for name in ("throughput", "latency", "utilisation")]
    plot_throughput(report, paths[0])
    plot_latency(report, paths[1])
    plot_utilisation(report, paths[2])
    return paths
