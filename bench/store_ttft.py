"""TTFT of a long prompt whose prefix another prefill worker computed: cold vs store hit.

Against a running cluster with two prefill workers routed round robin and a kvstore
(``banaserve up --prefill 2 --policy round_robin``): for each of ``--pairs`` fresh prefixes P,
``P + S1`` is sent first (cold: nobody has P; its prefill worker writes P's blocks back to the
store), then, once the store holds them, ``P + S2``, which the router sends to the other
prefill worker (a hit: P's KV comes from the store, only S2 computes). Run it once against a
cluster started with ``--no-kvstore-overlap`` and once without to compare fetching the prefix
layer by layer under the suffix's compute with fetching it whole first.

Reports median TTFT (client-side) and the router's prefill timing per kind, the cached tokens,
and hit/cold ratios; JSON + markdown under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import grpc
import torch

from bench.machine import machine_info
from services.client.client import BanaServeClient, BanaServeClientError
from services.common.arg_types import host_port, label_arg, path_arg, positive, share
from services.common.paths import output_dir
from services.rpc.gen.banaserve.v1 import kvstore_pb2, kvstore_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", type=host_port, required=True, metavar="HOST:PORT")
    p.add_argument(
        "--kvstore", type=host_port, required=True, metavar="HOST:PORT", help="a kvstore node"
    )
    p.add_argument("--prompt-len", type=positive(int), default=2000)
    p.add_argument("--cached-share", type=share, default=0.75, help="share of the prompt cached")
    p.add_argument(
        "--pairs", type=positive(int), default=5, help="cold/hit pairs (fresh prefix each)"
    )
    p.add_argument("--output-len", type=positive(int), default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=label_arg, default=None)
    p.add_argument("--out", type=path_arg, default=REPO_ROOT / "bench" / "results")


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 30000, (n,), generator=g).tolist()


def store_state(stub: kvstore_pb2_grpc.KVStoreServiceStub) -> tuple[int, int]:
    stats = stub.Stats(kvstore_pb2.KVStoreServiceStatsRequest(), timeout=5)
    return stats.num_blocks, stats.num_reservations


def wait_for_write_back(stub, blocks_before: int, num_new: int, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        blocks, reservations = store_state(stub)
        if blocks >= blocks_before + num_new and reservations == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"store holds {blocks - blocks_before} of {num_new} new blocks")
        time.sleep(0.05)


def one(client: BanaServeClient, prompt: list[int], output_len: int) -> dict:
    r = client.complete(prompt, temperature=0.0, max_tokens=output_len, ignore_eos=True)
    prefill = r.server_timings.prefill.ToTimedelta().total_seconds()
    return {
        "ttft_ms": r.ttft_s * 1000,
        "prefill_ms": prefill * 1000,
        "num_cached_tokens": r.num_cached_tokens,
        "prefill_worker": r.prefill_worker_id,
    }


def measure(args: argparse.Namespace) -> list[dict]:
    n_prefix = int(args.prompt_len * args.cached_share)
    n_suffix = args.prompt_len - n_prefix
    rows = []
    with (
        BanaServeClient(args.router) as client,
        grpc.insecure_channel(args.kvstore) as channel,
    ):
        stub = kvstore_pb2_grpc.KVStoreServiceStub(channel)
        one(client, tokens(64, args.seed + 10_000), 1)  # warm-up: connections, first step
        for i in range(args.pairs):
            prefix = tokens(n_prefix, args.seed + 2 * i)
            blocks_before, _ = store_state(stub)
            cold = one(client, prefix + tokens(n_suffix, args.seed + 1000 + 2 * i), args.output_len)
            wait_for_write_back(stub, blocks_before, args.prompt_len // 16)
            hit = one(client, prefix + tokens(n_suffix, args.seed + 1001 + 2 * i), args.output_len)
            rows.append({"cold": cold, "hit": hit})
            print(
                f"pair {i}: cold TTFT {cold['ttft_ms']:.0f} ms on {cold['prefill_worker']} · "
                f"hit TTFT {hit['ttft_ms']:.0f} ms on {hit['prefill_worker']} "
                f"({hit['num_cached_tokens']} cached)",
                flush=True,
            )
    return rows


def summarise(rows: list[dict]) -> dict:
    def med(kind: str, key: str) -> float:
        return statistics.median(r[kind][key] for r in rows)

    summary = {k: {m: med(k, m) for m in ("ttft_ms", "prefill_ms")} for k in ("cold", "hit")}
    summary["hit"]["num_cached_tokens"] = med("hit", "num_cached_tokens")
    summary["hit_over_cold_ttft"] = summary["hit"]["ttft_ms"] / summary["cold"]["ttft_ms"]
    return summary


def run(args: argparse.Namespace) -> int:
    out = output_dir(Path(args.out), "--out")  # before any request: no run lost to it
    try:
        rows = measure(args)
    except BanaServeClientError as exc:  # nothing listens at --router, or it refused
        print(f"banaserve: error: --router: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:  # the same at --kvstore
        print(f"banaserve: error: --kvstore: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the store did not take the prefix in time
        print(f"banaserve: error: {exc}", file=sys.stderr)
        return 1
    summary = summarise(rows)
    report = {
        "benchmark": "store-ttft",
        "config": {k: v for k, v in vars(args).items() if not callable(v)},
        "machine": machine_info(),
        "summary": summary,
        "pairs": rows,
    }
    stem = f"store-ttft-{args.label}" if args.label else "store-ttft"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    c, h = summary["cold"], summary["hit"]
    md = (
        f"| {args.label or 'run'} | cold TTFT {c['ttft_ms']:.0f} ms | hit TTFT {h['ttft_ms']:.0f} ms "
        f"| hit/cold {summary['hit_over_cold_ttft']:.2f} | cached {h['num_cached_tokens']:.0f} "
        f"| prefill cold {c['prefill_ms']:.0f} ms / hit {h['prefill_ms']:.0f} ms |\n"
    )
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0
