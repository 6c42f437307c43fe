"""Load a Hugging Face model directory (config.json + one or sharded safetensors).

Hugging Face stores q/k/v and gate/up as separate matrices; they are written
into the fused parameters here, so the checkpoint stays in its standard layout.
The model fingerprint hashes the config, every weight byte and the dtype, so
two checkpoints with the same shapes never share cached KV.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from services.common.errors import ModelFormatError
from services.common.model_files import read_json_object
from services.engine.models.llama import DecoderLayer, LlamaForCausalLM, ModelSpec
from services.engine.models.packed_linear import pack_linears, packing_supported
from services.engine.models.rope import RotaryEmbedding

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {  # HF name -> (fused param, index of the part)
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    spec: ModelSpec
    fingerprint: str
    path: Path


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFormatError(f"{path} has no config.json")
    return read_json_object(config_file)


@contextmanager
def _checkpoint_errors(path: Path) -> Iterator[None]:
    """A damaged or unreadable weights file as a ``ModelFormatError`` naming it."""
    try:
        yield
    except (SafetensorError, OSError) as exc:
        raise ModelFormatError(f"the weights in {path} cannot be read: {exc}") from None


def _checkpoint_layers(path: Path) -> int:
    """How many decoder layers the checkpoint holds (its tensor names' indices)."""
    indices = set()
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            indices.update(int(m.group(1)) for m in map(_LAYER.match, f.keys()) if m)
    if indices != set(range(len(indices))):
        raise ModelFormatError(f"the checkpoint in {path} skips decoder layers: {sorted(indices)}")
    return len(indices)


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path} has no *.safetensors weights")
    return files


def fingerprint(path: Path, dtype: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update((path / "config.json").read_bytes())
    for file in weight_files(path):
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    h.update(dtype.encode())
    return h.hexdigest()


def _num_parts(param: str) -> int:
    return 3 if ".qkv_proj." in param else 2 if ".gate_up_proj." in param else 1


def _part_slice(spec: ModelSpec, param: str, part: int) -> tuple[int, int]:
    """(offset, size) of part ``part`` of a fused parameter."""
    if ".qkv_proj." in param:
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        return [(0, q), (q, kv), (q + kv, kv)][part]
    return part * spec.intermediate_size, spec.intermediate_size


def _target(name: str, spec: ModelSpec) -> tuple[str, int | None] | None:
    """Our parameter name for a checkpoint tensor, with the fused part index; None to skip."""
    if name == "lm_head.weight":
        return None if spec.tie_word_embeddings else (name, None)
    if name.endswith("rotary_emb.inv_freq"):
        return None
    m = _LAYER.match(name)
    if m:
        module, _, kind = m.group(2).rpartition(".")
        if module in _FUSED:
            fused, part = _FUSED[module]
            return f"layers.{m.group(1)}.{fused}.{kind}", part
        return f"layers.{m.group(1)}.{m.group(2)}", None
    if name.startswith("model."):
        return name.removeprefix("model."), None
    raise ModelFormatError(f"unexpected tensor {name!r} in checkpoint")


def _load_weights(
    params: dict[str, torch.Tensor],
    path: Path,
    spec: ModelSpec,
    partial: bool = False,
    shapes_only: bool = False,
) -> None:
    """Fill ``params`` from the checkpoint; ``partial``: skip tensors for other parameters.
    ``shapes_only``: check every shape and that nothing is missing, copy nothing (``params``
    may be on the meta device: a config that disagrees with its checkpoint is refused before
    memory is allocated for it)."""
    pending = {name: _num_parts(name) for name in params}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                target = _target(name, spec)
                if target is None or (partial and target[0] not in params):
                    continue
                if shapes_only:
                    _slot(params, target, tuple(f.get_slice(name).get_shape()), spec, name)
                else:
                    tensor = f.get_tensor(name)
                    _slot(params, target, tuple(tensor.shape), spec, name).copy_(tensor)
                pending[target[0]] -= 1
    missing = [n for n, left in pending.items() if left > 0]
    if missing:
        raise ModelFormatError(f"checkpoint in {path} lacks {', '.join(sorted(missing)[:5])}")


def _slot(
    params: dict,
    target: tuple[str, int | None],
    shape: tuple[int, ...],
    spec: ModelSpec,
    source: str,
) -> torch.Tensor:
    """The part of a parameter that checkpoint tensor ``source`` fills, once its shape fits."""
    name, part = target
    if name not in params:
        raise ModelFormatError(f"checkpoint tensor {source!r} matches no parameter")
    param = params[name].data
    if part is not None:
        param = param.narrow(0, *_part_slice(spec, name, part))
    if tuple(param.shape) != shape:
        raise ModelFormatError(f"{source}: shape {shape} != expected {tuple(param.shape)}")
    return param


def load_model(
    path: Path,
    dtype: str = "float32",
    device: str = "cpu",
    max_position: int | None = None,
    num_layers: int | None = None,
) -> LoadedModel:
    """The model; ``num_layers``: only decoder layers ``[0, num_layers)`` are loaded, the
    others are ``DroppedLayer``s (the fingerprint is still the whole checkpoint's)."""
    if dtype not in DTYPES:
        raise ModelFormatError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    spec = ModelSpec.from_config(read_config(path))
    max_position = max_position or spec.max_position_embeddings
    partial = num_layers is not None and num_layers < spec.num_layers
    with _checkpoint_errors(path):
        held = _checkpoint_layers(path)
        if held != spec.num_layers:
            raise ModelFormatError(
                f"{path}: config.json has num_hidden_layers {spec.num_layers}, the checkpoint "
                f"{held} decoder layers"
            )
        with torch.device("meta"):
            model = LlamaForCausalLM(spec, max_position)
            if partial:
                model.drop_layers(range(num_layers, spec.num_layers))  # type: ignore[arg-type]
            if spec.tie_word_embeddings:
                model.lm_head.weight = model.embed_tokens.weight
        _load_weights(dict(model.named_parameters()), path, spec, partial, shapes_only=True)
        model = model.to_empty(device=device).to(DTYPES[dtype])
        model.rope = RotaryEmbedding(spec.rope, spec.head_dim, max_position).to(device)
        if spec.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        with torch.no_grad():
            _load_weights(dict(model.named_parameters()), path, spec, partial)
    model.eval().requires_grad_(False)
    if packing_supported(DTYPES[dtype], torch.device(device)):
        pack_linears(model)
    return LoadedModel(model, spec, fingerprint(path, dtype), path)


def load_layers(
    path: Path, spec: ModelSpec, dtype: str, device: str, layers: range
) -> dict[int, DecoderLayer]:
    """Decoder ``layers`` alone, from the checkpoint (a donor taking its layers back)."""
    with torch.device("meta"):
        holder = nn.ModuleDict({str(i): DecoderLayer(spec, i) for i in layers})
    holder = holder.to_empty(device=device).to(DTYPES[dtype])
    params = {f"layers.{name}": p for name, p in holder.named_parameters()}
    with torch.no_grad(), _checkpoint_errors(path):
        _load_weights(params, path, spec, partial=True)
    holder.eval().requires_grad_(False)
    if packing_supported(DTYPES[dtype], torch.device(device)):
        pack_linears(holder)
    return {i: holder[str(i)] for i in layers}  # type: ignore[misc]
