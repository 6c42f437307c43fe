"""What resuming a request costs its client: a real cluster (1 prefill, 2 decode workers), one
greedy request streamed twice — once undisturbed, once with the decode worker serving it
SIGKILLed after ``--kill-at`` tokens — and the gaps between tokens the client saw.

    .venv/bin/python -m bench.resume_gap --model smollm2-135m --prompt-tokens 1500 \
        --max-tokens 128 --kill-at 32

Prints (and with ``--json`` writes) the undisturbed run's median gap, the resumed run's gap
at the kill (the time from the last token before it to the first after), the outputs' equality
and the load average. The decode worker killed is gone for the rest of the run: each resumed
run needs a fresh cluster, so ``--rounds`` starts one per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from services.client.client import BanaServeClient
from services.launcher import ClusterSpec, LocalCluster
from services.rpc.gen.banaserve.v1 import decode_pb2, decode_pb2_grpc


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(5, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _busy(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        return stub.Stats(decode_pb2.DecodeServiceStatsRequest(), timeout=5).num_running_seqs > 0


def _stream(client, prompt, max_tokens, kill=None):
    """(token ids, arrival times of each token); ``kill(i)`` runs after token ``i``."""
    stream = client.generate(
        prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, timeout_s=600
    )
    times = []
    for i, _ in enumerate(stream):
        times.append(time.monotonic())
        if kill is not None:
            kill(i)
    return list(stream.result.token_ids), times


def _round(args, log) -> dict:
    spec = ClusterSpec(
        model=args.model, num_decode=2, pin=args.pin, threads=args.threads, num_kvstore=0,
    )  # fmt: skip
    cluster = LocalCluster(spec, log)
    cluster.start()
    try:
        decodes = [cluster.child("decode-0"), cluster.child("decode-1")]
        prompt = _prompt(args.prompt_tokens, 7)
        with BanaServeClient(cluster.router.address) as client:
            _stream(client, _prompt(64, 1), 8)  # warm-up: both paths, first calls
            base, base_times = _stream(client, prompt, args.max_tokens)
            killed: list[str] = []

            def kill(i: int) -> None:
                if i == args.kill_at - 1:
                    busy = [d for d in decodes if _busy(d.address)]
                    busy[0].proc.kill()
                    killed.append(busy[0].name)

            resumed, times = _stream(client, prompt, args.max_tokens, kill)
    finally:
        cluster.stop()
    gaps = [b - a for a, b in zip(base_times[1:], base_times[2:], strict=False)]
    return {
        "killed": killed,
        "tokens_equal": resumed == base,
        "base_gap_median_ms": 1e3 * statistics.median(gaps),
        "base_gap_max_ms": 1e3 * max(gaps),
        "resume_gap_ms": 1e3 * (times[args.kill_at] - times[args.kill_at - 1]),
        "after_gap_median_ms": 1e3
        * statistics.median(b - a for a, b in zip(times[args.kill_at + 1 :], times[args.kill_at + 2 :], strict=False)),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--kill-at", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pin", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not 1 <= args.kill_at < args.max_tokens - 2:
        p.error("--kill-at must be in [1, max-tokens - 2)")
    rounds = []
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        for _ in range(args.rounds):
            rounds.append(_round(args, log))
            print(json.dumps(rounds[-1]), flush=True)
    result = {"args": vars(args) | {"json": None}, "loadavg": os.getloadavg(), "rounds": rounds}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["loadavg"]), "cluster log:", log.name)
    return 0 if all(r["tokens_equal"] for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
