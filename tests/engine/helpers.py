"""Helpers for engine tests: engines on tiny models, logits capture, HF references."""

from __future__ import annotations

from pathlib import Path

import torch

from services.common.config import EngineConfig
from services.common.types import SamplingParams
from services.engine.engine import Engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def make_engine(model: Path, logits_hook=None, **overrides) -> Engine:
    cfg = dict(model=str(model), num_kv_blocks=256, max_num_batched_tokens=2048)
    cfg.update(overrides)
    return Engine(EngineConfig(**cfg), logits_hook=logits_hook)


class LogitsRecorder:
    """Collects, per request, the logits of every sampled position in order."""

    def __init__(self) -> None:
        self.logits: dict[str, list[torch.Tensor]] = {}

    def __call__(self, seqs, logits: torch.Tensor) -> None:
        for seq, row in zip(seqs, logits, strict=True):
            self.logits.setdefault(seq.request_id, []).append(row.clone())


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """Hugging Face logits ``[len, vocab]`` for every position of ``token_ids``."""
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_no_leaks(engine: Engine) -> None:
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"], stats
    assert stats["num_running"] == stats["num_waiting"] == stats["num_importing"] == 0, stats
    assert not engine.has_unfinished_requests


def hf_greedy(hf_model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Plain greedy decoding with transformers' KV cache and no logits processing.

    (``generate(min_new_tokens=...)`` would mask EOS; ``ignore_eos`` only keeps going past it.)
    """
    tokens: list[int] = []
    with torch.no_grad():
        out = hf_model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(num_tokens):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = hf_model(
                torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True
            )
    return tokens
