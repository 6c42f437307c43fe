"""``banaserve bench migration``: layer migration's figures (issue 10) side by side in one run.

Lifecycle of a run:

1. profile the model in-process (``bench.migration_cost``: per-layer, LM-head and other cost
   of a decode step at the rows of one micro-batch of the decode load, and of a prefill chunk) and pick ``k`` for
   each direction so that the donor's and the helper's halves of a step balance (``--k`` /
   ``--prefill-k`` override);
2. start one 1P1D cluster with the coordinator (``banaserve up --coordinator``'s; ``--pin``:
   each worker on its own CPU, ``--threads`` torch threads per worker), the KV and migration
   data planes on ``--transport``;
3. ``T_sync``: one migration of the decode worker's ``[k, L)`` on an idle cluster (nothing to
   copy), COPYING + SWITCHING time, then reverted;
4. decode-heavy load, ``--rounds`` times, alternating which variant goes first (ABBA): a
   batch of ``--decode-concurrency`` short prompts with long outputs; once every request
   streams, either nothing (``baseline``) or a migration of the decode worker's ``[k, L)`` to
   the prefill worker with ``--micro-batches`` (``migrated``, measured from ACTIVE on); the
   window ends at the first request's last token, so the batch is whole throughout; reverted
   after the batch;
5. prefill-heavy load, the same way: a burst of long prompts with few output tokens, the
   prefill worker's ``[k, L)`` on the decode worker (a prefill donor). A donor that refuses
   (the migration ends before ACTIVE) makes this section "not available" with the reason;
6. stop the cluster, then measure ``B``: one-way data-plane transfers of the same number of
   bytes as the migrations moved before ACTIVE (``bench.migration_cost``);
7. write ``OUT/migration[-LABEL].json`` and ``.md`` (``bench.migration_report``), print the
   table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from bench.machine import loadavg, machine_info
from bench.migration_cost import measure_bandwidth, one_cpu, profile_layers
from bench.migration_driver import ClusterBench
from bench.migration_report import render_markdown
from bench.serve_bench import vocab_range
from services.common.arg_types import label_arg, positive, thread_count
from services.common.paths import output_dir
from services.engine.models.prepare import resolve_model
from services.launcher import ClusterSpec, LocalCluster

REPO_ROOT = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``banaserve bench migration`` flags."""
    p.add_argument("--model", default="smollm2-135m", help="prepared model name or directory")
    p.add_argument("--pin", action="store_true", help="pin each worker to its own CPU")
    p.add_argument("--threads", type=thread_count, default=1, help="torch threads per worker")
    p.add_argument("--rounds", type=positive(int), default=2,
                   help="runs of each variant per load, alternating which goes first")  # fmt: skip
    p.add_argument("--micro-batches", type=int, choices=(1, 2), default=2)
    p.add_argument("--no-pipelined-steps", dest="pipelined_steps", action="store_false",
                   help="workers keep both micro-batches inside one step (the old schedule)")  # fmt: skip
    p.add_argument("--k", type=positive(int), default=None,
                   help="decode worker's first layer that moves (default: balanced, measured)")  # fmt: skip
    p.add_argument("--prefill-k", type=positive(int), default=None,
                   help="prefill worker's first layer that moves (default: balanced)")  # fmt: skip
    p.add_argument("--decode-concurrency", type=positive(int), default=16)
    p.add_argument("--decode-input-len", type=positive(int), default=32)
    p.add_argument("--decode-output-len", type=positive(int), default=384)
    p.add_argument("--prefill-requests", type=positive(int), default=8)
    p.add_argument("--prefill-input-len", type=positive(int), default=1024)
    p.add_argument("--prefill-output-len", type=positive(int), default=2)
    p.add_argument("--no-prefill-load", dest="prefill_load", action="store_false",
                   help="skip the prefill-heavy load")  # fmt: skip
    p.add_argument("--num-kv-blocks", type=positive(int), default=None, help="per worker")
    p.add_argument("--transport", choices=("tcp", "ucx"), default="tcp",
                   help="the data plane of KV handoff and migration (and of B)")  # fmt: skip
    p.add_argument("--vocab-range", type=vocab_range, default=(5, 4000),
                   help="prompt token ids are drawn from [LOW, HIGH)")  # fmt: skip
    p.add_argument("--timeout", type=positive(float), default=600.0,
                   help="seconds allowed per request and per migration step")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    p.add_argument(
        "--label", type=label_arg, default=None, help="file suffix: migration-LABEL.json / .md"
    )


def profile(args: argparse.Namespace, model_dir: Path) -> dict:
    """Per-layer costs of both kinds of step and the k each direction uses (and why)."""
    # at the rows one micro-batch carries: what each stage of a split step computes
    rows = max(1, args.decode_concurrency // args.micro_batches)
    with one_cpu(args.pin):
        decode = profile_layers(model_dir, "decode", rows, args.decode_input_len, 32, args.seed)
        prefill = profile_layers(
            model_dir, "prefill", 2, min(args.prefill_input_len, 2048), 0, args.seed
        )
    return {
        "decode": decode.to_json() | {"k": args.k or decode.balanced_k(), "k_given": bool(args.k)},
        "prefill": prefill.to_json()
        | {"k": args.prefill_k or prefill.balanced_k(), "k_given": bool(args.prefill_k)},
    }


def cluster_spec(args: argparse.Namespace) -> ClusterSpec:
    # Every decode-heavy sequence in one step (the engines' default is 64), and admission sized
    # for the one benchmark client sending them all at once (its default share is 3/4 of 64).
    seqs = str(max(64, args.decode_concurrency))
    admission = ("--admission-max-in-flight", seqs, "--admission-max-per-client", seqs)
    worker = ("--migration-transport", args.transport, "--max-num-seqs", seqs, *admission)
    if not args.pipelined_steps:
        worker = (*worker, "--no-pipelined-steps")
    return ClusterSpec(
        model=args.model, threads=args.threads, pin=args.pin, num_kvstore=0,
        kv_transport=args.transport, coordinator=True, num_kv_blocks=args.num_kv_blocks,
        service_args={
            "prefill": worker,
            "decode": (*worker, "--max-reservations-per-client", seqs),
            "router": admission,
        },
    )  # fmt: skip


def run_cluster(args: argparse.Namespace, costs: dict, out: Path) -> dict:
    with open(out / "logs" / "migration-cluster.log", "w") as log:
        cluster = LocalCluster(cluster_spec(args), log)
        cluster.start()
        try:
            bench = ClusterBench(cluster, args, costs)
            return asyncio.run(bench.run())
        finally:
            codes = cluster.stop()
            if set(codes.values()) != {0}:
                print(f"migration bench: services exited with {codes}", file=sys.stderr)


def bandwidth(args: argparse.Namespace, results: dict, out: Path) -> dict:
    """B measured with transfers of the median bytes a migration moved before ACTIVE."""
    moved = [
        r["migration"]["bytes_before_active"]
        for r in results["decode"]["runs"]
        if r.get("migration") and r["migration"]["reached_active"]
    ]
    size = int(statistics.median(moved)) if moved else 1 << 20
    return measure_bandwidth(size, args.transport, out)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, write migration.json and migration.md, print the table."""
    model_dir = resolve_model(args.model)
    out = output_dir(Path(args.out), "--out")  # before profiling (minutes): no run lost to it
    output_dir(out / "logs", "--out")
    machine = machine_info(pinned=args.pin, threads_per_worker=args.threads)
    started = time.monotonic()
    costs = profile(args, model_dir)
    results = run_cluster(args, costs, out)
    results["bandwidth"] = bandwidth(args, results, out)
    machine |= {"loadavg_after": loadavg(), "wall_seconds": round(time.monotonic() - started, 1)}
    report = {
        "benchmark": "migration",
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "machine": machine,
        "costs": costs,
        **results,
    }
    markdown = render_markdown(report)
    stem = f"migration-{args.label}" if args.label else "migration"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    return 0 if all("failed" not in r for r in results["decode"]["runs"]) else 1
