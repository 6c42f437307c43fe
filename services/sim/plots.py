"""PNG plots of ``sim run``: ratios per workload and cluster size, utilisation over time."""

from __future__ import annotations

from pathlib import Path

MODES = ("colocated", "static-pd", "banaserve")
METRICS = (("output_throughput", "output tok/s"), ("goodput", "goodput (req/s)"))
UTILISATION_FILE = "sim-scale-utilisation.png"
# What ``write_plots`` writes in its directory (``sim run`` checks each before its first run).
PLOT_FILES = (*(f"sim-scale-{metric}.png" for metric, _ in METRICS), UTILISATION_FILE)


def write_plots(points: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sizes = sorted({p["workers"] for p in points})
    names = list(dict.fromkeys(p["workload"] for p in points))
    by = {(p["workers"], p["workload"]): p for p in points}
    for metric, label in METRICS:
        fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
        for ax, n in zip(axes[0], sizes, strict=True):
            width = 0.8 / len(MODES)
            for i, mode in enumerate(MODES):
                values = [(by[(n, w)]["runs"][mode][metric] or 0.0) if (n, w) in by else 0.0
                          for w in names]  # fmt: skip
                ax.bar([x + i * width for x in range(len(names))], values, width, label=mode)
            ax.set_xticks([x + width for x in range(len(names))], names, rotation=30, ha="right")
            ax.set_title(f"{n} workers")
            ax.set_ylabel(label)
        axes[0][0].legend()
        fig.tight_layout()
        path = out / f"sim-scale-{metric}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    written.append(_utilisation(points, out, plt))
    return written


def _utilisation(points: list[dict], out: Path, plt) -> Path:  # noqa: ANN001
    """Per-role mean utilisation over time of the largest banaserve run with samples."""
    fig, ax = plt.subplots(figsize=(8, 4))
    runs = [p for p in points if p["runs"]["banaserve"].get("samples")]
    if runs:
        p = max(runs, key=lambda q: q["workers"])
        samples = p["runs"]["banaserve"]["samples"]
        for role in ("prefill", "decode"):
            ts, us = [], []
            for s in samples:
                vals = [w["utilisation"] for w in s["workers"].values() if w["role"] == role]
                if vals:
                    ts.append(s["t"])
                    us.append(sum(vals) / len(vals))
            ax.plot(ts, us, label=f"{role} (mean U)")
        ax.set_title(f"banaserve, {p['workers']} workers, {p['workload']}")
        ax.set_xlabel("simulated s")
        ax.legend()
    path = out / UTILISATION_FILE
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
