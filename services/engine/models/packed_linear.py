"""Linear layers with weights pre-packed for oneDNN (CPU).

On CPU, a plain bfloat16 ``F.linear`` lets oneDNN re-lay-out the weight into its
blocked (AMX) format on every call, which costs as much memory traffic as the
matmul itself at decode batch sizes. Packing once at load time removes that.
Measured on smollm2-135m's layer shapes, one thread, all 30 layers
(see docs/engine.md): bfloat16 1.4x faster at batch 1, 16 and 64; float32 1.47x
at batch 16 and 1.05x at 64, but 1.12x *slower* at batch 1, a trade made for
the batched decode that serving runs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# oneDNN picks its blocking from this hint; decode batches are what packing is for.
_BATCH_HINT = 16


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
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


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
