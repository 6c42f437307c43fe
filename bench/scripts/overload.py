"""Overload measurement (docs/reliability.md, "Overload"): a local cluster on 127.0.0.1 (Redis,
a kvstore node, the router, a tiny-llama prefill and decode worker, TCP data planes), then
``banaserve loadtest router`` in three open-loop steps: the sustainable rate, FACTOR times it,
the sustainable rate again. Every service's resident memory is sampled throughout
(/proc/PID/status every 0.2 s; VmHWM at the end), and the figures are printed as JSON:

    .venv/bin/python bench/scripts/overload.py --rate 6 --factor 10 --duration 20 \\
        [--router-args "--admission-max-in-flight 16"] [--no-admission] --out DIR

Per step: accepted (OK) and shed (RESOURCE_EXHAUSTED) per second, other errors, p50/p99 of the
accepted; for the overload step the backlog drain (last arrival -> last accepted request ended);
per process: RSS before the load, the peak during it, and the life-long VmHWM.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from services.common.arg_types import label_arg
from services.launcher import ClusterSpec, LocalCluster


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    def __init__(self, pids: dict[str, int], period_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pids, self.period_s = pids, period_s
        self.peak = dict.fromkeys(pids, 0)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_kib(pid))
            self.stop_event.wait(self.period_s)


def step_figures(report: dict, samples: list[dict]) -> list[dict]:
    out = []
    for i, step in enumerate(report["steps"]):
        row = next(r for r in step["rpcs"] if r["kind"] == "iteration")
        codes = row["error_codes"]
        window = step["duration_s"]
        its = [s for s in samples if int(s["step"]) == i and s["kind"] == "iteration"]
        ok = [s for s in its if s["status"] == "OK"]
        last_arrival = max(float(s["start_s"]) for s in its)
        last_end = max(float(s["start_s"]) + float(s["latency_ms"]) / 1000 for s in ok)
        shed = codes.get("RESOURCE_EXHAUSTED", 0)
        out.append(
            {
                "rate": step["rate"],
                "sent": row["count"],
                "accepted_per_s": row["ok"] / window,
                "shed_per_s": shed / window,
                "other_errors": {k: v for k, v in codes.items() if k != "RESOURCE_EXHAUSTED"},
                "p50_ms": row["latency_ms"]["p50"],
                "p99_ms": row["latency_ms"]["p99"],
                "max_ms": row["latency_ms"]["max"],
                "drain_s": last_end - last_arrival,
                "server_after": step["server_after"],
            }
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=0.0, help="the sustainable rate (req/s)")
    p.add_argument("--factor", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per step")
    p.add_argument("--router-args", default="", help="extra router flags")
    p.add_argument("--no-admission", action="store_true", help="every service: --no-admission")
    p.add_argument("--out", default="bench/results/overload")
    p.add_argument("--label", type=label_arg, default="overload")
    p.add_argument("--rates", default="", help="run these steps instead (a sweep: R1,R2,...)")
    args = p.parse_args()
    extra = ("--no-admission",) if args.no_admission else ()
    spec = ClusterSpec(
        kvstore_transport="tcp",
        kv_transport="tcp",
        service_args={
            "router": (*extra, *shlex.split(args.router_args)),
            "prefill": extra,
            "decode": extra,
            "kvstore": extra,
        },
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{args.label}-cluster.log", "w") as log:
        cluster = LocalCluster(spec, log)
        cluster.start()
        try:
            pids = {c.name: c.proc.pid for c in cluster.children}
            before = {name: rss_kib(pid) for name, pid in pids.items()}
            sampler = RssSampler(pids)
            sampler.start()
            rates = args.rates or f"{args.rate:g},{args.rate * args.factor:g},{args.rate:g}"
            cmd = [
                str(Path(sys.executable).with_name("banaserve")), "loadtest", "router",
                "--target", cluster.router.address, "--prompt-len", "16", "--max-tokens", "8",
                "--rate", rates, "--duration", f"{args.duration:g}s", "--timeout", "30s",
                "--out", str(out), "--label", args.label,
            ]  # fmt: skip
            started = time.monotonic()
            subprocess.run(cmd, check=False, stdout=log, stderr=log)
            wall_s = time.monotonic() - started
            sampler.stop_event.set()
            sampler.join()
            hwm = {name: rss_kib(pid, "VmHWM") for name, pid in pids.items()}
            alive = [c.name for c in cluster.children if c.proc.poll() is None]
        finally:
            codes = cluster.stop()
    report = json.loads((out / f"router-{args.label}.json").read_text())
    with open(out / f"router-{args.label}-samples.csv") as f:
        samples = list(csv.DictReader(f))
    figures = {
        "label": args.label,
        "admission": not args.no_admission,
        "router_args": args.router_args,
        "wall_s": wall_s,
        "load_average": os.getloadavg(),
        "steps": step_figures(report, samples),
        "rss_mib": {
            n: {
                "before": before[n] / 1024,
                "peak_during": sampler.peak[n] / 1024,
                "vm_hwm": hwm[n] / 1024,
            }
            for n in pids
        },
        "alive_at_end": alive,
        "exit_codes": codes,
    }
    (out / f"{args.label}-figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
