"""In-process A/B of the float32 fused CPU kernels: ``python -m bench.engine_fused_ab``.

One smollm2-135m engine, float32, one thread. Each round times the same work twice, once with
the fused kernels (``models/fused.py``, ``paged_decode.prefill``) and once with the torch ops
they replace (which goes first alternates), as *CPU time of this thread* (``time.thread_time``),
so load from other processes on a shared machine moves both sides alike and the ratio stays
meaningful where wall-clock figures do not. Work per round:

- ``prefill``: one fresh ``--prompt-len``-token prompt, ``max_tokens=1``;
- ``decode_b{B}``: ``--steps`` decode steps of a batch of B sequences (32-token prompts,
  prefilled before timing).

Prints the median ms of each side and their ratio (torch / fused: above 1 means the kernels
are faster).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from services.common.config import EngineConfig, models_dir
from services.common.types import SamplingParams
from services.engine import paged_decode
from services.engine.engine import Engine
from services.engine.models import fused

SIDES = ("fused", "torch")


def set_side(side: str, originals: tuple[Callable, Callable]) -> None:
    fused.supports, paged_decode.supports_prefill = (
        originals if side == "fused" else (lambda x: False, lambda q, k: False)
    )


def cpu_ms(fn: Callable[[], object]) -> float:
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="prepared model name or directory")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--steps", type=int, default=4, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = Path(args.model) if Path(args.model).is_dir() else models_dir() / args.model
    engine = Engine(
        EngineConfig(
            model=str(model), dtype="float32", num_threads=1,
            max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=1024,
            enable_prefix_caching=False,
        )
    )  # fmt: skip
    assert paged_decode.load(), "the kernels must build for an A/B"
    originals = (fused.supports, paged_decode.supports_prefill)
    rng = random.Random(0)
    ids = 0

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    def prefill() -> None:
        engine.generate([prompt(args.prompt_len)], SamplingParams(temperature=0.0, max_tokens=1))

    def decode(batch: int) -> Callable[[], None]:
        nonlocal ids
        params = SamplingParams(temperature=0.0, max_tokens=args.steps + 2, ignore_eos=True)
        for _ in range(batch):
            ids += 1
            engine.add_request(f"ab{ids}", prompt(32), params)
        engine.step()  # the batch's prefill (and first token): not timed

        def run() -> None:
            for _ in range(args.steps):
                engine.step()

        return run

    work = {"prefill": lambda: prefill}
    for b in (int(s) for s in args.batches.split(",")):
        work[f"decode_b{b}"] = lambda b=b: decode(b)
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        for rnd in range(args.rounds + 1):  # round 0 warms up
            for name, make in work.items():
                for side in SIDES if rnd % 2 else SIDES[::-1]:
                    set_side(side, originals)
                    ms = cpu_ms(make())
                    while engine.has_unfinished_requests:
                        engine.step()
                    if rnd:
                        samples.setdefault((name, side), []).append(ms)
    finally:
        set_side("fused", originals)
    for name in work:
        f, t = (statistics.median(samples[name, s]) for s in SIDES)
        print(f"{name}: fused {f:.1f} ms, torch ops {t:.1f} ms, torch/fused {t / f:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
