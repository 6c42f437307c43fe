"""Rotary position embeddings, including the ``rope_scaling`` variants Llama-family
configs name: default, linear, llama3 and yarn. The inverse frequencies follow
Hugging Face's definitions exactly so logits match ``transformers`` in float32.
Length-dependent variants (dynamic NTK, longrope) cannot be made consistent with
a paged cache that is computed once per token, so they are refused at load.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from services.common.errors import ModelFormatError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
RotaryTables = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [n, 1, head_dim]


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(base: float, dim: int, p: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    original = p.get("original_max_position_embeddings") or max_pos
    factor = p.get("factor") or max_pos / original
    attention = p.get("attention_factor")
    if attention is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            if mscale and mscale_all
            else _yarn_mscale(factor)
        )
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE parameters of a config.json, old (``rope_scaling``) or new (``rope_parameters``) style."""
    params = dict(config.get("rope_parameters") or {})
    params.update(config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelFormatError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    return params


def inv_freq_and_scale(
    params: dict[str, Any], head_dim: int, max_position: int
) -> tuple[torch.Tensor, float]:
    base, rope_type = float(params["rope_theta"]), params["rope_type"]
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    if dim != head_dim:
        raise ModelFormatError("partial rotary embeddings are not supported")
    if rope_type == "yarn":
        return _yarn(base, dim, params, max_position)
    inv_freq = _base_inv_freq(base, dim)
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, params)
    return inv_freq, 1.0


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for every position up to ``max_position``, looked up per token."""

    def __init__(self, params: dict[str, Any], head_dim: int, max_position: int) -> None:
        super().__init__()
        try:
            inv_freq, scale = inv_freq_and_scale(params, head_dim, max_position)
        except ModelFormatError:
            raise
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:  # the config's values
            raise ModelFormatError(
                f"the rope parameters {params} cannot be used: {exc!r}"
            ) from None
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        if not emb.is_meta and not (math.isfinite(scale) and bool(emb.isfinite().all())):
            raise ModelFormatError(f"the rope parameters {params} give non-finite rotary tables")
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """cos/sin rows for ``positions``, shaped to broadcast over heads, in ``dtype``."""
        cos = self.cos[positions].unsqueeze(1).to(dtype)
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        return cos, sin


def apply_rotary(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Rotate ``x`` ``[n, heads, d]`` by its rows' positions (Hugging Face's rotate-half form)."""
    cos, sin = tables
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
