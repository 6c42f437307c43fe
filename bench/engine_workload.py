"""The engine benchmark's workload and arithmetic: what is timed, and how times become tok/s.

Pure (no torch): the orchestrator builds one *plan* here and hands the same plan, as JSON, to
every runner subprocess, so every system sees exactly the same token ids in the same order.

A plan is ``1 + repeats`` rounds. Round 0 is the warm-up (decode calls capped at
``warmup_tokens``) and is not measured; rounds ``1..repeats`` are. Each round makes, in order:

1. ``prefill``: one prompt of ``prompt_len`` tokens, ``max_tokens=1``;
2. for each batch size B: ``batch_prefill_b{B}``: B prompts of ``decode_prompt_len`` tokens,
   ``max_tokens=1``; then ``batch_total_b{B}``: B fresh prompts of the same length,
   ``max_tokens=T``.

Every call gets fresh random prompts, so no prefix cache can turn a repeat into a cache hit.
Per measured round r:

- prefill tok/s = ``prompt_len / t_prefill[r]``
- decode tok/s at batch B = ``B * (T - 1) / (t_batch_total_b{B}[r] - t_batch_prefill_b{B}[r])``:
  the ``max_tokens=1`` call costs the batch's prefill plus its first token, so the difference
  is the ``T - 1`` decode steps.

The reported figure is the median over rounds; every sample is kept.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

PREFILL = "prefill"


def batch_prefill_name(batch: int) -> str:
    return f"batch_prefill_b{batch}"


def batch_total_name(batch: int) -> str:
    return f"batch_total_b{batch}"


def prefill_metric(prompt_len: int) -> str:
    return f"prefill_{prompt_len}"


def decode_metric(batch: int) -> str:
    return f"decode_b{batch}"


@dataclass(frozen=True)
class Workload:
    """The knobs of one benchmark run; identical for every system."""

    prompt_len: int = 512
    decode_prompt_len: int = 32
    max_tokens: int = 64
    batches: tuple[int, ...] = (1, 16, 64)
    repeats: int = 3
    warmup_tokens: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.prompt_len > 0, f"prompt_len must be positive, got {self.prompt_len}")
        _require(
            self.decode_prompt_len > 0,
            f"decode_prompt_len must be positive, got {self.decode_prompt_len}",
        )
        _require(
            self.max_tokens >= 2,
            f"max_tokens must be at least 2 to time a decode step, got {self.max_tokens}",
        )
        _require(
            bool(self.batches) and all(b > 0 for b in self.batches),
            f"batches must be positive, got {self.batches}",
        )
        _require(self.repeats > 0, f"repeats must be positive, got {self.repeats}")
        _require(
            self.warmup_tokens > 0, f"warmup_tokens must be positive, got {self.warmup_tokens}"
        )

    @property
    def max_batch(self) -> int:
        return max(self.batches)

    @property
    def max_seq_len(self) -> int:
        """Longest sequence any call builds (prompt plus generated tokens)."""
        return max(self.prompt_len + 1, self.decode_prompt_len + self.max_tokens)

    @property
    def metrics(self) -> list[str]:
        return [prefill_metric(self.prompt_len)] + [decode_metric(b) for b in self.batches]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class Call:
    """One timed ``generate`` call: a batch of prompts and how many tokens each must produce."""

    round: int  # 0: warm-up, not measured
    name: str
    max_tokens: int
    prompts: list[list[int]] = field(repr=False)


@dataclass(frozen=True)
class Timing:
    round: int
    name: str
    seconds: float
    # CPU time (user + system) of the runner and its child processes during the call: on a
    # loaded machine it moves far less than ``seconds`` (kept in engine.json, not in the tables)
    cpu_seconds: float | None = None


def random_prompts(
    rng: random.Random, num_prompts: int, length: int, allowed: Sequence[int]
) -> list[list[int]]:
    """``num_prompts`` prompts of ``length`` ids drawn uniformly from ``allowed``."""
    return [[rng.choice(allowed) for _ in range(length)] for _ in range(num_prompts)]


def build_plan(workload: Workload, vocab_size: int, excluded: Iterable[int] = ()) -> list[Call]:
    """Every call of the run, warm-up round first, prompts drawn from one seeded stream."""
    banned = frozenset(excluded)
    allowed = [t for t in range(vocab_size) if t not in banned]
    if not allowed:
        raise ValueError(f"every token id of the {vocab_size}-token vocabulary is excluded")
    rng = random.Random(workload.seed)
    calls: list[Call] = []
    for rnd in range(workload.repeats + 1):
        tokens = workload.max_tokens if rnd else min(workload.warmup_tokens, workload.max_tokens)
        long_prompt = random_prompts(rng, 1, workload.prompt_len, allowed)
        calls.append(Call(rnd, PREFILL, 1, long_prompt))
        short = workload.decode_prompt_len
        for batch in workload.batches:
            first = random_prompts(rng, batch, short, allowed)
            calls.append(Call(rnd, batch_prefill_name(batch), 1, first))
            total = random_prompts(rng, batch, short, allowed)
            calls.append(Call(rnd, batch_total_name(batch), tokens, total))
    return calls


def plan_to_json(workload: Workload, calls: Sequence[Call]) -> dict:
    return {"workload": asdict(workload), "calls": [asdict(c) for c in calls]}


def plan_from_json(data: dict) -> tuple[Workload, list[Call]]:
    raw = dict(data["workload"])
    raw["batches"] = tuple(raw["batches"])
    return Workload(**raw), [Call(**c) for c in data["calls"]]


def _measured(timings: Iterable[Timing], name: str, cpu: bool = False) -> dict[int, float]:
    """Seconds per measured round of call ``name``: wall clock, or with ``cpu`` CPU time."""
    return {
        t.round: t.cpu_seconds if cpu else t.seconds
        for t in timings
        if t.name == name and t.round > 0 and (not cpu or t.cpu_seconds)
    }


def prefill_samples(
    workload: Workload, timings: Sequence[Timing], cpu: bool = False
) -> list[float]:
    """Prefill tok/s per measured round."""
    times = _measured(timings, PREFILL, cpu)
    return [workload.prompt_len / times[r] for r in sorted(times)]


def decode_samples(
    workload: Workload, timings: Sequence[Timing], batch: int, cpu: bool = False
) -> list[float]:
    """Decode tok/s per measured round at ``batch``; a round whose difference is not positive
    (timer noise swamping the decode time) is dropped."""
    first = _measured(timings, batch_prefill_name(batch), cpu)
    total = _measured(timings, batch_total_name(batch), cpu)
    tokens = batch * (workload.max_tokens - 1)
    rounds = sorted(set(first) & set(total))
    return [tokens / (total[r] - first[r]) for r in rounds if total[r] > first[r]]


def summarise(workload: Workload, timings: Sequence[Timing], cpu: bool = False) -> dict[str, dict]:
    """``{metric: {"median": tok/s or None, "samples": [tok/s per round]}}``; with ``cpu``,
    tokens per CPU-second of the runner's processes instead of per wall-clock second."""
    series = {prefill_metric(workload.prompt_len): prefill_samples(workload, timings, cpu)}
    for batch in workload.batches:
        series[decode_metric(batch)] = decode_samples(workload, timings, batch, cpu)
    return {name: {"median": median_or_none(s), "samples": s} for name, s in series.items()}


def median_or_none(samples: Sequence[float]) -> float | None:
    return statistics.median(samples) if samples else None


DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
# vLLM's CPU backend allocates KV in 128-token blocks; sizing every system for that grain
# gives all of them the same, sufficient pool.
KV_GRAIN = 128


@dataclass(frozen=True)
class EngineLimits:
    """Capacity settings given identically to every engine that takes them."""

    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_bytes: int


def _round_up(n: int, grain: int) -> int:
    return -(-n // grain) * grain


def kv_bytes_per_token(model_config: dict, dtype: str) -> int:
    """K and V of one token over every layer, from a Hugging Face ``config.json``."""
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads") or heads
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    return 2 * model_config["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[dtype]


def engine_limits(workload: Workload, model_config: dict, dtype: str) -> EngineLimits:
    """Enough KV for the largest batch at full length plus the long prompt, with 25% slack."""
    per_seq = _round_up(workload.decode_prompt_len + workload.max_tokens, KV_GRAIN)
    tokens = workload.max_batch * per_seq + _round_up(workload.prompt_len + 1, KV_GRAIN)
    kv_bytes = tokens * kv_bytes_per_token(model_config, dtype) * 5 // 4
    return EngineLimits(
        max_model_len=workload.max_seq_len,
        max_num_seqs=workload.max_batch,
        max_num_batched_tokens=max(2048, workload.prompt_len),
        kv_cache_bytes=kv_bytes,
    )
