"""Fused elementwise ops of the decoder layer (``csrc/fused_ops.cpp``), float32 on the CPU.

torch runs RMSNorm, the residual add, SwiGLU's ``silu(gate) * up`` and rotate-half RoPE as
separate passes over the activations (RMSNorm alone is ~6: pow, mean, add, rsqrt, mul, mul),
each allocating its result: ~10% of a float32 512-token prefill of smollm2-135m on one core.
The kernels do each in one pass, in place where the input is the layer's own scratch:

- ``rms_norm(x, w, eps)`` -> a new tensor;
- ``add_rms_norm_(x, residual, w, eps)`` -> ``x += residual`` in place, returns ``rms_norm(x)``;
- ``silu_mul(gate_up)`` -> ``silu(gate) * up`` (``gate_up`` is ``[gate | up]`` per row);
- ``rotary_(x, cos, sin)`` -> ``x`` rotated in place (Hugging Face's rotate-half form).

They are used when ``supports(x)``: a float32 CPU tensor and the kernel library loaded
(``paged_decode.load``). Anything else (bfloat16, which keeps its tested numerics; another
device; no compiler) takes the torch ops, which give the same values up to the order of
float32 additions (``tests/engine/test_fused_ops.py``).
"""

from __future__ import annotations

import torch

from services.engine import paged_decode


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and paged_decode.load()


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = _rows(x)
    out = torch.empty_like(rows)
    torch.ops.banaserve.rms_norm(rows, weight, eps, out)
    return out.view(x.shape)


def add_rms_norm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``x += residual`` (``x`` must be contiguous: it is written in place), then its RMSNorm."""
    rows = x.view(-1, x.shape[-1])
    out = torch.empty_like(rows)
    torch.ops.banaserve.add_rms_norm(rows, _rows(residual), weight, eps, out)
    return out.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    rows = _rows(gate_up)
    out = rows.new_empty(rows.shape[0], rows.shape[1] // 2)
    torch.ops.banaserve.silu_mul(rows, out)
    return out.view(*gate_up.shape[:-1], out.shape[-1])


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[n, heads, d]`` (any row/head strides) in place; ``cos``/``sin`` ``[n, 1, d]``."""
    n, d = x.shape[0], x.shape[-1]
    torch.ops.banaserve.rotary(x, cos.reshape(n, d).contiguous(), sin.reshape(n, d).contiguous())
    return x
