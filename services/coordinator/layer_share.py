"""Measures the share of a decode step one decoder layer takes: the policy's ``--layer-share``.

    python -m services.coordinator.layer_share --model tiny-llama [--batch 8] [--steps 32]

1. an in-process engine (the workers' own code, one thread by default) admits ``--batch``
   requests of ``--prompt-tokens`` tokens and prefills them;
2. then ``--steps`` decode steps run, each timed whole, and every decoder layer timed by a
   forward pre/post hook;
3. the share is (time in decoder layers / L) / step time: what moving one layer off a decode
   worker takes off its step, the rest being the embedding, the LM head, sampling and the
   scheduler. The coordinator takes the printed value with ``--layer-share``; without it the
   policy assumes ``(1 - head_share) / L`` (docs/coordinator.md).

This imports torch and loads the model: a tool run once per model and machine, never part of
the coordinator process.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from services.common.arg_types import thread_count


@dataclass(frozen=True)
class LayerShare:
    share: float  # one decoder layer's share of a decode step
    step_s: float  # mean decode step
    num_layers: int
    batch: int

    def describe(self) -> str:
        return (
            f"layer_share {self.share:.4f} ({self.num_layers} layers: "
            f"{self.share * self.num_layers:.1%} of a {self.step_s * 1000:.2f} ms decode step "
            f"at batch {self.batch})"
        )


def measure(engine, batch: int, prompt_tokens: int, steps: int) -> LayerShare:  # noqa: ANN001
    from services.common.types import SamplingParams

    vocab = engine.spec.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(batch):
        prompt = [(7 + 31 * i + 13 * j) % (vocab - 1) + 1 for j in range(prompt_tokens)]
        engine.add_request(f"share-{i}", prompt, params)
    while (
        any(s.num_output_tokens < 1 for s in engine.scheduler.running) or engine.scheduler.waiting
    ):
        engine.step()  # the prefills (and the first token)
    in_layers = [0.0]
    started: list[float] = []
    layers = engine.model.layers
    handles = [
        h
        for layer in layers
        for h in (
            layer.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())),
            layer.register_forward_hook(
                lambda *_: in_layers.__setitem__(
                    0, in_layers[0] + time.perf_counter() - started.pop()
                )
            ),
        )
    ]
    try:
        begin = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - begin
    finally:
        for h in handles:
            h.remove()
        for i in range(batch):
            engine.abort(f"share-{i}")
    return LayerShare(in_layers[0] / len(layers) / total, total / steps, len(layers), batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m services.coordinator.layer_share", description=__doc__
    )
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--batch", type=int, default=8, help="decoding sequences")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--threads", type=thread_count, default=1, help="torch threads, as a worker's")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    import torch

    from services.common.config import EngineConfig
    from services.engine.engine import Engine

    torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, num_kv_blocks=512))
    print(measure(engine, args.batch, args.prompt_tokens, args.steps).describe(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
