"""The serving benchmark's workload: which prompts are sent, how long they are, and when.

Pure (no network). Prompts are token ids drawn uniformly from ``[vocab_low, vocab_high)``, so no
tokenizer is needed and the same request reaches every target unchanged; the default range
skips the low ids where common tokenizers keep their special tokens.

Request ``i`` is a function of ``(seed, workload, i)`` alone (its own ``random.Random``), so a
run by count and a run by duration send the same first requests, whatever the arrival times.

Length mixes, each clipped so that ``input + output <= max_model_len`` (input first, leaving
room for at least one output token):

- ``sharegpt-like``: input and output lengths log-normal, with means ``input_len`` (200) and
  ``output_len`` (120) and log-space sigmas 1.0 and 0.8; inputs clipped to [4, 4 × mean],
  outputs to [2, 4 × mean]. This resembles the conversation lengths of ShareGPT as vLLM's
  benchmark samples them (long right tails, median well under the mean); clipping pulls the
  realised means a few percent under the nominal ones.
- ``prefill-heavy``: inputs ``input_len`` (1024), outputs ``output_len`` (16).
- ``decode-heavy``: inputs ``input_len`` (64), outputs ``output_len`` (512).
- ``shared-prefix``: one of ``num_prefixes`` (4) fixed prefixes of ``prefix_len`` (512) tokens,
  picked at random per request, then a unique suffix of ``input_len`` (128) tokens; outputs
  ``output_len`` (64). For prefix-cache experiments.

For the three fixed-length mixes every length is uniform in ``[L(1 − r), L(1 + r)]`` with
``r = range_ratio`` (0.1), rounded; ``r = 0`` gives exact lengths.

Arrivals: inter-arrival gaps are gamma-distributed with shape ``burstiness`` and mean
``1 / rate`` (as in vLLM's ``benchmark_serving``): shape 1 is a Poisson process, shape < 1
burstier (coefficient of variation ``1/sqrt(shape)``), shape > 1 more regular. ``rate = inf``
sends everything at time 0.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

WORKLOADS = ("sharegpt-like", "prefill-heavy", "decode-heavy", "shared-prefix")
# (input_len, output_len) by workload; for shared-prefix input_len is the unique suffix.
DEFAULT_LENGTHS = {
    "sharegpt-like": (200, 120),
    "prefill-heavy": (1024, 16),
    "decode-heavy": (64, 512),
    "shared-prefix": (128, 64),
}
SHAREGPT_SIGMA = (1.0, 0.8)
SHAREGPT_MIN = (4, 2)
SHAREGPT_CLIP_FACTOR = 4


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that decides the prompts; validated here so bad flags fail before sending."""

    name: str = "sharegpt-like"
    input_len: int | None = None  # None: the workload's default
    output_len: int | None = None
    range_ratio: float = 0.1
    max_model_len: int = 2048
    vocab_low: int = 1000
    vocab_high: int = 30000
    num_prefixes: int = 4
    prefix_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.name in WORKLOADS, f"workload must be one of {', '.join(WORKLOADS)}")
        _require(self.input_len is None or self.input_len > 0, "input length must be positive")
        _require(self.output_len is None or self.output_len > 0, "output length must be > 0")
        _require(0.0 <= self.range_ratio < 1.0, "range ratio must be in [0, 1)")
        _require(0 <= self.vocab_low < self.vocab_high, "vocab range must be LOW:HIGH, LOW < HIGH")
        _require(self.num_prefixes > 0, "num_prefixes must be positive")
        _require(self.prefix_len >= 0, "prefix_len must not be negative")
        min_len = 2 + (self.prefix_len if self.name == "shared-prefix" else 0)
        _require(
            self.max_model_len >= min_len,
            f"max_model_len must be at least {min_len} for {self.name}",
        )

    @property
    def lengths(self) -> tuple[int, int]:
        """The nominal (input_len, output_len) after defaults."""
        default_in, default_out = DEFAULT_LENGTHS[self.name]
        return self.input_len or default_in, self.output_len or default_out


@dataclass(frozen=True)
class Request:
    index: int
    prompt: list[int]
    max_tokens: int
    prefix_id: int | None = None  # shared-prefix only


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def lognormal_len(rng: random.Random, mean: float, sigma: float, low: int, high: int) -> int:
    """A log-normal sample with the given mean (not median), rounded and clipped."""
    mu = math.log(mean) - sigma * sigma / 2
    return min(high, max(low, round(rng.lognormvariate(mu, sigma))))


def jittered_len(rng: random.Random, length: int, ratio: float) -> int:
    low, high = round(length * (1 - ratio)), round(length * (1 + ratio))
    return max(1, rng.randint(low, high))


def clip(input_len: int, output_len: int, max_model_len: int) -> tuple[int, int]:
    """Keep ``input + output <= max_model_len`` with at least one token of each."""
    input_len = min(input_len, max_model_len - 1)
    return input_len, max(1, min(output_len, max_model_len - input_len))


def token_ids(rng: random.Random, spec: WorkloadSpec, n: int) -> list[int]:
    return [rng.randrange(spec.vocab_low, spec.vocab_high) for _ in range(n)]


def shared_prefix(spec: WorkloadSpec, prefix_id: int) -> list[int]:
    rng = random.Random(f"{spec.seed}:prefix:{prefix_id}")
    return token_ids(rng, spec, spec.prefix_len)


def sampled_lengths(rng: random.Random, spec: WorkloadSpec) -> tuple[int, int]:
    mean_in, mean_out = spec.lengths
    if spec.name == "sharegpt-like":
        return (
            lognormal_len(rng, mean_in, SHAREGPT_SIGMA[0], SHAREGPT_MIN[0],
                          SHAREGPT_CLIP_FACTOR * mean_in),
            lognormal_len(rng, mean_out, SHAREGPT_SIGMA[1], SHAREGPT_MIN[1],
                          SHAREGPT_CLIP_FACTOR * mean_out),
        )  # fmt: skip
    return jittered_len(rng, mean_in, spec.range_ratio), jittered_len(
        rng, mean_out, spec.range_ratio
    )


def make_request(spec: WorkloadSpec, index: int) -> Request:
    """Request ``index`` of the workload; the same for the same spec, whatever else is sent."""
    rng = random.Random(f"{spec.seed}:{spec.name}:{index}")
    input_len, output_len = sampled_lengths(rng, spec)
    if spec.name != "shared-prefix":
        input_len, output_len = clip(input_len, output_len, spec.max_model_len)
        return Request(index, token_ids(rng, spec, input_len), output_len)
    prefix_id = rng.randrange(spec.num_prefixes)
    total, output_len = clip(spec.prefix_len + input_len, output_len, spec.max_model_len)
    suffix = token_ids(rng, spec, total - spec.prefix_len)
    return Request(index, shared_prefix(spec, prefix_id) + suffix, output_len, prefix_id)


def arrival_gaps(rate: float, burstiness: float, seed: int | str) -> Iterator[float]:
    """Endless seconds between consecutive sends (the first request goes at time 0); ``seed``
    may be a string naming a stream (``bench/workloads*.py``: one per workload phase)."""
    _require(rate > 0, f"rate must be positive, got {rate}")
    _require(burstiness > 0, f"burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        while True:
            yield 0.0
    rng = random.Random(f"{seed}:arrivals")
    scale = 1.0 / (rate * burstiness)  # gamma mean = shape * scale = 1 / rate
    while True:
        yield rng.gammavariate(burstiness, scale)


def arrival_times(
    rate: float,
    burstiness: float,
    seed: int | str,
    num_requests: int | None,
    duration_s: float | None,
) -> list[float]:
    """Send offsets in seconds from the start: ``num_requests`` of them, or every one that falls
    before ``duration_s`` (at least one), whichever limit is given (both: the first reached)."""
    _require(num_requests is not None or duration_s is not None, "need a count or a duration")
    _require(
        not (math.isinf(rate) and num_requests is None),
        "rate inf sends everything at once, so it needs a request count",
    )
    times: list[float] = []
    now = 0.0
    for gap in arrival_gaps(rate, burstiness, seed):
        now += gap if times else 0.0
        if num_requests is not None and len(times) >= num_requests:
            break
        if duration_s is not None and times and now >= duration_s:
            break
        times.append(now)
    return times
