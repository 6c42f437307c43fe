"""Attention migration's per-step cost: the remote part of a step and the share of it hidden.

    .venv/bin/python -m bench.attention_bench --model smollm2-135m --dtype bfloat16 \
        --seqs 8 --located 4 --prompt 1024 --steps 30 --threads 1 [--out DIR]

Lifecycle of a run (two engines in one process, each with its ``MigrationAgent``, the helper's
migration data plane on real TCP at 127.0.0.1: the code paths of two worker processes):

1. owner A gets ``--seqs`` greedy requests of ``--prompt`` tokens and prefills them; helper B
   idles (a prefill worker between prompts);
2. rounds, ``--rounds`` times: ``--steps`` decode steps of A as it is (``local``), then an
   attention migration of A's ``--located`` longest sequences to B (prepare, copy, switch;
   timed) and ``--steps`` steps with them located (``located``), then the revert (timed);
3. report: step time p50/p99 of both, the per-step overhead (p50 difference), and from the
   port's counters the round trips per step, their mean, of it the helper's arithmetic (its
   ``HostedBlocks.attend``, timed), the mean time the stepping thread waited for one, and the
   share hidden behind the owner's own work; blocks moved; the tokens of every request equal
   those of a run without migration (checked).

Writes ``OUT/attention[-LABEL].json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.machine import loadavg, machine_info
from services.common.arg_types import label_arg, positive, thread_count
from services.common.config import EngineConfig, models_dir
from services.common.types import SamplingParams
from services.engine.engine import Engine
from services.engine.models.prepare import prepare_model
from services.migration.agent import MigrationAgent
from services.migration.attention_agent import AttentionSelection
from services.migration.records import AgentConfig, Peer, Role


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seqs", type=positive(int), default=8, help="sequences A decodes")
    p.add_argument("--located", type=positive(int), default=4, help="of them, located on B")
    p.add_argument("--prompt", type=positive(int), default=1024, help="prompt tokens of each")
    p.add_argument(
        "--steps", type=positive(int), default=30, help="decode steps per variant and round"
    )
    p.add_argument("--rounds", type=positive(int), default=2)
    p.add_argument("--threads", type=thread_count, default=1, help="torch threads (both engines)")
    p.add_argument("--out", default="", help="directory for attention[-LABEL].json")
    p.add_argument("--label", type=label_arg, default=None)
    p.add_argument(
        "--no-blocking-channel",
        dest="blocking",
        action="store_false",
        help="the owner's exchanges go through the agent's event loop (AgentConfig."
        "blocking_attention off), as over ucx",
    )


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(600)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class _Stepped:
    """An engine stepped by this thread; agent calls run between its steps (one lock)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()

    def step(self) -> list:
        with self.lock:
            return self.engine.step()

    async def engine_call(self, fn):
        def locked():
            with self.lock:
                return fn(self.engine)

        return await asyncio.to_thread(locked)


def _agent(stepped: _Stepped, blocking: bool = True) -> MigrationAgent:
    config = AgentConfig(blocking_attention=blocking)
    return MigrationAgent(
        stepped.engine_call, lambda: stepped.engine.snapshot, config, data_kind="tcp"
    )


def _prompts(n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(5, 4000, (length,), generator=g).tolist() for _ in range(n)]


def _timed_steps(stepped: _Stepped, steps: int, tokens: dict[str, list[int]]) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        outs = stepped.step()
        times.append(time.perf_counter() - t0)
        for out in outs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return times


def _time_calls(obj: Any, name: str) -> list[float]:
    """Wraps ``obj.name`` (an instance attribute shadows the method): each call's seconds."""
    inner, spent = getattr(obj, name), []

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    setattr(obj, name, timed)
    return spent


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    path = prepare_model(args.model, models_dir())
    max_tokens = args.rounds * 2 * args.steps + 8
    max_len = args.prompt + max_tokens + 16
    config = dict(
        model=str(path), dtype=args.dtype, max_model_len=max_len, num_threads=args.threads
    )
    a = Engine(EngineConfig(**config, num_kv_blocks=args.seqs * (-(-max_len // 16)) + 8))
    b = Engine(EngineConfig(**config, num_kv_blocks=args.located * (-(-max_len // 16)) + 8))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompts = _prompts(args.seqs, args.prompt)
    helper_attend = _time_calls(b.migration.hosted_blocks, "attend")
    loop, sa, sb = _Loop(), _Stepped(a), _Stepped(b)
    donor, helper = _agent(sa, args.blocking), _agent(sb)
    address = loop.call(helper.serve_data())
    loop.call(donor.serve_data())
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        a.add_request(f"s{i}", prompt, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in a.scheduler.running) or (
        a.scheduler.waiting
    ):
        for out in sa.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    local, located, moves, reports = [], [], [], []
    selection = AttentionSelection(max_sequences=args.located)
    peer = Peer("B", "", address, "tcp")
    layers = range(0, a.spec.num_layers)
    for r in range(args.rounds):
        local += _timed_steps(sa, args.steps, tokens)
        mid = f"m-{r + 1}"
        t0 = time.perf_counter()
        _, fp, _, _ = loop.call(
            donor.prepare(mid, Role.DONOR, layers, Peer("A"), peer, None, attention=selection)
        )
        loop.call(
            helper.prepare(mid, Role.HELPER, layers, Peer("A"), peer, None, fp, attention=selection)
        )
        nbytes, _, _ = loop.call(donor.copy_kv(mid, peer))
        switched = loop.call(donor.switch(mid, 1, None))
        loop.call(donor.activate(mid, False))
        switch_s = time.perf_counter() - t0
        located += _timed_steps(sa, args.steps, tokens)
        report = donor.attention.overlap(mid)
        t0 = time.perf_counter()
        reverted = loop.call(donor.revert(mid))
        revert_s = time.perf_counter() - t0
        loop.call(donor.release(mid))
        loop.call(helper.release(mid))
        reports.append(report)
        moves.append(
            {
                "copied_bytes": nbytes,
                "located": len(switched.request_ids),
                "blocks": donor.attention.moves[mid].num_blocks,
                "prepare_copy_switch_s": switch_s,
                "switch_pause_s": switched.pause_s,
                "revert_s": revert_s,
                "revert_bytes": reverted.num_bytes,
            }
        )
    while a.has_unfinished_requests:
        for out in sa.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    loop.call(donor.close())
    loop.call(helper.close())
    loop.close()
    reference = Engine(EngineConfig(**config)).generate(prompts, [params] * len(prompts))
    identical = all(tokens[f"s{i}"] == ref.token_ids for i, ref in enumerate(reference))
    calls = sum(x.num_calls for x in reports)
    rt, waited = sum(x.round_trip_s for x in reports), sum(x.waited_s for x in reports)
    return {
        "args": vars(args),
        "machine": machine_info(),
        "loadavg": loadavg(),
        "num_layers": a.spec.num_layers,
        "local_step_p50_ms": 1e3 * statistics.median(local),
        "local_step_p99_ms": 1e3 * _pct(local, 0.99),
        "located_step_p50_ms": 1e3 * statistics.median(located),
        "located_step_p99_ms": 1e3 * _pct(located, 0.99),
        "overhead_per_step_ms": 1e3 * (statistics.median(located) - statistics.median(local)),
        "round_trips_per_step": calls / max(1, len(located)),
        "round_trip_mean_ms": 1e3 * rt / max(1, calls),
        "waited_mean_ms": 1e3 * waited / max(1, calls),
        "hidden_fraction": max(0.0, rt - waited) / rt if rt else 0.0,
        # of the round trip, the helper's arithmetic (HostedBlocks.attend); the rest is the
        # encoding, the data plane and the thread hops on both ends
        "helper_attend_mean_ms": 1e3 * statistics.fmean(helper_attend) if helper_attend else 0.0,
        "bytes_per_step": sum(x.num_bytes for x in reports) / max(1, len(located)),
        "moves": moves,
        "tokens_identical": identical,
    }


def table(result: dict[str, Any]) -> str:
    r = result
    rows = [
        ("decode step p50 / p99, local", f"{r['local_step_p50_ms']:.1f} / {r['local_step_p99_ms']:.1f} ms"),
        ("decode step p50 / p99, located", f"{r['located_step_p50_ms']:.1f} / {r['located_step_p99_ms']:.1f} ms"),
        ("overhead per step (p50)", f"{r['overhead_per_step_ms']:.2f} ms"),
        ("round trips per step", f"{r['round_trips_per_step']:.1f} (one per layer)"),
        ("round trip mean", f"{r['round_trip_mean_ms']:.3f} ms"),
        ("of it, the helper's arithmetic", f"{r['helper_attend_mean_ms']:.3f} ms"),
        ("waited for it, mean", f"{r['waited_mean_ms']:.3f} ms"),
        ("hidden", f"{100 * r['hidden_fraction']:.0f} %"),
        ("bytes per step (both ways)", f"{r['bytes_per_step']:,.0f}"),
        ("blocks located", ", ".join(str(m["blocks"]) for m in r["moves"])),
        ("tokens identical to no migration", str(r["tokens_identical"])),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attention_bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    result = run(args)
    print(table(result))
    if args.out:
        name = f"attention{'-' + args.label if args.label else ''}.json"
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / name).write_text(json.dumps(result, indent=2))
    return 0 if result["tokens_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
