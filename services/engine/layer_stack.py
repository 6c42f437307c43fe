"""Decoder layers hosted with weights another worker shipped (layer migration to a helper that
lacks them; services/migration/weights.py fills it, ``HostedLayers`` runs it).

Lifecycle: built at the helper's Prepare with the layers the engine holds identically (shared,
never copied) and the others awaited; ``put`` installs each awaited layer once its digest was
verified; ``HostedLayers.run`` refuses to run while ``missing`` is not empty; ``clear`` (the
hosted range released) lets go of every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from services.common.errors import InvalidRequestError
from services.engine.attention import AttentionMetadata
from services.engine.kv_cache import KVCache
from services.engine.models.llama import LlamaForCausalLM


class LayerStack:
    """Decoder layers ``[start, end)`` hosted with weights another worker shipped (layer
    migration to a helper that lacks them), run with the hosting model's rotary tables. Layers
    the engine itself holds identically are shared (``held``), the others ``put`` as they
    arrive; ``weight_bytes`` is what the shipped ones take, reserved when hosting starts."""

    def __init__(
        self, model: LlamaForCausalLM, layers: range, held: dict[int, nn.Module], weight_bytes: int
    ) -> None:
        self.rope = model.rope
        self.range = layers
        self.layers: dict[int, nn.Module] = dict(held)
        self.shipped: set[int] = set(layers) - set(held)
        self.weight_bytes = weight_bytes

    def missing(self) -> list[int]:
        return [i for i in self.range if i not in self.layers]

    def put(self, index: int, layer: nn.Module) -> None:
        if index not in self.shipped or index in self.layers:
            raise InvalidRequestError(f"layer {index} is not awaited here")
        self.layers[index] = layer

    def clear(self) -> None:
        self.layers.clear()

    def forward_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        start: int,
        end: int,
    ) -> torch.Tensor:
        rotary = self.rope(positions, hidden.dtype)
        for index in range(start, end):
            hidden = self.layers[index](hidden, rotary, kv_cache, meta)
        return hidden
