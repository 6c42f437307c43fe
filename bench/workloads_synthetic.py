"""Synthetic workloads of ``banaserve bench compare`` (the catalog is ``bench/workloads.py``).

Pure, seeded and torch-free. Prompts are token ids (no tokenizer), as in ``bench serve``
(``bench/serve_workload.py``, whose length samplers and arrival process this module reuses).

A synthetic workload is a sequence of *phases*, each a share of the duration with its own
arrival process (gamma inter-arrival gaps: shape ``burstiness`` 1 is Poisson, < 1 burstier) and
its own *mix* of request classes (a weighted choice per request). A class draws its input and
output lengths (uniform within ``±spread`` of the mean, or log-normal with sigma ``spread``,
clipped) and optionally prepends one of a pool of shared prefixes (the first one *hot*: it
takes ``hot_share`` of the class's requests, the others the rest evenly).

Request ``i``'s content depends only on ``(seed, workload name, i)``; arrivals only on
``(seed, workload name, phase)``; a prefix only on ``(seed, workload name, class, prefix id)``.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from bench.serve_workload import Request, arrival_times, clip, jittered_len, lognormal_len

# Token ids are drawn from this range by default, as bench serve does (skips tokenizers'
# special ids; fits smollm2's 49,152 ids, not tiny-llama's 4,096).
VOCAB = (1000, 30000)
DEFAULT_MAX_MODEL_LEN = 2048


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class Shape(enum.Enum):
    JITTER = "jitter"  # uniform in mean × [1 − spread, 1 + spread]
    LOGNORMAL = "lognormal"  # log-normal with this mean, log-space sigma = spread, clipped


@dataclass(frozen=True)
class Lengths:
    mean: int
    shape: Shape = Shape.JITTER
    spread: float = 0.2
    low: int = 1  # LOGNORMAL clip
    high: int = 1 << 30

    def __post_init__(self) -> None:
        _require(self.mean > 0, f"mean length must be positive, got {self.mean}")
        _require(self.spread >= 0, f"spread must be >= 0, got {self.spread}")
        _require(self.shape is Shape.LOGNORMAL or self.spread < 1, "jitter spread must be < 1")
        _require(1 <= self.low <= self.high, f"need 1 <= low <= high, got {self.low}, {self.high}")

    def sample(self, rng: random.Random) -> int:
        if self.shape is Shape.LOGNORMAL:
            return lognormal_len(rng, self.mean, self.spread, self.low, self.high)
        return jittered_len(rng, self.mean, self.spread)


@dataclass(frozen=True)
class PrefixPool:
    num_prefixes: int
    prefix_len: int
    hot_share: float  # share of the class's requests on prefix 0; the rest spread evenly

    def __post_init__(self) -> None:
        _require(self.num_prefixes >= 1, "a prefix pool needs at least one prefix")
        _require(self.prefix_len >= 1, "prefix_len must be positive")
        _require(0.0 <= self.hot_share <= 1.0, "hot_share must be in [0, 1]")
        _require(self.num_prefixes > 1 or self.hot_share == 1.0, "one prefix: hot_share 1")

    def pick(self, rng: random.Random) -> int:
        if self.num_prefixes == 1 or rng.random() < self.hot_share:
            return 0
        return rng.randrange(1, self.num_prefixes)


@dataclass(frozen=True)
class RequestClass:
    name: str
    input: Lengths  # with a prefix: the unique suffix after it
    output: Lengths
    weight: float = 1.0
    prefix: PrefixPool | None = None

    def __post_init__(self) -> None:
        _require(self.weight > 0, f"class {self.name}: weight must be positive")


@dataclass(frozen=True)
class Phase:
    name: str
    share: float  # of the workload's duration
    rate: float  # mean arrivals per second
    classes: tuple[RequestClass, ...]
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        _require(0 < self.share <= 1, f"phase {self.name}: share must be in (0, 1]")
        _require(self.rate > 0 and self.burstiness > 0, f"phase {self.name}: rate, burstiness > 0")
        _require(len(self.classes) > 0, f"phase {self.name} needs a request class")


@dataclass(frozen=True)
class SyntheticWorkload:
    name: str
    description: str
    phases: tuple[Phase, ...]
    # Default SLO for this workload (docs/benchmarks.md says how they were chosen).
    slo_ttft_ms: float
    slo_tpot_ms: float

    def __post_init__(self) -> None:
        total = sum(p.share for p in self.phases)
        _require(abs(total - 1.0) < 1e-9, f"{self.name}: phase shares sum to {total}, not 1")


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a plan: what to send, when (seconds from the start), and its class."""

    request: Request
    at_s: float
    tag: str  # "phase/class" (synthetic) or the trace's name


def prefix_tokens(
    seed: int, workload: str, cls_name: str, pool: PrefixPool, prefix_id: int,
    vocab: tuple[int, int],
) -> list[int]:  # fmt: skip
    rng = random.Random(f"{seed}:{workload}:prefix:{cls_name}:{prefix_id}")
    return [rng.randrange(*vocab) for _ in range(pool.prefix_len)]


def make_synthetic_request(
    w: SyntheticWorkload,
    phase: Phase,
    index: int,
    seed: int,
    max_model_len: int,
    vocab: tuple[int, int] = VOCAB,
) -> tuple[Request, str]:
    """Request ``index`` (drawn in ``phase``) and its class name."""
    rng = random.Random(f"{seed}:{w.name}:{index}")
    cls = rng.choices(phase.classes, weights=[c.weight for c in phase.classes])[0]
    num_in, num_out = cls.input.sample(rng), cls.output.sample(rng)
    prefix: list[int] = []
    prefix_id = None
    if cls.prefix is not None:
        prefix_id = cls.prefix.pick(rng)
        prefix = prefix_tokens(seed, w.name, cls.name, cls.prefix, prefix_id, vocab)
    total, num_out = clip(len(prefix) + num_in, num_out, max_model_len)
    suffix = [rng.randrange(*vocab) for _ in range(max(0, total - len(prefix)))]
    prompt = (prefix + suffix)[:total]
    return Request(index, prompt, num_out, prefix_id), cls.name


def plan_synthetic(
    w: SyntheticWorkload,
    duration_s: float,
    seed: int,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    vocab: tuple[int, int] = VOCAB,
) -> list[PlannedRequest]:
    """Every request of ``w`` over ``duration_s``, ordered by send time; each phase's first
    arrival is at the phase's start."""
    _require(duration_s > 0, f"duration must be positive, got {duration_s}")
    planned: list[PlannedRequest] = []
    start = 0.0
    for phase in w.phases:
        length = phase.share * duration_s
        times = arrival_times(
            phase.rate, phase.burstiness, f"{seed}:{w.name}:{phase.name}", None, length
        )
        for t in times:
            request, cls = make_synthetic_request(
                w, phase, len(planned), seed, max_model_len, vocab
            )
            planned.append(PlannedRequest(request, start + t, f"{phase.name}/{cls}"))
        start += length
    return planned
