"""Llama-family variants against transformers: RoPE scaling types, Qwen2 biases, Mistral.

Each case builds a small random checkpoint with transformers itself, saves it in
Hugging Face layout next to tiny-llama's tokenizer, and compares logits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from services.common.errors import ModelFormatError
from services.common.types import SamplingParams
from services.engine.models.rope import rope_parameters
from tests.engine.helpers import LogitsRecorder, assert_no_leaks, hf_logits, make_engine, rel_error

SMALL = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
    tie_word_embeddings=False,
)
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    },
    "yarn": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "rope_theta": 10000.0,
    },
}


def build(tmp_path, tiny_llama, config_cls, model_cls, shard_size="5GB", **extra):
    torch.manual_seed(0)
    model = model_cls(config_cls(**SMALL, **extra)).eval()
    out = tmp_path / "model"
    model.save_pretrained(out, safe_serialization=True, max_shard_size=shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, out / name)
    return model, out


def compare(model_dir, hf_model):
    rec = LogitsRecorder()
    engine = make_engine(model_dir, logits_hook=rec)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 4000, (n,), generator=g).tolist() for n in (7, 150)]
    completions = engine.generate(
        prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    )
    for c in completions:
        full = c.prompt_token_ids + c.token_ids
        ref = hf_logits(hf_model, full[:-1])[len(c.prompt_token_ids) - 1 :]
        assert rel_error(torch.stack(rec.logits[c.request_id]), ref) < 1e-4
    assert_no_leaks(engine)


@pytest.mark.parametrize("rope", list(ROPES))
def test_llama_rope_variants(tmp_path, tiny_llama, rope):
    hf, path = build(
        tmp_path,
        tiny_llama,
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        rope_parameters=ROPES[rope],
    )
    compare(path, hf)


def test_old_style_rope_scaling_config_is_read_the_same():
    new = {"rope_parameters": dict(ROPES["llama3"])}
    old_scaling = {k: v for k, v in ROPES["llama3"].items() if k != "rope_theta"}
    old = {
        "rope_theta": 500000.0,
        "rope_scaling": {**old_scaling, "type": old_scaling.pop("rope_type")},
    }
    assert rope_parameters(old) == {**rope_parameters(new), "type": "llama3"}


def test_unsupported_rope_type_is_refused():
    with pytest.raises(ModelFormatError, match="dynamic"):
        rope_parameters({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})


def test_qwen2_with_qkv_bias(tmp_path, tiny_llama):
    hf, path = build(tmp_path, tiny_llama, transformers.Qwen2Config, transformers.Qwen2ForCausalLM)
    assert any("q_proj.bias" in n for n, _ in hf.named_parameters())
    compare(path, hf)


def test_mistral(tmp_path, tiny_llama):
    hf, path = build(
        tmp_path,
        tiny_llama,
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        sliding_window=None,
    )
    compare(path, hf)


def test_unsupported_architecture_is_refused(tmp_path, tiny_llama):
    _, path = build(tmp_path, tiny_llama, transformers.LlamaConfig, transformers.LlamaForCausalLM)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="GPT2LMHeadModel"):
        make_engine(path)


def test_sharded_checkpoint(tmp_path, tiny_llama):
    hf, path = build(
        tmp_path,
        tiny_llama,
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        shard_size="500KB",
    )
    assert len(list(path.glob("*.safetensors"))) > 3
    compare(path, hf)
