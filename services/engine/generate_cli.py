"""``banaserve generate`` in-process: load the engine, stream the completion to stdout."""

from __future__ import annotations

import argparse
import sys
import time

from services.common.config import EngineConfig
from services.common.types import SamplingParams


def run_generate(args: argparse.Namespace) -> int:
    from services.engine.engine import Engine

    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
    )
    started = time.perf_counter()
    engine = Engine(
        EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.threads, max_num_seqs=1)
    )
    loaded = time.perf_counter()
    print(
        f"[banaserve] loaded {engine.config.model} ({args.dtype}) in {loaded - started:.2f}s",
        file=sys.stderr,
    )
    num_tokens, first, reason = 0, None, "?"
    for out in engine.stream(args.prompt, params, chat=args.chat):
        first = first or time.perf_counter()
        num_tokens += len(out.new_token_ids)
        sys.stdout.write(out.text_delta)
        sys.stdout.flush()
        if out.finished:
            reason = out.finish_reason.value if out.finish_reason else "?"
    sys.stdout.write("\n")
    done = time.perf_counter()
    rate = (num_tokens - 1) / (done - first) if first and num_tokens > 1 and done > first else 0.0
    print(
        f"[banaserve] {num_tokens} tokens, finish={reason}, ttft={(first or done) - loaded:.3f}s, "
        f"{rate:.1f} tok/s",
        file=sys.stderr,
    )
    return 0
