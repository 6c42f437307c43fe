"""``banaserve bench compare``: the same workloads against colocated, static PD and BanaServe.

Lifecycle of a run:

1. plan every workload (``bench/workloads.py``) from ``--seed``: the same requests and send
   times for every mode;
2. for each mode in turn, start a fresh ``banaserve up`` cluster (``bench/compare_cluster.py``:
   same model, ``--threads``, ``--pin`` and two workers for every mode), send ``--warmup``
   unrecorded requests, then run the workloads one after another: each is sent open-loop by
   ``bench serve``'s sender (``bench.serve_bench.drive``) under a hard deadline of its arrival
   window (``--duration``) plus ``--drain-s``, while a watcher samples worker load and migrations; after each,
   wait (at most ``--settle-s``) for the workers to drain before the next. With
   ``--fresh-cluster-per-workload`` every workload gets its own cluster instead;
3. stop the cluster (SIGTERM, bounded), next mode;
4. write ``OUT/compare[-LABEL].json`` (config, machine, workload plans, every run's summary,
   timeline and requests), ``.md`` (the table and the banaserve ÷ baseline ratios) and three
   PNGs (``bench/compare_plots.py``), and print the markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.compare_cluster import (
    MODE_UP_ARGS,
    MODES,
    Mode,
    UpCluster,
    Watch,
    Watcher,
    mode_cluster,
    up_argv,
)
from bench.compare_report import ratios, render_markdown, row, run_result
from bench.machine import loadavg, machine_info
from bench.serve_bench import Progress, drive, json_safe, vocab_range
from bench.serve_targets import Endpoint, Sampling, make_target
from bench.serve_workload import Request
from bench.workloads import FAMILIES, Workload, plan, workload
from bench.workloads_synthetic import VOCAB, PlannedRequest
from bench.workloads_trace import DEFAULT_TRACES_DIR
from services.common.arg_types import (
    label_arg,
    name_list,
    non_negative,
    path_arg,
    positive,
    shell_words,
    thread_count,
)
from services.common.errors import ConfigError
from services.common.paths import output_dir
from services.launcher import LOCAL_DATA_PLANE

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Profile:
    duration_s: float  # seconds of arrivals per workload
    drain_s: float  # after the last arrival, before in-flight requests are cancelled
    settle_s: float  # at most, between workloads
    workloads: tuple[str, ...] = FAMILIES  # unless --workloads names others


# full: 6 workloads × 3 modes × ~35 s + 3 cluster starts (~30 s each) ≈ 13 min; at most ~15
# when every drain and settle runs out (a settle waits long only while a migration is live,
# i.e. in the banaserve mode: 12 × (24 + 14 + ~1) + 6 × (24 + 14 + 15) s + the starts).
# quick: the three workloads the targets name, 12 s of arrivals each, ≈ 5 min.
PROFILES = {
    "full": Profile(24.0, 14.0, 15.0),
    "quick": Profile(12.0, 12.0, 6.0, ("phase-shift", "mixed", "hotspot")),
}


@dataclass(frozen=True)
class SendLimits:
    """What ``bench.serve_bench.drive`` reads from its arguments."""

    timeout: float
    max_run_s: float
    max_concurrency: int | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="prepared model (default smollm2-135m)")
    p.add_argument("--modes", type=name_list(MODES), default=list(MODES), help="default: all three")
    p.add_argument("--workloads", type=name_list(FAMILIES), default=None,
                   help=f"default: the profile's (full: {', '.join(FAMILIES)})")  # fmt: skip
    profile = p.add_mutually_exclusive_group()
    profile.add_argument("--profile", choices=tuple(PROFILES), default=None,
                         help="(default) full: every workload, 24 s of arrivals each (~13 min); quick: 3 workloads, 12 s (~5 min)")  # fmt: skip
    profile.add_argument("--quick", dest="profile", action="store_const", const="quick",
                         help="same as --profile quick")  # fmt: skip
    p.add_argument(
        "--duration", type=positive(float), default=None, help="seconds of arrivals (override)"
    )
    p.add_argument(
        "--drain-s",
        type=non_negative(float),
        default=None,
        help="after the last arrival (override)",
    )
    p.add_argument(
        "--settle-s", type=non_negative(float), default=None, help="between workloads (override)"
    )
    p.add_argument(
        "--rate-scale", type=positive(float), default=1.0, help="multiplies every arrival rate"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every workload")
    p.add_argument("--slo-ttft-ms", type=positive(float), default=None,
                   help="TTFT SLO for every workload (default: each workload's own)")  # fmt: skip
    p.add_argument("--slo-tpot-ms", type=positive(float), default=None,
                   help="TPOT SLO for every workload (default: each workload's own, 250 ms)")  # fmt: skip
    p.add_argument("--threads", type=thread_count, default=1, help="torch threads per worker")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin each worker to its own CPU (default: on)")  # fmt: skip
    p.add_argument(
        "--max-model-len", type=positive(int), default=2048, help="prompts + outputs clip to it"
    )
    p.add_argument("--traces-dir", type=Path, default=DEFAULT_TRACES_DIR)
    p.add_argument("--vocab-range", type=vocab_range, default=VOCAB,
                   help="prompt token ids from [LOW, HIGH) (default 1000:30000)")  # fmt: skip
    p.add_argument(
        "--warmup", type=non_negative(int), default=2, help="unrecorded requests per cluster"
    )
    p.add_argument("--up-args", type=shell_words, default="",
                   help="extra `banaserve up` flags for every mode")  # fmt: skip
    p.add_argument("--fresh-cluster-per-workload", action="store_true",
                   help="a new cluster for every workload, not one per mode")  # fmt: skip
    p.add_argument("--plan-only", action="store_true", help="write the plans, start nothing")
    p.add_argument("--out", type=path_arg, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--label", type=label_arg, default=None, help="file suffix: compare-LABEL.*")


@dataclass(frozen=True)
class Job:
    """One workload's plan and SLO, the same for every mode."""

    workload: Workload
    planned: list[PlannedRequest]
    slo: tuple[float, float]


def jobs_from_args(args: argparse.Namespace, profile: Profile) -> list[Job]:
    jobs = []
    for name in profile.workloads:
        try:
            w = workload(name, args.rate_scale)
            planned = plan(w, profile.duration_s, args.seed, args.max_model_len,
                           args.traces_dir, args.vocab_range)  # fmt: skip
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        slo = (args.slo_ttft_ms or w.slo_ttft_ms, args.slo_tpot_ms or w.slo_tpot_ms)
        jobs.append(Job(w, planned, slo))
    return jobs


def profile_of(args: argparse.Namespace) -> Profile:
    base = PROFILES[args.profile or "full"]
    return Profile(
        args.duration or base.duration_s,
        base.drain_s if args.drain_s is None else args.drain_s,
        base.settle_s if args.settle_s is None else args.settle_s,
        tuple(args.workloads) if args.workloads else base.workloads,
    )


# ---- running ----------------------------------------------------------------------------


async def warm_up(router: str, count: int, seed: int, vocab: tuple[int, int]) -> None:
    """``count`` short requests at once, so no workload pays a worker's first step."""
    if count <= 0:
        return
    rng = random.Random(f"{seed}:warmup")
    target = make_target(Endpoint("grpc", *split(router)), None, Sampling(), "cmp-warmup")
    plan_ = [(Request(i, [rng.randrange(*vocab) for _ in range(32)], 4), 0.0)
             for i in range(count)]  # fmt: skip
    try:
        await drive(target, plan_, SendLimits(60.0, 60.0), Progress(count, False))
    finally:
        await target.close()


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


async def run_job(
    cluster: UpCluster, watcher: Watcher, mode: Mode, job: Job, profile: Profile
) -> dict:
    try:
        known = {m["id"]: m for m in await watcher.migrations()}
    except grpc.aio.AioRpcError:
        known = {}  # the watcher will see them as new: counted in this run
    name = job.workload.name
    target = make_target(
        Endpoint("grpc", *split(cluster.router)), None, Sampling(), f"cmp-{mode.value}-{name}"
    )
    deadline = profile.duration_s + profile.drain_s  # from the first send
    limits = SendLimits(timeout=deadline, max_run_s=deadline)
    watch = Watch(time.perf_counter(), migrations=dict(known))
    sampler = asyncio.create_task(watcher.run(watch))
    try:
        sends = [(p.request, p.at_s) for p in job.planned]
        records = await drive(target, sends, limits, Progress(len(sends), False))
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await target.close()
    settled = await watcher.settle(profile.settle_s, watch)
    result = run_result(mode.value, name, records, job.slo, watch.samples, watch.events, known)
    result["deadline_s"] = deadline
    result["settle_s"] = settled
    result["num_missed_samples"] = watch.num_missed
    print(f"compare: {mode.value} {name}: {result['summary']['num_ok']}/{len(records)} ok, "
          f"{result['migrations']['num_started']} migrations", file=sys.stderr)  # fmt: skip
    return result


async def run_on_cluster(
    cluster: UpCluster, mode: Mode, jobs: list[Job], profile: Profile, args: argparse.Namespace
) -> list[dict]:
    await warm_up(cluster.router, args.warmup, args.seed, args.vocab_range)
    watcher = Watcher(cluster.router, cluster.coordinator)
    try:
        await watcher.settle(profile.settle_s)
        return [await run_job(cluster, watcher, mode, job, profile) for job in jobs]
    finally:
        await watcher.close()


def check_up_args(args: argparse.Namespace) -> None:
    """Every mode's ``up`` command line read as ``up`` reads it, before any cluster:
    ``--up-args`` that a mode refuses (``--decode 2`` where the mode decides) fail now, not
    after the modes before it have run."""
    from services.up import spec_from_argv

    extra = tuple(shlex.split(args.up_args))
    for mode in (Mode(m) for m in args.modes):
        argv = up_argv(mode, args.model, args.threads, args.pin, extra)[4:]  # after "up"
        try:
            spec_from_argv(argv)
        except ConfigError as exc:
            raise ConfigError(f"--up-args for mode {mode.value}: {exc}") from None


def run_mode(
    mode: Mode, jobs: list[Job], profile: Profile, args: argparse.Namespace, out: Path
) -> tuple[list[dict], list[dict]]:
    """Every job on ``mode``'s cluster(s); the runs and what each cluster did."""
    groups = [[j] for j in jobs] if args.fresh_cluster_per_workload else [jobs]
    runs, clusters = [], []
    extra = tuple(shlex.split(args.up_args))
    for i, group in enumerate(groups):
        argv = up_argv(mode, args.model, args.threads, args.pin, extra)
        log = out / "logs" / f"compare-{mode.value}{f'-{i}' if len(groups) > 1 else ''}.log"
        started = time.monotonic()
        cluster = UpCluster(argv, log)
        cluster.start()
        ready_s = time.monotonic() - started
        try:
            runs += asyncio.run(run_on_cluster(cluster, mode, group, profile, args))
        finally:
            code = cluster.stop()
        clusters.append({"mode": mode.value, "argv": argv[2:], "ready_s": ready_s,
                         "exit_code": code, "log": str(log)})  # fmt: skip
    return runs, clusters


# ---- report -----------------------------------------------------------------------------


def workloads_section(jobs: list[Job]) -> dict:
    return {
        job.workload.name: {
            "description": job.workload.description,
            "slo_ttft_ms": job.slo[0],
            "slo_tpot_ms": job.slo[1],
            "num_requests": len(job.planned),
            "plan": [
                {
                    "index": p.request.index,
                    "at_s": p.at_s,
                    "tag": p.tag,
                    "num_prompt_tokens": len(p.request.prompt),
                    "max_tokens": p.request.max_tokens,
                    "prefix_id": p.request.prefix_id,
                }
                for p in job.planned
            ],  # fmt: skip
        }
        for job in jobs
    }


def config_of(args: argparse.Namespace, profile: Profile, modes: list[str]) -> dict:
    return {
        "model": args.model,
        "modes": modes,
        "workloads": list(profile.workloads),
        "profile": args.profile or "full",
        "duration_s": profile.duration_s,
        "drain_s": profile.drain_s,
        "settle_s": profile.settle_s,
        "rate_scale": args.rate_scale,
        "seed": args.seed,
        "threads": args.threads,
        "pin": args.pin,
        "max_model_len": args.max_model_len,
        "vocab_range": list(args.vocab_range),
        "warmup": args.warmup,
        "fresh_cluster_per_workload": args.fresh_cluster_per_workload,
        "up_args": {m: list(MODE_UP_ARGS[Mode(m)]) for m in modes},
        "mode_clusters": {m: mode_cluster(Mode(m)) for m in modes},
        # up's data planes before --up-args (the simulator replays the run's transport)
        "up_data_planes": {"kv_transport": LOCAL_DATA_PLANE, "kvstore_transport": LOCAL_DATA_PLANE},
        "extra_up_args": args.up_args,
    }


def write_report(report: dict, out: Path, stem: str) -> list[Path]:
    from bench.compare_plots import write_plots

    markdown = render_markdown(report)
    (out / f"{stem}.json").write_text(json.dumps(json_safe(report), indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    return [out / f"{stem}.json", out / f"{stem}.md", *write_plots(report, out, stem)]


def run(args: argparse.Namespace) -> int:
    profile = profile_of(args)
    out = output_dir(Path(args.out), "--out")  # before planning, and before any cluster
    output_dir(out / "logs", "--out")
    check_up_args(args)
    jobs = jobs_from_args(args, profile)
    stem = f"compare-{args.label}" if args.label else "compare"
    if args.plan_only:
        (out / f"{stem}-plan.json").write_text(json.dumps(workloads_section(jobs), indent=1))
        print(f"wrote {out / f'{stem}-plan.json'}")
        return 0
    machine, started = machine_info(), time.monotonic()
    runs, clusters = [], []
    for mode in (Mode(m) for m in args.modes):
        mode_runs, mode_clusters = run_mode(mode, jobs, profile, args, out)
        runs += mode_runs
        clusters += mode_clusters
    machine |= {"loadavg_after": loadavg(), "wall_seconds": round(time.monotonic() - started, 1)}
    table = [row(r) for r in runs]
    report = {
        "benchmark": "compare",
        "config": config_of(args, profile, args.modes),
        "machine": machine,
        "workloads": workloads_section(jobs),
        "clusters": clusters,
        "table": table,
        "ratios": ratios(table),
        "runs": runs,
    }
    write_report(report, out, stem)
    return 0 if all(r["summary"]["num_ok"] for r in runs) else 1
