"""Plain request types shared by the router, the engine and the CLI (no torch, no grpc)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.errors import InvalidRequestError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy."""

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
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.max_tokens > 0, f"max_tokens must be > 0, got {self.max_tokens}")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0")
        _check(all(self.stop), "stop strings must be non-empty")
        _check(self.detokenize or not self.stop, "stop strings need detokenize=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
