"""The workloads of ``banaserve bench compare``, by name: the paper's families and two more.

Pure, seeded and torch-free, so the cluster simulator (issue 13) replays exactly what a real
run sent: ``plan(name, duration_s, seed)`` returns the same requests at the same offsets for
the same arguments on any machine. Sizes and rates are chosen for this project's 2-core
machine serving smollm2-135m in float32 with one worker per core, where one core prefills
~290 prompt tokens/s and decodes ~110 tokens/s at batch 16 (README engine table): each
workload offers roughly one core's worth of its bottleneck work, so a static split saturates
where a balanced one does not. ``rate_scale`` multiplies every arrival rate (a faster or a
busier machine); docs/benchmarks.md has the table and the SLO reasoning.

- ``long-context``: ~1,024-token prompts, 32 tokens out, Poisson 0.25/s;
- ``bursty``: ShareGPT-like log-normal lengths (means 256 in / 64 out), gamma arrivals of
  shape 0.25 (coefficient of variation 2) at 1/s;
- ``mixed``: half prompt-heavy (512 in / 16 out), half generation-heavy (64 in / 128 out),
  Poisson 1/s;
- ``phase-shift``: prefill-heavy (768 / 8 at 0.4/s) for the first third, decode-heavy
  (32 / 128 at 1/s) for the second, prefill-heavy again for the last;
- ``hotspot``: 8 shared 384-token prefixes, 70 % of requests on the first, then a 64-token
  unique suffix, 32 out, Poisson 1/s;
- ``mooncake``: the Mooncake conversation trace from its start, lengths ÷ 32, time × 4
  (``bench/workloads_trace.py``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bench.workloads_synthetic import (
    DEFAULT_MAX_MODEL_LEN,
    VOCAB,
    Lengths,
    Phase,
    PlannedRequest,
    PrefixPool,
    RequestClass,
    Shape,
    SyntheticWorkload,
    plan_synthetic,
)
from bench.workloads_trace import DEFAULT_TRACES_DIR, TraceWorkload, load_trace, plan_trace
from services.common.errors import ConfigError

Workload = SyntheticWorkload | TraceWorkload

# TPOT SLO for every workload: ~2.5× one decode step of smollm2 at batch 1 on this machine
# (~92 ms, 10.9 tok/s), so a decoder batching 16–32 sequences meets it and one interleaving
# long prefills into its steps does not.
TPOT_SLO_MS = 250.0

PREFILL_HEAVY = RequestClass("prefill-heavy", Lengths(768), Lengths(8, spread=0.25))
DECODE_HEAVY = RequestClass("decode-heavy", Lengths(32), Lengths(128))

CATALOG: tuple[Workload, ...] = (
    SyntheticWorkload(
        "long-context",
        "~1,024-token prompts, 32 out, Poisson 0.25/s",
        (Phase("all", 1.0, 0.25, (RequestClass("long", Lengths(1024), Lengths(32)),)),),
        slo_ttft_ms=10_000.0,
        slo_tpot_ms=TPOT_SLO_MS,
    ),
    SyntheticWorkload(
        "bursty",
        "log-normal lengths (256 in / 64 out), gamma shape 0.25 arrivals at 1/s",
        (
            Phase(
                "all",
                1.0,
                1.0,
                (
                    RequestClass(
                        "sharegpt",
                        Lengths(256, Shape.LOGNORMAL, 1.0, low=4, high=1024),
                        Lengths(64, Shape.LOGNORMAL, 0.8, low=2, high=256),
                    ),
                ),
                burstiness=0.25,
            ),
        ),  # fmt: skip
        slo_ttft_ms=3_000.0,
        slo_tpot_ms=TPOT_SLO_MS,
    ),
    SyntheticWorkload(
        "mixed",
        "half 512 in / 16 out, half 64 in / 128 out, Poisson 1/s",
        (
            Phase(
                "all",
                1.0,
                1.0,
                (
                    RequestClass("prompt-heavy", Lengths(512), Lengths(16)),
                    RequestClass("generation-heavy", Lengths(64), Lengths(128)),
                ),
            ),
        ),  # fmt: skip
        slo_ttft_ms=5_000.0,
        slo_tpot_ms=TPOT_SLO_MS,
    ),
    SyntheticWorkload(
        "phase-shift",
        "prefill-heavy (768/8, 0.4/s), then decode-heavy (32/128, 1/s), then prefill-heavy",
        (
            Phase("prefill-1", 1 / 3, 0.4, (PREFILL_HEAVY,)),
            Phase("decode", 1 / 3, 1.0, (DECODE_HEAVY,)),
            Phase("prefill-2", 1 / 3, 0.4, (PREFILL_HEAVY,)),
        ),
        slo_ttft_ms=6_000.0,
        slo_tpot_ms=TPOT_SLO_MS,
    ),
    SyntheticWorkload(
        "hotspot",
        "8 shared 384-token prefixes (70 % on one) + 64 unique, 32 out, Poisson 1/s",
        (
            Phase(
                "all",
                1.0,
                1.0,
                (
                    RequestClass(
                        "hot", Lengths(64), Lengths(32), prefix=PrefixPool(8, 384, hot_share=0.7)
                    ),
                ),
            ),
        ),  # fmt: skip
        slo_ttft_ms=3_000.0,
        slo_tpot_ms=TPOT_SLO_MS,
    ),
    TraceWorkload(
        "mooncake",
        "Mooncake conversation trace from its start: lengths ÷ 32 (max 1,536 in), time × 4",
        "mooncake_conversation.jsonl",
        slo_ttft_ms=5_000.0,
        slo_tpot_ms=TPOT_SLO_MS,
    ),
)
FAMILIES = tuple(w.name for w in CATALOG)


def workload(name: str, rate_scale: float = 1.0) -> Workload:
    """The named workload, its arrival rates multiplied by ``rate_scale`` (a trace's time
    scale divided by it)."""
    if rate_scale <= 0:
        raise ConfigError(f"rate_scale must be positive, got {rate_scale}")
    for w in CATALOG:
        if w.name == name:
            return scaled(w, rate_scale)
    raise ConfigError(f"unknown workload {name!r}; known: {', '.join(FAMILIES)}")


def scaled(w: Workload, rate_scale: float) -> Workload:
    if rate_scale == 1.0:
        return w
    if isinstance(w, TraceWorkload):
        return replace(w, time_scale=w.time_scale / rate_scale)
    return replace(w, phases=tuple(replace(p, rate=p.rate * rate_scale) for p in w.phases))


def plan(
    w: Workload,
    duration_s: float,
    seed: int,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    traces_dir: Path = DEFAULT_TRACES_DIR,
    vocab: tuple[int, int] = VOCAB,
) -> list[PlannedRequest]:
    """Every request of ``w`` over ``duration_s`` seconds, by send time (pure given the trace
    file's content); prompt token ids in ``[vocab[0], vocab[1])``."""
    if isinstance(w, TraceWorkload):
        path = Path(traces_dir) / w.file
        if not path.exists():
            raise ConfigError(f"{w.name}: trace {path} not found (pass --traces-dir)")
        return plan_trace(w, load_trace(path), duration_s, seed, max_model_len, vocab)
    return plan_synthetic(w, duration_s, seed, max_model_len, vocab)
