"""Typed configuration: frozen dataclasses, validated on construction.

Only a ``__main__`` (or the CLI) reads the environment; cores receive their own
section already built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import ConfigError

DTYPES = ("float32", "bfloat16")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class EngineConfig:
    """What one engine needs: its model, numeric format, KV pool and batching limits."""

    model: str
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    # KV pool size: an explicit block count wins over the byte budget.
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    num_threads: int | None = None

    def __post_init__(self) -> None:
        _require(bool(self.model), "model must name a prepared model or a model directory")
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(
            self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
            f"block_size must be a power of two up to 128, got {self.block_size}",
        )
        _require(
            self.num_kv_blocks is None or self.num_kv_blocks > 0,
            f"num_kv_blocks must be positive, got {self.num_kv_blocks}",
        )
        _require(
            self.kv_cache_bytes > 0, f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}"
        )
        _require(self.max_num_seqs > 0, f"max_num_seqs must be positive, got {self.max_num_seqs}")
        _require(
            self.max_num_batched_tokens >= self.block_size,
            "max_num_batched_tokens must be at least block_size, "
            f"got {self.max_num_batched_tokens} < {self.block_size}",
        )
        _require(
            self.max_model_len is None or self.max_model_len > 0,
            f"max_model_len must be positive, got {self.max_model_len}",
        )
        _require(
            self.num_threads is None or self.num_threads > 0,
            f"num_threads must be positive, got {self.num_threads}",
        )


def banaserve_home() -> Path:
    """Root of BanaServe's local state; ``BANASERVE_HOME`` moves it."""
    return Path(os.environ.get("BANASERVE_HOME", Path.home() / ".cache" / "banaserve"))


def models_dir() -> Path:
    return banaserve_home() / "models"
