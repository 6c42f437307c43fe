"""What ``banaserve bench migration`` measures before and beside the cluster runs.

- ``profile_layers``: the per-layer cost of the model on this machine, in-process (one torch
  thread and, with ``--pin``, one CPU, as each worker runs), from forward hooks on every
  decoder layer and on the final norm + LM head while an engine runs the load's kind of step (a decode batch of ``batch``
  sequences, or prefill chunks of long prompts). ``LayerCosts.balanced_k`` picks the first
  layer that moves so that the donor's share of a step (embedding, scheduling and sampling,
  layers ``[0, k)``, the LM head) and the helper's (layers ``[k, L)``) are as even as they can
  be: with two micro-batches the slower of the two bounds the pipelined step.
- ``measure_bandwidth``: ``B`` of the cost model ``T ≈ S / B + T_sync``: one-way transfers of
  exactly ``S`` bytes over the data plane the migration uses (``bench.transport_bench``'s
  client and a server in its own process), median of a few.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.transport_bench import bench_transport
from services.common.types import SamplingParams
from services.engine.engine import Engine, EngineConfig


@dataclass(frozen=True)
class LayerCosts:
    """Median milliseconds per step of one kind (``rows`` tokens per step)."""

    kind: str  # "decode" or "prefill"
    num_layers: int
    rows: int
    num_steps: int
    step_ms: float  # the sum of its parts' medians (``costs_from_steps``)
    layer_ms: float  # one decoder layer: the median step's layers / num_layers
    head_ms: float  # final norm + LM head

    @property
    def rest_ms(self) -> float:
        """What the donor always keeps besides its layers: embedding, scheduling, sampling."""
        return max(0.0, self.step_ms - self.num_layers * self.layer_ms - self.head_ms)

    def shares_ms(self, k: int) -> tuple[float, float]:
        """(donor, helper) work of one step when ``[k, L)`` run on the helper."""
        donor = self.rest_ms + self.head_ms + k * self.layer_ms
        return donor, (self.num_layers - k) * self.layer_ms

    def balanced_k(self) -> int:
        """The ``k`` in ``[1, L)`` whose slower half is the fastest (ties: the smaller k)."""
        return min(range(1, self.num_layers), key=lambda k: (max(self.shares_ms(k)), k))

    def to_json(self) -> dict:
        k = self.balanced_k()
        donor, helper = self.shares_ms(k)
        return asdict(self) | {
            "rest_ms": self.rest_ms,
            "balanced_k": k,
            "donor_share_ms": donor,
            "helper_share_ms": helper,
        }


class _Timer:
    """Forward hooks adding each call's wall time to ``ms[name]`` while ``on``."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = {}
        self.on = False
        self._started: dict[str, float] = {}

    def attach(self, name: str, module: torch.nn.Module) -> None:
        def pre(*_: object) -> None:
            self._started[name] = time.perf_counter()

        def post(*_: object) -> None:
            if self.on:
                elapsed = (time.perf_counter() - self._started[name]) * 1e3
                self.ms.setdefault(name, []).append(elapsed)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def profile_layers(
    model_dir: Path, kind: str, batch: int, prompt_len: int, num_steps: int, seed: int = 0
) -> LayerCosts:
    """Per-layer cost of ``kind`` steps: ``batch`` sequences decoding after ``prompt_len``-token
    prompts (``num_steps`` decode steps timed), or ``batch`` prompts of ``prompt_len`` tokens
    prefilled ``prompt_len`` tokens per step (every step timed)."""
    torch.set_num_threads(1)
    rows_per_step = batch if kind == "decode" else prompt_len
    budget = max(rows_per_step, batch, 256)  # decode: every sequence in one step
    engine = Engine(
        EngineConfig(
            model=str(model_dir), num_threads=1,
            max_num_seqs=max(batch, 1),  # decode: every sequence of the batch in one step
            num_kv_blocks=batch * ((prompt_len + num_steps + 2) // 16 + 2) + 8,
            max_num_batched_tokens=budget if kind == "decode" else rows_per_step,
        )
    )  # fmt: skip
    model = engine.model
    timer = _Timer()
    for i, layer in enumerate(model.layers):
        timer.attach(f"layer{i}", layer)
    timer.attach("norm", model.norm)
    timer.attach("head", model.lm_head)
    g = torch.Generator().manual_seed(seed)
    vocab = model.embed_tokens.num_embeddings
    max_tokens = num_steps + 2 if kind == "decode" else 1
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(5, vocab - 1, (prompt_len,), generator=g).tolist()
        engine.add_request(f"p{i}", prompt, params)
    steps: list[float] = []
    while engine.has_unfinished_requests:
        decoding = kind == "decode" and all(
            s.num_computed_tokens >= prompt_len for s in engine.scheduler.running
        ) and len(engine.scheduler.running) == batch  # fmt: skip
        timer.on = kind == "prefill" or decoding
        started = time.perf_counter()
        engine.step()
        if timer.on:
            steps.append((time.perf_counter() - started) * 1e3)
    if not steps:
        raise RuntimeError(f"no {kind} step of {batch} sequences was timed")
    layers = [timer.ms[f"layer{i}"] for i in range(len(model.layers))]
    head = [n + h for n, h in zip(timer.ms["norm"], timer.ms["head"], strict=True)]
    return costs_from_steps(kind, rows_per_step, steps, layers, head)


def costs_from_steps(
    kind: str, rows: int, steps_ms: list[float], layers_ms: list[list[float]], head_ms: list[float]
) -> LayerCosts:
    """Each timed step ``j`` splits into its layers' sum (``layers_ms[i][j]``: layer ``i``'s
    call in step ``j``), its norm + LM head and the rest; each part is the median over steps.
    Medians of per-step parts, not sums of per-layer medians: a call a busy machine stretched
    counts in its own part of that step, and the rest is never what the layers' medians missed."""
    num_steps = len(steps_ms)
    if len(head_ms) != num_steps or any(len(calls) != num_steps for calls in layers_ms):
        raise ValueError("a timed step must call every layer and the head exactly once")
    per_step = [sum(calls[j] for calls in layers_ms) for j in range(num_steps)]
    rest = [s - n - h for s, n, h in zip(steps_ms, per_step, head_ms, strict=True)]
    layer, head = statistics.median(per_step) / len(layers_ms), statistics.median(head_ms)
    step = len(layers_ms) * layer + head + max(0.0, statistics.median(rest))
    return LayerCosts(kind, len(layers_ms), rows, num_steps, step, layer, head)


@contextmanager
def one_cpu(pin: bool) -> Iterator[None]:
    """With ``pin``: this process on its first CPU for the block (as ``--pin`` puts each
    worker on one), its affinity restored after."""
    before = os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def measure_bandwidth(num_bytes: int, transport: str, out: Path, iterations: int = 5) -> dict:
    """``B`` in bytes/s from one-way transfers of ``num_bytes`` (at least 1 KiB) on
    ``transport``, a server in its own process; ``{"error": ...}`` if the transport failed."""
    size = max(num_bytes, 1024)
    args = argparse.Namespace(
        sizes=[size], warmup=1, iterations=iterations, timeout=120.0, seed=0, out=str(out)
    )
    run = asyncio.run(bench_transport(transport, args))[size]
    if "error" in run:
        return {"transport": transport, "size_bytes": size, "error": run["error"]}
    median_s = statistics.median(run["samples_s"])
    return {
        "transport": transport,
        "size_bytes": size,
        "median_s": median_s,
        "bytes_per_s": size / median_s,
        "samples_s": run["samples_s"],
    }
