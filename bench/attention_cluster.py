"""Attention migration on a KV-bound 1P1D cluster: decode without vs with blocks on the prefill
worker (issue 11's figures), side by side in one run.

    .venv/bin/python -m bench.attention_cluster --model smollm2-135m --pin --threads 1 \
        --decode-blocks 256 --prefill-blocks 2048 --requests 12 --input-len 1500 \
        --output-len 512 --max-sequences 12 --rounds 1 --out bench/results

(The decode pool holds 2 of those sequences; outputs this long against one prefill worker's
1,500-token prompts keep the decode worker memory-bound: with 128 output tokens it waits for
prompts instead, docs/migration.md "Attention migration: figures".)

Lifecycle of a run:

1. one 1P1D cluster with the coordinator (``banaserve up --coordinator``'s; ``--pin``: each
   worker on its own CPU, ``--threads`` torch threads each), the decode worker's KV pool
   ``--decode-blocks`` (a few long sequences), the prefill worker's ``--prefill-blocks``;
2. ``--rounds`` rounds of both variants, the first alternating (ABBA): ``--requests`` greedy
   prompts of ``--input-len`` tokens, ``--output-len`` out, all sent at once (the router queues
   what the decode worker cannot reserve); ``baseline`` runs them as they come; ``migrated``
   also runs a driver that starts one attention migration of the decode worker's longest
   sequences to the prefill worker with ``refill``: while ACTIVE the decode worker keeps up to
   ``--max-sequences`` of its sequences located, moving the next longest as located ones end,
   so its freed blocks admit more requests (reverted at the end; started again if it ended).
   ``--no-refill``: the migration takes the sequences of its switch only, and the driver
   reverts it once they have all ended (no block left on the helper) and starts another;
3. per run: decode throughput (output tokens after each request's first, over the span from
   the first first token to the last token), TPOT p50/p99, the decode worker's running batch
   (sampled every 0.1 s: mean, max), its preemptions (the worker's counter) and waiting
   sequences (preempted ones recomputing: max), migrations, blocks moved and sequences
   recomputed at a revert, the exchanges with the helper (round trip, the share hidden);
4. write ``OUT/attention-cluster[-LABEL].json`` and print the table.

``--auto``: no driver; the coordinator runs ``--auto --attention --attention-refill`` and
decides alone, and the migrated variant follows the migrations it starts. It would migrate in
the baseline too, so that one runs in a cluster without: ``--variants baseline`` (no
``--auto``) then ``--auto --variants migrated``, back to back (docs/migration.md, "The
coordinator deciding alone").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import grpc

from bench.machine import loadavg, machine_info
from bench.migration_load import Stream, gaps_in, prompts, send_all
from bench.serve_report import distribution
from services.client.client import AsyncBanaServeClient
from services.common.arg_types import label_arg, positive, thread_count
from services.launcher import ClusterSpec, LocalCluster
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import (
    coordinator_pb2_grpc,
    decode_pb2,
    decode_pb2_grpc,
    migration_pb2,
    migration_pb2_grpc,
)

VARIANTS = ("baseline", "migrated")
ENDED = (pb.MIGRATION_STATE_DONE, pb.MIGRATION_STATE_ABORTED)
SETTLED = (pb.MIGRATION_STATE_ACTIVE, *ENDED)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=thread_count, default=1)
    p.add_argument("--pin", action="store_true")
    p.add_argument("--transport", default="tcp", choices=("tcp", "ucx"))
    p.add_argument("--decode-blocks", type=positive(int), default=640)
    p.add_argument("--prefill-blocks", type=positive(int), default=4096)
    p.add_argument("--requests", type=positive(int), default=16)
    p.add_argument("--input-len", type=positive(int), default=2000)
    p.add_argument("--output-len", type=positive(int), default=128)
    p.add_argument("--max-sequences", type=positive(int), default=3)
    p.add_argument(
        "--no-refill",
        dest="refill",
        action="store_false",
        help="cycle migrations (start, revert once its sequences ended) instead of one migration "
        "kept filled with up to --max-sequences located sequences",
    )
    p.add_argument("--rounds", type=positive(int), default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=positive(float), default=1800.0)
    # A decode reservation waits for its prompt behind the others on the one prefill worker:
    # on a loaded CPU that outlasts the router's 30 s default lease (the request fails).
    p.add_argument("--reserve-lease", type=positive(float), default=300.0, metavar="S")
    p.add_argument(
        "--located-micro-batches", type=int, default=None, metavar="N",
        help="the decode worker's (default: the engine's); 1: a step's located sequences wait "
        "at every layer together",
    )  # fmt: skip
    p.add_argument(
        "--decode-arg", action="append", default=[], metavar="ARG",
        help="one more argument of the decode worker's, as written on its command line "
        "(repeat it: --decode-arg=--max-prefill-tokens-while-decoding --decode-arg=256)",
    )  # fmt: skip
    p.add_argument(
        "--auto", action="store_true",
        help="no driver: the coordinator decides alone (--auto --attention --attention-refill, "
        "its default thresholds); the migrated variant only watches its migrations. Its "
        "baseline needs a cluster without: run --variants baseline without --auto beside it",
    )  # fmt: skip
    p.add_argument(
        "--coordinator-arg", action="append", default=[], metavar="ARG",
        help="one more argument of the coordinator's (with --auto: --cooldown-s ...)",
    )  # fmt: skip
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        type=variants,
        help="which to run, in ABBA order (default: both)",
    )
    p.add_argument("--out", default="")
    p.add_argument("--label", type=label_arg, default=None)


def variants(text: str) -> tuple[str, ...]:
    names = tuple(v for v in text.split(",") if v)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"variants are {', '.join(VARIANTS)}, got {text!r}")
    return names


class Run:
    """One variant's load, and the migration driver beside it."""

    def __init__(self, cluster: LocalCluster, args: argparse.Namespace, ids: dict[str, str]):
        self.cluster, self.args, self.ids = cluster, args, ids
        self.samples: list[tuple[int, int]] = []  # running, waiting on the decode worker
        self.migrations: list[pb.Migration] = []
        self.overlap: dict[str, tuple[int, float, float]] = {}  # id -> calls, round trip, waited
        # id -> (distinct sequences moved, most blocks located at once), from the donor's view:
        # with refill more sequences move while ACTIVE than at the switch
        self.moved: dict[str, tuple[int, int]] = {}

    async def __call__(self, variant: str, r: int) -> dict[str, Any]:
        a = self.args
        decode = self.cluster.child("decode-0").address
        async with (
            AsyncBanaServeClient(self.cluster.router.address) as client,
            grpc.aio.insecure_channel(self.cluster.child("coordinator").address) as c_ch,
            grpc.aio.insecure_channel(decode) as d_ch,
        ):
            self.coordinator = coordinator_pb2_grpc.CoordinatorServiceStub(c_ch)
            self.decode = decode_pb2_grpc.DecodeServiceStub(d_ch)
            self.worker = migration_pb2_grpc.MigrationWorkerServiceStub(d_ch)
            request = decode_pb2.DecodeServiceStatsRequest()
            preempted = (await self.decode.Stats(request, timeout=10)).num_preemptions
            batch = prompts(a.requests, a.input_len, a.seed + r, (5, 4000))
            records, tasks = send_all(client, batch, a.output_len, a.timeout)
            done = asyncio.gather(*tasks)
            side = [asyncio.create_task(self.sample(done))]
            if variant == "migrated":
                watch = self.watch if a.auto else self.drive
                side.append(asyncio.create_task(watch(done)))
            streams = await done
            await asyncio.gather(*side)
            preempted = (await self.decode.Stats(request, timeout=10)).num_preemptions - preempted
        return self.figures(streams) | {"preemptions": preempted}

    async def sample(self, done: asyncio.Future) -> None:
        while not done.done():
            try:
                stats = await self.decode.Stats(decode_pb2.DecodeServiceStatsRequest(), timeout=10)
            except grpc.aio.AioRpcError as e:  # a starved worker: a sample lost, not the run
                if e.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            else:
                self.samples.append((stats.num_running_seqs, stats.num_waiting_seqs))
            await asyncio.sleep(0.1)

    async def drive(self, done: asyncio.Future) -> None:
        """Keep one attention migration going: with refill the donor keeps it filled; without,
        cycle it once its sequences have all ended."""
        mid, refill = "", self.args.refill
        while not done.done():
            if not mid:
                spec = pb.AttentionMigrationSpec(
                    donor=self.ids["decode"], helper=self.ids["prefill"],
                    max_sequences=self.args.max_sequences, refill=refill,
                )  # fmt: skip
                request = pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_ATTENTION, attention=spec)
                mid = (
                    await self.coordinator.StartMigration(request, timeout=30)
                ).migration.migration_id
            m = await self.describe(mid)
            if m.state in ENDED:
                self.migrations.append(m)
                mid = ""
            elif (
                m.state == pb.MIGRATION_STATE_ACTIVE and await self.located(mid) == 0 and not refill
            ):
                await self.coordinator.RevertMigration(
                    pb.RevertMigrationRequest(migration_id=mid), timeout=30
                )
            await asyncio.sleep(0.25)
        if mid:
            m = await self.describe(mid)
            if m.state == pb.MIGRATION_STATE_ACTIVE:
                await self.coordinator.RevertMigration(
                    pb.RevertMigrationRequest(migration_id=mid), timeout=30
                )
            while (m := await self.describe(mid)).state not in ENDED:
                await asyncio.sleep(0.1)
            self.migrations.append(m)

    async def watch(self, done: asyncio.Future) -> None:
        """The coordinator decides alone: follow the migrations it starts while the load runs
        (their counters while live), then take each as it is when the load ended."""
        seen: set[str] = set()
        while not done.done():
            listed = await self.coordinator.ListMigrations(pb.ListMigrationsRequest(), timeout=60)
            for m in listed.migrations:
                if m.kind == pb.MIGRATION_KIND_ATTENTION and m.state not in ENDED:
                    seen.add(m.migration_id)
                    await self.located(m.migration_id)
            await asyncio.sleep(0.25)
        self.migrations = [await self.describe(mid) for mid in sorted(seen)]

    async def describe(self, mid: str) -> pb.Migration:
        request = pb.DescribeMigrationRequest(migration_id=mid)
        return (await self.coordinator.DescribeMigration(request, timeout=60)).migration

    async def located(self, mid: str) -> int:
        """Blocks of the donor's still on the helper (and the port's counters, kept)."""
        request = migration_pb2.MigrationWorkerServiceListRequest()
        views = await self.worker.List(request, timeout=60)  # generous: a loaded worker
        view = next((v for v in views.migrations if v.migration_id == mid), None)
        if view is None:
            return 0
        rt, waited = view.attention_round_trip, view.attention_waited
        _, most = self.moved.get(mid, (0, 0))
        self.moved[mid] = (view.num_sequences_moved, max(most, view.num_blocks))
        self.overlap[mid] = (
            view.num_attention_calls,
            rt.seconds + rt.nanos / 1e9,
            waited.seconds + waited.nanos / 1e9,
        )
        return view.num_blocks

    def figures(self, streams: list[Stream]) -> dict[str, Any]:
        failed = [s.error for s in streams if s.error]
        if failed:
            return {"failed": failed}
        start = min(s.chunks[0][0] for s in streams)
        end = max(s.chunks[-1][0] for s in streams)
        tokens = sum(n for s in streams for _, n in s.chunks[1:])
        gaps = [g for s in streams for g in gaps_in(s, start, end)]
        tpot = distribution(gaps)
        # while the prefill worker (the helper) still computes prompts, and after the last one
        prompts_done = max(s.chunks[0][0] for s in streams)
        during = distribution([g for s in streams for g in gaps_in(s, start, prompts_done)])
        after = distribution([g for s in streams for g in gaps_in(s, prompts_done, end)])
        running = [x for x, _ in self.samples] or [0]
        calls = sum(c for c, _, _ in self.overlap.values())
        rt = sum(r for _, r, _ in self.overlap.values())
        waited = sum(w for _, _, w in self.overlap.values())
        return {
            "decode_tokens_per_s": tokens / (end - start),
            "tpot_p50_ms": tpot["p50"],
            "tpot_p99_ms": tpot["p99"],
            "prompts_done_s": prompts_done - start,
            "tpot_during_prompts_ms": {"p50": during["p50"], "p99": during["p99"]},
            "tpot_after_prompts_ms": {"p50": after["p50"], "p99": after["p99"]},
            "longest_gaps": longest_gaps(streams, start, 20),
            "running_mean": statistics.fmean(running),
            "running_max": max(running),
            "waiting_max": max((w for _, w in self.samples), default=0),
            "num_migrations": len(self.migrations),
            "num_blocks_moved": sum(m.num_blocks for m in self.migrations),
            "most_blocks_located": max((b for _, b in self.moved.values()), default=0),
            "num_sequences_located": sum(
                max(m.num_sequences, self.moved.get(m.migration_id, (0, 0))[0])
                for m in self.migrations
            ),
            "num_requeued": sum(m.num_requeued for m in self.migrations),
            "attention_calls": calls,
            "round_trip_mean_ms": 1e3 * rt / calls if calls else None,
            "waited_mean_ms": 1e3 * waited / calls if calls else None,
            "hidden_fraction": (rt - waited) / rt if rt else None,
            "aborted": [m.reason for m in self.migrations if m.state == pb.MIGRATION_STATE_ABORTED],
            "tokens": [s.num_tokens for s in streams],
            "token_ids": [s.token_ids for s in streams],
        }


async def idle(cluster: LocalCluster, timeout_s: float) -> None:
    async with AsyncBanaServeClient(cluster.router.address) as client:
        deadline = time.perf_counter() + timeout_s
        while any(w.num_running_seqs or w.num_kv_blocks_used for w in await client.list_workers()):
            if time.perf_counter() > deadline:
                raise TimeoutError("the cluster did not go idle")
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)


async def bench(cluster: LocalCluster, args: argparse.Namespace) -> list[dict[str, Any]]:
    async with AsyncBanaServeClient(cluster.router.address) as client:
        by_address = {w.address: w.worker_id for w in await client.list_workers()}
    ids = {r: by_address[cluster.child(f"{r}-0").address] for r in ("prefill", "decode")}
    runs = []
    for r in range(args.rounds):
        for variant in args.variants if r % 2 == 0 else args.variants[::-1]:
            await idle(cluster, args.timeout)
            figures = await Run(cluster, args, ids)(variant, r)
            runs.append(figures | {"variant": variant, "round": r})
        # the same prompts in both variants of a round: greedy outputs must be equal
        this = runs[-len(args.variants) :]
        if len(this) == 2:
            base, mig = (next(x for x in this if x["variant"] == v) for v in VARIANTS)
            if "token_ids" in base and "token_ids" in mig:
                mig["tokens_equal_baseline"] = mig["token_ids"] == base["token_ids"]
        for run in this:
            print(json.dumps({k: v for k, v in run.items() if k != "token_ids"}), flush=True)
    return runs


def longest_gaps(streams: list[Stream], start: float, n: int) -> list[dict[str, float]]:
    """The ``n`` longest waits between two deltas of a stream: when (s from ``start``), which
    request, how long (ms), and how many tokens the later delta brought."""
    waits = [
        {"at_s": t0 - start, "request": s.index, "gap_ms": 1e3 * (t1 - t0), "tokens": k}
        for s in streams
        for (t0, _), (t1, k) in zip(s.chunks, s.chunks[1:], strict=False)
    ]
    return sorted(waits, key=lambda w: -w["gap_ms"])[:n]


def table(runs: list[dict[str, Any]]) -> str:
    keys = [
        ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
        ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
        ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
        ("running_mean", "running batch mean", "{:.2f}"),
        ("running_max", "running batch max", "{}"),
        ("preemptions", "preemptions", "{}"),
        ("num_migrations", "migrations", "{}"),
        ("num_blocks_moved", "blocks moved at the switch", "{}"),
        ("most_blocks_located", "most blocks located", "{}"),
        ("num_sequences_located", "sequences located", "{}"),
        ("num_requeued", "recomputed at a revert", "{}"),
        ("tokens_equal_baseline", "tokens equal the baseline's", "{}"),
        ("round_trip_mean_ms", "round trip ms", "{:.2f}"),
        ("hidden_fraction", "hidden", "{:.2f}"),
    ]
    lines = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant and "failed" not in r]
        cells = []
        for key, name, fmt in keys:
            values = [r[key] for r in mine if r.get(key) is not None]
            if values and isinstance(values[0], bool):
                cells.append(f"{name} {all(values)}")  # every round
                continue
            cells.append(f"{name} {fmt.format(statistics.median(values)) if values else '-'}")
        lines.append(f"{variant:<9} " + " | ".join(cells))
    base = [
        r["decode_tokens_per_s"] for r in runs if r["variant"] == "baseline" and "failed" not in r
    ]
    mig = [
        r["decode_tokens_per_s"] for r in runs if r["variant"] == "migrated" and "failed" not in r
    ]
    if base and mig:
        lines.append(f"throughput ratio {statistics.median(mig) / statistics.median(base):.2f}x")
    return "\n".join(lines)


def located_micro_batches(args: argparse.Namespace) -> tuple[str, ...]:
    n = args.located_micro_batches
    return () if n is None else ("--located-micro-batches", str(n))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attention_cluster", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    max_len = str(args.input_len + args.output_len + 16)
    spec = ClusterSpec(
        model=args.model, threads=args.threads, pin=args.pin, num_kvstore=0,
        kv_transport=args.transport, coordinator=True,
        service_args={
            # a pinned worker starved by other load misses the 1 s report deadline and is
            # dropped ("no healthy ... prefill worker"); 10 s keeps a loaded run whole
            "router": ("--lease-s", str(args.reserve_lease), "--report-timeout-s", "10"),
            "decode": (
                "--num-kv-blocks", str(args.decode_blocks), "--max-model-len", max_len,
                "--max-lease", str(args.reserve_lease),
                *located_micro_batches(args),
                *args.decode_arg,
            ),
            "prefill": ("--num-kv-blocks", str(args.prefill_blocks), "--max-model-len", max_len),
            "coordinator": (
                *(("--auto", "--attention", "--attention-refill") if args.auto else ()),
                *args.coordinator_arg,
            ),
        },
    )  # fmt: skip
    log_path = (
        Path(args.out or ".") / f"attention-cluster{'-' + args.label if args.label else ''}.log"
    )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        cluster = LocalCluster(spec, log)
        cluster.start()
        try:
            runs = asyncio.run(bench(cluster, args))
        finally:
            cluster.stop()
    result = {"args": vars(args), "machine": machine_info(), "loadavg": loadavg(), "runs": runs}
    print(table(runs))
    if args.out:
        name = f"attention-cluster{'-' + args.label if args.label else ''}.json"
        (Path(args.out) / name).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
