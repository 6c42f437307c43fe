"""A damaged model directory is a ``ModelFormatError`` naming what is wrong, before anything is
allocated for it; a service given one exits 2 with that one line.

Before: a truncated or garbage ``model.safetensors``, a ``config.json`` that is not JSON, or a
missing field ended the CLI and every service in a traceback (exit 1); ``num_hidden_layers``
of 10^9 hung building the model; ``max_position_embeddings`` of 10^9 tried to allocate 256 GB
of rotary tables; a negative ``rms_norm_eps`` or ``rope_theta`` loaded and generated NaNs'
tokens; a non-string ``eos_token`` was carried along and never matched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.errors import ModelFormatError
from services.engine.models.loader import load_model
from services.engine.tokenizer import Tokenizer
from tests.engine.helpers import make_engine


@pytest.fixture
def model(tmp_path, tiny_llama) -> Path:
    path = tmp_path / "model"
    shutil.copytree(tiny_llama, path)
    return path


def edit_config(path: Path, **fields) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in fields.items():
        if value is DELETE:
            del cfg[key]
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


DELETE = object()

CONFIGS = [  # (fields, what the error says)
    (dict(hidden_size=DELETE), "config.json has no hidden_size"),
    (dict(vocab_size=None), "config.json has no vocab_size"),
    (dict(hidden_size="256"), "hidden_size must be an integer"),
    (dict(num_attention_heads=0), "num_attention_heads must be an integer"),
    (dict(num_hidden_layers=True), "num_hidden_layers must be an integer"),
    (dict(intermediate_size=-688), "intermediate_size must be an integer"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (dict(head_dim=None, hidden_size=250), "not a multiple of num_attention_heads"),
    (dict(rms_norm_eps=-1), "rms_norm_eps must be a positive number"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a positive number"),
    (dict(max_position_embeddings=10**9), r"max_position_embeddings must be an integer in \[1"),
    (dict(sliding_window=-3), "sliding_window must be an integer"),
    (dict(eos_token_id="x"), "eos_token_id must be token ids"),
    (dict(eos_token_id=[1, -2]), "eos_token_id must be token ids"),
    (dict(num_hidden_layers=10**9), "num_hidden_layers 1000000000, the checkpoint 4"),
    (dict(num_hidden_layers=3), "num_hidden_layers 3, the checkpoint 4"),
    (dict(vocab_size=10**6), r"embed_tokens.weight: shape \(4096, 256\) != expected \(1000000"),
    (dict(intermediate_size=10**7), r"shape \(256, 688\) != expected \(256, 10000000\)"),
    (dict(rope_parameters={"rope_theta": -5.0}), "non-finite rotary tables"),
    (dict(rope_parameters={"rope_theta": 0}), "non-finite rotary tables"),
    (dict(rope_parameters={"rope_theta": "x"}), "rope parameters .* cannot be used"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 0}), "non-finite rotary tables"),
]


@pytest.mark.parametrize("fields, message", CONFIGS, ids=[m for _, m in CONFIGS])
def test_a_config_the_checkpoint_or_the_engine_cannot_honour_is_refused(model, fields, message):
    edit_config(model, **fields)
    with pytest.raises(ModelFormatError, match=message):
        load_model(model)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:10_000_000]), "not fully covered"),
        (lambda f: f.write_bytes(b"\x07" * 100), "header too large"),
        (lambda f: f.write_bytes(b""), "header too small"),
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_damaged_weights_are_refused_naming_the_directory(model, damage, message):
    damage(model / "model.safetensors")
    with pytest.raises(ModelFormatError, match=f"the weights in {model} cannot be read.*{message}"):
        load_model(model)


@pytest.mark.parametrize(
    "text, message",
    [('{"bad', "is not readable JSON"), ("[1, 2]", "holds list, not a JSON object")],
)
def test_a_config_that_is_not_a_json_object_is_refused(model, text, message):
    (model / "config.json").write_text(text)
    with pytest.raises(ModelFormatError, match=message):
        load_model(model)
    (model / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ModelFormatError, match="is not readable JSON"):
        load_model(model)


@pytest.mark.parametrize(
    "file, text, message",
    [
        ("tokenizer.json", '{"bad', "tokenizer.json is not a tokenizer"),
        ("tokenizer.json", "{}", "tokenizer.json is not a tokenizer"),
        ("tokenizer_config.json", '{"bad', "tokenizer_config.json is not readable JSON"),
        ("tokenizer_config.json", "[]", "holds list, not a JSON object"),
        ("tokenizer_config.json", '{"eos_token": 5}', "eos_token must be a token's text"),
        ("tokenizer_config.json", '{"chat_template": 7}', "chat_template must be a template"),
    ],
)
def test_damaged_tokenizer_files_are_refused(model, file, text, message):
    (model / file).write_text(text)
    with pytest.raises(ModelFormatError, match=message):
        Tokenizer(model)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}{{ m.content ", "does not compile"),
        ("{{ messages | no_such_filter }}", "does not compile"),
        ("{{ 1 / 0 }}", "failed: ZeroDivisionError"),
    ],
)
def test_a_broken_chat_template_fails_as_the_models_fault(model, template, message):
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tokenizer = Tokenizer(model)  # plain prompts still work
    assert tokenizer.encode("hello")
    with pytest.raises(ModelFormatError, match=message):
        tokenizer.encode_chat("hello")


def test_a_list_of_named_chat_templates_uses_the_default_one(model):
    templates = [
        {"name": "tool_use", "template": "tools: {{ messages[0].content }}"},
        {"name": "default", "template": "<{{ messages[0].content }}>"},
    ]
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    tokenizer = Tokenizer(model)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<hi>"


def test_the_prepared_model_still_loads_and_generates(tiny_llama):
    """The checks refuse nothing real: tiny-llama (and, in the architecture tests, Qwen2 and
    Mistral configs written by transformers) load as before."""
    engine = make_engine(tiny_llama)
    assert engine.spec.num_layers == 4


@pytest.mark.integration
@pytest.mark.parametrize("service", ["prefill", "decode"])
def test_a_worker_given_damaged_weights_exits_2_with_one_error_line(model, service):
    (model / "model.safetensors").write_bytes(b"\x07" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--model", str(model),
         "--router", "127.0.0.1:1", "--host", "127.0.0.1", "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"error: the weights in {model} cannot be read" in proc.stderr
