"""Linear layers with weights pre-packed for oneDNN (CPU).

On CPU, a plain bfloat16 ``F.linear`` lets oneDNN re-lay-out the weight into its
blocked (AMX) format on every call, which costs as much memory traffic as the
matmul itself at decode batch sizes. Packing once at load time removes that.
Measured on smollm2-135m's layer shapes, one thread, all 30 layers
(see docs/engine.md): bfloat16 1.4x faster at batch 1, 16 and 64; float32 1.47x
at batch 16 and 1.05x at 64, but 1.12x *slower* at batch 1, a trade made for
the batched decode that serving runs.

bfloat16 on a CPU without native bfloat16 instructions (no AVX512-BF16, no AMX) takes the
engine's own kernel instead (``csrc/small_gemm.cpp``, loaded by ``paged_decode.load``): there
oneDNN widens bfloat16 at about half its float32 speed, and the kernel, widening each weight
in registers as it streams by, measured 2.3-4x faster on every smollm2-135m linear at 1 to
512 rows. The weight is packed for it once (``pack_weight``) and takes the same memory.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from services.engine import paged_decode

log = logging.getLogger(__name__)

# oneDNN picks its blocking from this hint; decode batches are what packing is for.
_BATCH_HINT = 16
# oneDNN builds (JIT-compiles) and caches a primitive per row count, and a process that meets
# every prompt length keeps the memory of each: session 46's soak probe saw a prefill worker
# grow 1.41 -> 2.2 GB under load, and a decode worker hosting a prefill worker's layers keep
# ~700 MB after the migration ended (not Python objects, and mostly not freeable by
# malloc_trim). Past EXACT_ROWS (decode batches) a call's rows are padded up to one of
# ROW_STEPS_PER_OCTAVE sizes per power of two: 6,000 calls of smollm2's gate/up and down
# linears at random row counts up to 2,048 grew a process by 2.1 GB exact, by 0.21 GB padded,
# for 2-3 % more time per call (docs/engine.md, "Weights").
EXACT_ROWS = 64
ROW_STEPS_PER_OCTAVE = 16
_TILE = 32  # outputs per tile of the small_gemm packing


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions oneDNN uses (then oneDNN is the faster path)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True  # unknown: keep oneDNN
    return "avx512_bf16" in flags or "amx_bf16" in flags


def kernel_supported(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and not native_bf16()
        and paged_decode.load()
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` -> ``[ceil(N / 32), K, 32]`` (zero rows past N): the small_gemm layout."""
    n, k = weight.shape
    pad = -n % _TILE
    if pad:
        weight = torch.cat([weight, weight.new_zeros(pad, k)])
    return weight.view(-1, _TILE, k).transpose(1, 2).contiguous()


def padded_rows(m: int) -> int:
    """The row count oneDNN computes for ``m`` rows: ``m`` up to ``EXACT_ROWS``, else ``m``
    rounded up to a multiple of 1/``ROW_STEPS_PER_OCTAVE`` of its power of two (at most
    1/``ROW_STEPS_PER_OCTAVE`` more rows), so a process meets a bounded number of shapes."""
    if m <= EXACT_ROWS:
        return m
    step = max(1, (1 << (m.bit_length() - 1)) // ROW_STEPS_PER_OCTAVE)
    return -(-m // step) * step


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.kernel = kernel_supported(weight)
        if self.kernel:
            self.register_buffer("packed", pack_weight(weight))
        else:
            self.register_buffer(
                "packed", torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT)
            )
        self.bias = linear.bias
        self._no_bias = weight.new_empty(0)

    def _save_to_state_dict(
        self, destination: dict[str, torch.Tensor], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel:  # [N, K] as oneDNN's packing reads back: layer digests match
            tiles = self.packed.transpose(1, 2).reshape(-1, self.in_features)
            destination[prefix + "packed"] = tiles[: self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not self.kernel:
            m = rows.shape[0]
            padded = padded_rows(m)
            if padded != m:  # the padding rows' outputs are computed and dropped
                rows = F.pad(rows, (0, 0, 0, padded - m))
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
            return out[:m].view(*x.shape[:-1], self.out_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = rows.new_empty(rows.shape[0], self.out_features)
        bias = self._no_bias if self.bias is None else self.bias
        torch.ops.banaserve.small_gemm(rows, self.packed, bias, out)
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model`` by a packed one; returns how many were packed.

    Falls back to the plain layers (and says so) if oneDNN refuses a weight.
    """
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    try:
        packed = [(parent, name, PackedLinear(child)) for parent, name, child in targets]
    except RuntimeError as exc:
        log.warning("oneDNN weight packing unavailable, using plain linear layers: %s", exc)
        return 0
    for parent, name, layer in packed:
        setattr(parent, name, layer)
    return len(packed)
