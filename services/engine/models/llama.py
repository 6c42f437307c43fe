"""Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral, SmolLM2).

RMSNorm, RoPE, grouped-query attention over the paged KV cache, SwiGLU MLP,
optionally tied embeddings. Q/K/V and gate/up projections are fused into one
matmul each at load time.

The forward pass is split in three so a model can run in stages on different
workers (DESIGN.md §3, hook 1): ``embed`` -> ``forward_layers(start, end)`` (any
contiguous range, hidden states in and out) -> ``compute_logits``.

``layer_steps`` is ``forward_layers`` as a generator that yields, at each layer whose batch has
located sequences (attention migration), once their helpers have the layer's queries and the
local parts are computed, before it waits for the helpers' parts: a caller running two
micro-batches resumes the other one there, so one half's round trip overlaps the other half's
layer (services/engine/model_runner.py). ``forward_layers`` runs it through without a pause.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.common.errors import ModelFormatError
from services.common.model_files import DEFAULT_MAX_POSITIONS, declared_sliding_window
from services.engine.attention import AttentionMetadata, paged_attention, write_kv
from services.engine.kv_cache import KVCache
from services.engine.models import fused
from services.engine.models.rope import RotaryEmbedding, RotaryTables, apply_rotary, rope_parameters
from services.engine.tokenizer import config_eos_token_ids

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
# The most positions a model may have: its rotary tables are computed for every one at load
# (2 × positions × head_dim floats: 1 GiB at head_dim 64). 2^21 is past every context length of
# the supported families (Qwen2.5-1M's 1,010,000 included).
MAX_POSITIONS = 1 << 21
# Any other size of a config (layers, heads, widths, vocabulary): past every model that fits
# in memory; the checkpoint's tensors bound them further, before anything is allocated.
MAX_SIZE = 1 << 31

# Called with a layer's index once that layer has run (its KV is written), before the next one.
OnLayerDone = Callable[[int], None]
# Yields None where a located layer's helper parts are away; returns the hidden states.
LayerSteps = Generator[None, None, torch.Tensor]


def run_through(steps: LayerSteps) -> torch.Tensor:
    """A ``LayerSteps`` to its end, with no pause: its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ModelSpec:
    """The parts of a Hugging Face config.json this implementation uses."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    rope: dict[str, Any]
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        """The spec of a config.json; a field missing, of the wrong type or out of range is a
        ``ModelFormatError`` naming it (not a KeyError or a tensor of nonsense sizes later)."""
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(
                f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelFormatError(f"hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
        hidden, heads = _size(cfg, "hidden_size"), _size(cfg, "num_attention_heads")
        kv_heads = _size(cfg, "num_key_value_heads", heads)
        if heads % kv_heads:
            raise ModelFormatError(
                f"config.json: num_attention_heads ({heads}) is not a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        if not cfg.get("head_dim") and hidden % heads:
            raise ModelFormatError(
                f"config.json: hidden_size ({hidden}) is not a multiple of num_attention_heads "
                f"({heads}), and no head_dim is given"
            )
        eps = cfg.get("rms_norm_eps", 1e-6)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < math.inf:
            raise ModelFormatError(
                f"config.json: rms_norm_eps must be a positive number, got {eps!r}"
            )
        window = declared_sliding_window(cfg)
        eos = config_eos_token_ids(cfg.get("eos_token_id"))
        for name, ids in (("bos_token_id", (cfg.get("bos_token_id"),)), ("eos_token_id", eos)):
            if any(i is not None and not _is_count(i, 0) for i in ids):
                raise ModelFormatError(f"config.json: {name} must be token ids, got {ids!r}")
        return cls(
            architecture=arch,
            vocab_size=_size(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_size(cfg, "intermediate_size"),
            num_layers=_size(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=_size(cfg, "head_dim", hidden // heads),
            rms_norm_eps=eps,
            max_position_embeddings=_size(
                cfg, "max_position_embeddings", DEFAULT_MAX_POSITIONS, MAX_POSITIONS
            ),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            mlp_bias=cfg.get("mlp_bias", False),
            rope=rope_parameters(cfg),
            sliding_window=None if window is None else _size(cfg, "sliding_window"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
        )


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _size(cfg: dict[str, Any], key: str, default: int | None = None, most: int = MAX_SIZE) -> int:
    """A config.json size: a positive integer (``default`` where it is absent or null)."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise ModelFormatError(f"config.json has no {key}")
        return default
    if not _is_count(value, 1) or value > most:
        raise ModelFormatError(
            f"config.json: {key} must be an integer in [1, {most:,}], got {value!r}"
        )
    return value


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 on the CPU: one pass (models/fused.py). Otherwise torch's op, accumulating in
        # float32 for half types; Hugging Face rounds to the half type once more before
        # scaling, which differs only in bfloat16's last bit.
        if fused.supports(x):
            return fused.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size = spec.num_heads * spec.head_dim
        qkv_size = self.q_size + 2 * spec.num_kv_heads * spec.head_dim
        self.qkv_proj = nn.Linear(spec.hidden_size, qkv_size, bias=spec.attention_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=False)
        self.scale = spec.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, rotary: RotaryTables, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        return run_through(self.steps(x, rotary, kv_cache, meta))

    def steps(
        self, x: torch.Tensor, rotary: RotaryTables, kv_cache: KVCache, meta: AttentionMetadata
    ) -> LayerSteps:
        n = x.shape[0]
        heads = self.num_heads + 2 * self.num_kv_heads
        qkv = self.qkv_proj(x).view(n, heads, self.head_dim)
        # q and k heads are adjacent: rotate them in one pass (in place, if fused).
        qk = qkv[:, : self.num_heads + self.num_kv_heads]
        qk = fused.rotary_(qk, *rotary) if fused.supports(qk) else apply_rotary(qk, rotary)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.num_heads + self.num_kv_heads :]
        k_cache, v_cache = kv_cache.layer(self.layer)
        write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        located = meta.located
        if located is not None:  # the helper's part travels while the others attend
            located.submit(self.layer, q)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale)
        if located is not None:
            located.attend_local(self.layer, q, k_cache, v_cache, self.scale)
            yield  # the helpers' parts are still away: another micro-batch may compute
            located.merge(self.layer, o)
        return self.o_proj(o.reshape(n, self.q_size))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(
            spec.hidden_size, 2 * spec.intermediate_size, bias=spec.mlp_bias
        )
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fused.supports(gate_up):
            return self.down_proj(fused.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryTables,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self._residual_mlp(
            x, self.self_attn(self.input_layernorm(x), rotary, kv_cache, meta)
        )

    def steps(
        self,
        x: torch.Tensor,
        rotary: RotaryTables,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> LayerSteps:
        """``forward``, pausing where its located attention waits (``layer_steps``)."""
        attended = yield from self.self_attn.steps(self.input_layernorm(x), rotary, kv_cache, meta)
        return self._residual_mlp(x, attended)

    def _residual_mlp(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        norm = self.post_attention_layernorm
        if not fused.supports(x):
            x = x + attended
            return x + self.mlp(norm(x))
        # attended (o_proj's fresh output) becomes x + attended in place, in the norm's pass.
        normed = fused.add_rms_norm_(attended, x, norm.weight, norm.eps)
        return self.mlp(normed).add_(attended)


class DroppedLayer(nn.Module):
    """Stands in for a decoder layer whose weights left this worker (layer migration)."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: object) -> torch.Tensor:
        raise RuntimeError(f"layer {self.layer} is not held here: its weights were dropped")


class LlamaForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, max_position: int) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(spec.rope, spec.head_dim, max_position)

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    def holds_layer(self, index: int) -> bool:
        return not isinstance(self.layers[index], DroppedLayer)

    def drop_layers(self, layers: range) -> None:
        """Free the weights of ``layers``; running them raises until they are put back."""
        for index in layers:
            self.layers[index] = DroppedLayer(index)

    def put_layers(self, layers: dict[int, nn.Module]) -> None:
        """Install decoder layers (loaded again, or received from another worker)."""
        for index, layer in layers.items():
            self.layers[index] = layer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        start: int = 0,
        end: int | None = None,
        on_layer_done: OnLayerDone | None = None,
        before_layer: OnLayerDone | None = None,
    ) -> torch.Tensor:
        """Run decoder layers ``[start, end)`` on ``hidden`` and return the new hidden states.

        ``on_layer_done(i)`` runs after layer ``i`` has written its KV and before layer ``i + 1``
        starts, so layer ``i``'s KV can leave while the rest computes (DESIGN.md §4 step 3).
        ``before_layer(i)`` runs before layer ``i`` reads the cache, so KV arriving from
        elsewhere (a prefix fetch) need only be there by then.
        """
        steps = self.layer_steps(
            hidden, positions, kv_cache, meta, start, end, on_layer_done, before_layer, False
        )
        return run_through(steps)

    def layer_steps(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        start: int = 0,
        end: int | None = None,
        on_layer_done: OnLayerDone | None = None,
        before_layer: OnLayerDone | None = None,
        pause: bool = True,
    ) -> LayerSteps:
        """``forward_layers``, pausing at each layer's located attention (module docstring)
        if ``pause``; a layer that does not pause runs as a module call (its hooks fire)."""
        end = self.num_layers if end is None else end
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) outside [0, {self.num_layers})")
        rotary = self.rope(positions, hidden.dtype)  # once per call, shared by every layer
        pausing = pause and meta.located is not None
        for index in range(start, end):
            if before_layer is not None:
                before_layer(index)
            layer = self.layers[index]
            if pausing and isinstance(layer, DecoderLayer):
                hidden = yield from layer.steps(hidden, rotary, kv_cache, meta)
            else:
                hidden = layer(hidden, rotary, kv_cache, meta)
            if on_layer_done is not None:
                on_layer_done(index)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        on_layer_done: OnLayerDone | None = None,
        before_layer: OnLayerDone | None = None,
    ) -> torch.Tensor:
        return self.forward_layers(
            self.embed(input_ids),
            positions,
            kv_cache,
            meta,
            on_layer_done=on_layer_done,
            before_layer=before_layer,
        )
