"""Plain request types shared by the router, the engine and the CLI (no torch, no grpc)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from services.common.errors import InvalidRequestError

# Below this temperature sampling is greedy: dividing logits by a smaller one only sharpens a
# distribution that is already one-hot in float32 (and a subnormal one would overflow).
MIN_TEMPERATURE = 1e-5
# The proto's ranges (common.proto): a value outside them cannot come from a valid message.
MAX_INT32 = (1 << 31) - 1
MAX_UINT32 = (1 << 32) - 1
MAX_UINT64 = (1 << 64) - 1


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. A temperature below ``MIN_TEMPERATURE`` (0 among
    them) means greedy.

    Every value the wire can carry is either accepted here, and then samples without error
    (services/engine/sampler.py), or rejected with ``InvalidRequestError``: non-finite floats,
    negative values, ``top_p`` outside (0, 1], integers outside their proto type's range.
    """

    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    detokenize: bool = True  # False: token ids only, no text (as vLLM's option of that name)

    def __post_init__(self) -> None:
        # Written so that NaN fails every check (each comparison with NaN is False).
        _check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be >= 0 and finite, got {self.temperature}",
        )
        _check(0 <= self.top_k <= MAX_INT32, f"top_k must be in [0, {MAX_INT32}], got {self.top_k}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.max_tokens > 0, f"max_tokens must be > 0, got {self.max_tokens}")
        _check(
            self.max_tokens <= MAX_INT32,
            f"max_tokens must be <= {MAX_INT32}, got {self.max_tokens}",
        )
        _check(
            self.seed is None or 0 <= self.seed <= MAX_UINT64,
            f"seed must be in [0, {MAX_UINT64}], got {self.seed}",
        )
        _check(
            all(0 <= t <= MAX_UINT32 for t in self.stop_token_ids),
            f"stop_token_ids must be in [0, {MAX_UINT32}]",
        )
        _check(all(self.stop), "stop strings must be non-empty")
        _check(self.detokenize or not self.stop, "stop strings need detokenize=True")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
