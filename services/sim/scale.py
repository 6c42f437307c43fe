"""``banaserve sim run``: BanaServe vs colocated vs the best static PD split, at cluster scale.

For each worker count ``N`` (``--workers 8,32,128``) and each workload (``bench/workloads.py``'s
families, the Mooncake conversation trace among them, plus the Mooncake synthetic trace):

1. the workload is ``bench compare``'s, its arrival rates multiplied by ``N / 2 × --load`` (the
   catalog offers about one 2-worker cluster's worth of work: ``N`` workers get ``N / 2`` times
   that), over ``--duration`` seconds, seed ``--seed``;
2. ``colocated`` runs on N mixed workers, ``banaserve`` on its default split (half prefill);
3. ``static-pd`` runs at every split of ``--splits`` (shares of prefill workers) and the best
   one by goodput (then output throughput) is kept, as DistServe searches its placement;
4. the report (``sim-scale.md``), its JSON and plots (``sim_plots.py``) go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from bench.workloads import FAMILIES, workload
from bench.workloads_trace import DEFAULT_TRACES_DIR, TraceWorkload
from services.common.arg_types import (
    name_list,
    non_negative,
    number_list,
    path_arg,
    positive,
    share_list,
)
from services.common.errors import ConfigError
from services.common.paths import output_dir, output_file
from services.launcher import Mode
from services.prefill.write_backs import WritePolicy
from services.sim.calibrate import DEFAULT_PROFILE_DIR, find_profile
from services.sim.cluster import SimSpec, check_cluster_size
from services.sim.inputs import check_plan_size, plan_workload
from services.sim.plots import PLOT_FILES
from services.sim.profile import Profile
from services.sim.replay import RunOutcome, simulate
from services.sim.store import DEFAULT_CAPACITY_BYTES
from services.sim.validate import BANASERVE_DECODE, BANASERVE_ROUTER

EXTRA_TRACE = TraceWorkload(
    "mooncake-synthetic",
    "Mooncake synthetic trace from its start: lengths ÷ 32 (max 1,536 in), time × 4",
    "mooncake_synthetic.jsonl",
    slo_ttft_ms=5_000.0,
    slo_tpot_ms=250.0,
)
# The paper's published ranges (BanaServe, arXiv 2510.13223): throughput over vLLM and DistServe.
PAPER = {"colocated": (1.2, 3.9), "static-pd": (1.1, 2.8)}
# The largest cluster ``--workers`` takes (the scale is 8-128 workers); the profile's KV
# pool bounds it further (``cluster.MAX_CLUSTER_BLOCKS``).
MAX_WORKERS = 4096
DEFAULT_MODEL = "smollm2-135m"
REPORT_FILES = ("sim-scale.md", "sim-scale.json")  # in --out, with the plots' PLOT_FILES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help=f"default: --profile's model, else {DEFAULT_MODEL}"
    )
    p.add_argument(
        "--profile", type=path_arg, default=None, help="default: this machine's, else shipped"
    )
    p.add_argument("--workers", type=_cluster_sizes, default=[8, 32, 128],
                   help=f"comma list of cluster sizes, each 2 to {MAX_WORKERS} "
                   "(default 8,32,128)")  # fmt: skip
    names = (*FAMILIES, EXTRA_TRACE.name)
    p.add_argument("--workloads", type=name_list(names), default=list(names),
                   help=f"comma list of {', '.join(names)} (default: all)")  # fmt: skip
    p.add_argument("--duration", type=positive(float), default=60.0, help="seconds of arrivals")
    p.add_argument("--drain-s", type=non_negative(float), default=60.0)
    p.add_argument("--load", type=positive(float), default=1.0, help="x the per-2-workers rate")
    p.add_argument("--splits", type=share_list, default=[0.25, 0.375, 0.5, 0.625, 0.75],
                   help="prefill shares searched for static-pd, each in (0, 1) "
                   "(default 0.25,0.375,0.5,0.625,0.75)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill-donors", action="store_true",
                   help="banaserve: prefill workers may donate layers too (coordinator flag)")  # fmt: skip
    p.add_argument("--store-capacity", type=positive(int), default=DEFAULT_CAPACITY_BYTES, metavar="BYTES",
                   help="banaserve's global KV store (default one node's 1 GiB)")  # fmt: skip
    p.add_argument("--store-write-policy", choices=[w.value for w in WritePolicy],
                   default=WritePolicy.REUSED.value,
                   help="banaserve: which new blocks are written to the store (as the prefill "
                   "worker's --store-write-policy; default %(default)s)")  # fmt: skip
    p.add_argument("--local-prefill-max-tokens", type=non_negative(int),
                   default=BANASERVE_ROUTER.local_prefill_max_tokens, metavar="N",
                   help="banaserve's router: a decode worker prefills a prompt itself when its "
                   "prefix cache holds all but at most N tokens (router flag; 0: never; default "
                   "%(default)s, as up --mode banaserve)")  # fmt: skip
    p.add_argument("--local-prefill-queue-tokens", type=non_negative(int),
                   default=BANASERVE_ROUTER.local_prefill_queue_tokens, metavar="Q",
                   help="banaserve's router: ... and any prompt while the prefill worker has at "
                   "least Q prompt tokens queued and the decode worker fewer (router flag; 0: "
                   "never; default %(default)s)")  # fmt: skip
    p.add_argument("--decode-max-num-batched-tokens", type=positive(int),
                   default=BANASERVE_DECODE.max_num_batched_tokens, metavar="T",
                   help="banaserve's decode workers: the most prompt tokens they prefill in a "
                   "step (their --max-num-batched-tokens; default %(default)s)")  # fmt: skip
    p.add_argument("--decode-max-prefill-tokens-while-decoding", type=non_negative(int),
                   default=BANASERVE_DECODE.max_prefill_tokens_while_decoding, metavar="C",
                   help="banaserve's decode workers: the most prompt tokens a step that decodes "
                   "computes (their --max-prefill-tokens-while-decoding; 0: none; default "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--traces-dir", type=path_arg, default=DEFAULT_TRACES_DIR)
    p.add_argument("--out", type=path_arg, default=DEFAULT_PROFILE_DIR)


def _cluster_sizes(text: str) -> list[int]:
    """Comma-separated worker counts, each at least 2 (a PD split needs a worker of each) and
    at most ``MAX_WORKERS``; each once, in the order given."""
    sizes = number_list(int)(text)
    if min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"expected cluster sizes of at least 2 workers; {text!r}")
    if max(sizes) > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_WORKERS} workers; {text!r}")
    return list(dict.fromkeys(sizes))


def workload_of(name: str, rate_scale: float):  # noqa: ANN201
    if name == EXTRA_TRACE.name:
        return replace(EXTRA_TRACE, time_scale=EXTRA_TRACE.time_scale / rate_scale)
    return workload(name, rate_scale)


def prefill_counts(n: int, shares: list[float]) -> list[int]:
    return sorted({min(n - 1, max(1, round(n * s))) for s in shares})


def better(a: dict, b: dict | None) -> bool:
    if b is None:
        return True
    key = lambda r: (r["goodput"] or 0.0, r["output_throughput"] or 0.0)  # noqa: E731
    return key(a) > key(b)


def scale_point(n: int, name: str, profile: Profile, args: argparse.Namespace) -> dict:
    w = workload_of(name, n / 2 * args.load)
    planned = plan_workload(w, args.duration, args.seed, traces_dir=args.traces_dir)
    slo = (w.slo_ttft_ms, w.slo_tpot_ms)
    base = SimSpec(Mode.COLOCATED, n, deadline_s=args.duration + args.drain_s,
                   prefill_donors=args.prefill_donors,
                   store_capacity_bytes=args.store_capacity,
                   store_write_policy=WritePolicy(args.store_write_policy))  # fmt: skip
    out: dict = {"workers": n, "workload": name, "num_requests": len(planned), "runs": {}}
    for mode in (Mode.COLOCATED, Mode.BANASERVE):
        spec = replace(base, mode=mode)
        if mode is Mode.BANASERVE:  # its router's conditional disaggregation, when asked for
            spec = replace(spec, sample_interval_s=1.0,
                           local_prefill_max_tokens=args.local_prefill_max_tokens,
                           local_prefill_queue_tokens=args.local_prefill_queue_tokens,
                           decode_max_num_batched_tokens=args.decode_max_num_batched_tokens,
                           decode_max_prefill_tokens_while_decoding=(
                               args.decode_max_prefill_tokens_while_decoding))  # fmt: skip
        res = simulate(spec, profile, planned, name, slo)
        out["runs"][mode.value] = res.row | failures(res) | {
            "wall_s": res.wall_s, "samples": res.samples,
            "store_hit_tokens": res.num_store_hit_tokens,
            "local_prefills": res.num_local_prefills}  # fmt: skip
    best = None
    splits = []
    for k in prefill_counts(n, args.splits):
        spec = replace(base, mode=Mode.STATIC_PD, num_prefill=k)
        res = simulate(spec, profile, planned, name, slo)
        r = res.row | failures(res) | {"num_prefill": k}
        splits.append(r)
        if better(r, best):
            best = r
    out["runs"]["static-pd"] = best
    out["splits"] = splits
    return out


def failures(res: RunOutcome) -> dict:
    """A run's failed requests by status, and each status's first message (a request larger
    than any worker's KV pool, one unfinished at the deadline): every planned request is
    either among ``num_ok`` or here."""
    return {"failures": res.summary["failures"], "failure_messages": res.failure_messages}


def ratios(point: dict) -> dict:
    runs = point["runs"]
    subject = runs["banaserve"]
    out = {}
    for base in ("colocated", "static-pd"):
        b = runs[base]
        out[base] = {
            key: (subject[key] / b[key]) if subject[key] and b[key] else None
            for key in ("output_throughput", "goodput")
        }
    return out


def render(points: list[dict], profile: Profile, args: argparse.Namespace) -> str:
    lines = [
        "# Simulated scale: banaserve vs colocated vs best static PD", "",
        f"Profile: {profile.model}, {profile.source}. Load {args.load} x the per-2-worker rate, "
        f"{args.duration:.0f} s of arrivals, seed {args.seed}"
        f"{', prefill donors on' if args.prefill_donors else ''}{_local_prefill(args)}. "
        "Ratios are banaserve / baseline "
        "(output throughput; goodput at the workload's SLO). Paper: 1.2-3.9x vs vLLM "
        "(colocated), 1.1-2.8x vs DistServe (static PD).", "",
        "| N | workload | requests | completed coloc / static / bana | best static P:D "
        "| out tok/s coloc / static / bana "
        "| goodput coloc / static / bana | bana/coloc thr | bana/static thr | bana/coloc goodput "
        "| bana/static goodput | migrations | store hit tokens | prefilled by decode |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for p in points:
        r, q = p["runs"], ratios(p)
        k = r["static-pd"]["num_prefill"]
        done = " / ".join(str(r[m]["num_ok"]) for m in ("colocated", "static-pd", "banaserve"))
        lines.append(
            f"| {p['workers']} | {p['workload']} | {p['num_requests']} | {done} "
            f"| {k}:{p['workers'] - k} "
            f"| {f(r['colocated']['output_throughput'])} / {f(r['static-pd']['output_throughput'])}"
            f" / {f(r['banaserve']['output_throughput'])} | {f(r['colocated']['goodput'])} / "
            f"{f(r['static-pd']['goodput'])} / {f(r['banaserve']['goodput'])} "
            f"| {f(q['colocated']['output_throughput'])} | {f(q['static-pd']['output_throughput'])}"
            f" | {f(q['colocated']['goodput'])} | {f(q['static-pd']['goodput'])} "
            f"| {r['banaserve']['num_migrations']} "
            f"| {r['banaserve'].get('store_hit_tokens', 0)} "
            f"| {r['banaserve'].get('local_prefills', 0)} |"
        )
    failed = failed_lines(points)
    if failed:
        lines += ["", "Failed requests (not in the throughputs and goodputs above):", "", *failed]
    return "\n".join(lines) + "\n"


def failed_lines(points: list[dict]) -> list[str]:
    """One line per run that failed requests: how many, by status, with the first message."""
    lines = []
    for p in points:
        for mode, r in p["runs"].items():
            for status, count in r.get("failures", {}).items():
                message = r.get("failure_messages", {}).get(status, "")
                lines.append(f"- N={p['workers']} {p['workload']} {mode}: {count} of "
                             f"{r['num_requests']} {status}{': ' if message else ''}{message}")  # fmt: skip
    return lines


def _local_prefill(args: argparse.Namespace) -> str:
    n, q = args.local_prefill_max_tokens, args.local_prefill_queue_tokens
    if not (n or q):
        return ", no local prefill on banaserve's decode workers"
    return (f", banaserve's router --local-prefill-max-tokens {n} --local-prefill-queue-tokens "
            f"{q}, its decode workers --max-num-batched-tokens "
            f"{args.decode_max_num_batched_tokens} --max-prefill-tokens-while-decoding "
            f"{args.decode_max_prefill_tokens_while_decoding}")  # fmt: skip


def write_report(points: list[dict], profile: Profile, args: argparse.Namespace) -> str:
    """The markdown and JSON of the points so far (written after each: a long run can be
    stopped and still leaves what it measured)."""
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = render(points, profile, args)
    (args.out / REPORT_FILES[0]).write_text(markdown)
    slim = [p | {"runs": {m: {k: v for k, v in r.items() if k != "samples"}
                          for m, r in p["runs"].items()}} for p in points]  # fmt: skip
    (args.out / REPORT_FILES[1]).write_text(json.dumps(slim, indent=1) + "\n")
    return markdown


def check_inputs(profile: Profile, args: argparse.Namespace) -> None:
    """What would fail or fill the memory at some point of the run, refused before its first:
    the largest cluster's KV pool, each workload's plan at the largest cluster's rate, the
    output directory."""
    n = max(args.workers)
    check_cluster_size(n, profile.num_kv_blocks)
    for name in args.workloads:
        check_plan_size(workload_of(name, n / 2 * args.load), args.duration)
    output_dir(args.out, "--out")
    for name in (*REPORT_FILES, *PLOT_FILES):  # each file of the report, not only its directory
        output_file(args.out / name, "--out")


def run(args: argparse.Namespace) -> int:
    profile = Profile.load(find_profile(args.model or DEFAULT_MODEL, args.profile))
    if args.model and profile.model != args.model:  # session 40's probe: run on the other one
        raise ConfigError(f"--model {args.model}, but {args.profile} is {profile.model}'s profile")
    args.model = profile.model
    args.workloads = list(dict.fromkeys(args.workloads))
    check_inputs(profile, args)
    points = []
    for n in args.workers:
        for name in args.workloads:
            started = time.perf_counter()
            points.append(scale_point(n, name, profile, args))
            print(f"N={n} {name}: {points[-1]['num_requests']} requests, "
                  f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
            for line in failed_lines(points[-1:]):
                print(f"  {line[2:]}", flush=True)
            markdown = write_report(points, profile, args)
    from services.sim.plots import write_plots

    written = write_plots(points, args.out)
    print(markdown)
    print("wrote", args.out / "sim-scale.md", *written)
    return 0
