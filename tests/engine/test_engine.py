"""Engine behaviour: sampling options, stop conditions, aborts, validation, leaks."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import (
    ConfigError,
    InvalidRequestError,
    ModelNotFoundError,
    OutOfRangeError,
    RequestNotFoundError,
)
from services.common.types import FinishReason, SamplingParams
from tests.engine.helpers import assert_no_leaks, make_engine


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama)


@pytest.fixture(autouse=True)
def no_leaks_after(request):
    yield
    if "engine" in request.fixturenames:
        assert_no_leaks(request.getfixturevalue("engine"))


PROMPT = "Return the value of"


def greedy(max_tokens=16, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_max_tokens_and_length_finish(engine):
    [c] = engine.generate([PROMPT], greedy(5))
    assert len(c.token_ids) == 5 and c.finish_reason is FinishReason.LENGTH


def test_stop_token_id_ends_generation_and_is_kept(engine):
    [ref] = engine.generate([PROMPT], greedy(16))
    stop = ref.token_ids[3]
    [c] = engine.generate([PROMPT], greedy(16, stop_token_ids=(stop,)))
    first = ref.token_ids.index(stop)
    assert c.token_ids == ref.token_ids[: first + 1]
    assert c.finish_reason is FinishReason.STOP


def test_eos_stops_unless_ignored(engine):
    assert engine.tokenizer.eos_token_id in engine.eos_token_ids
    [ref] = engine.generate([PROMPT], greedy(8))
    eos = ref.token_ids[2]  # let the model's 3rd greedy token play EOS
    first = ref.token_ids.index(eos)
    saved, engine.eos_token_ids = engine.eos_token_ids, frozenset({eos})
    try:
        [stopped] = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8))
        [ignored] = engine.generate([PROMPT], greedy(8))
    finally:
        engine.eos_token_ids = saved
    assert stopped.token_ids == ref.token_ids[: first + 1]
    assert stopped.finish_reason is FinishReason.STOP
    assert ignored.token_ids == ref.token_ids and ignored.finish_reason is FinishReason.LENGTH


def test_stop_string_truncates_text(engine):
    [ref] = engine.generate([PROMPT], greedy(24))
    text = ref.text
    stop = text[10:14]
    assert stop and stop in text
    [c] = engine.generate([PROMPT], greedy(24, stop=(stop,)))
    assert c.finish_reason is FinishReason.STOP
    assert c.text == text[: text.find(stop)]


def test_streamed_text_equals_decoded_tokens(engine):
    outs = list(engine.stream(PROMPT, greedy(32), request_id="s"))
    tokens = [t for o in outs for t in o.new_token_ids]
    assert "".join(o.text_delta for o in outs) == engine.tokenizer.decode(tokens)
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=20, ignore_eos=True)
    a = engine.generate([PROMPT], p)[0].token_ids
    b = engine.generate([PROMPT, "unrelated prompt"], p)[0].token_ids  # batch does not matter
    c = engine.generate(
        [PROMPT], SamplingParams(temperature=1.0, seed=8, max_tokens=20, ignore_eos=True)
    )[0].token_ids
    assert a == b
    assert a != c


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    [ref] = engine.generate([PROMPT], greedy(12))
    k1 = SamplingParams(temperature=0.8, top_k=1, max_tokens=12, ignore_eos=True)
    p0 = SamplingParams(temperature=0.8, top_p=1e-6, max_tokens=12, ignore_eos=True)
    assert engine.generate([PROMPT], k1)[0].token_ids == ref.token_ids
    assert engine.generate([PROMPT], p0)[0].token_ids == ref.token_ids


def test_abort_frees_blocks_mid_generation(engine):
    engine.add_request("x", PROMPT * 20, greedy(100))
    engine.step()
    engine.step()
    assert engine.stats()["num_free_blocks"] < engine.stats()["num_blocks"]
    out = engine.abort("x")
    assert out.finished and out.finish_reason is FinishReason.ABORT
    with pytest.raises(RequestNotFoundError):
        engine.abort("x")


def test_abandoned_stream_is_aborted(engine):
    stream = engine.stream(PROMPT, greedy(50), request_id="gone")
    next(stream)
    stream.close()
    assert not engine.has_unfinished_requests


@pytest.mark.parametrize(
    ("prompt", "error", "match"),
    [
        ("", InvalidRequestError, "empty"),
        ([], InvalidRequestError, "empty"),
        ([1, 99999], InvalidRequestError, "outside the vocabulary"),
        ([5] * 5000, OutOfRangeError, "at most 2047 prompt tokens"),
    ],
)
def test_bad_prompts_are_rejected_clearly(engine, prompt, error, match):
    with pytest.raises(error, match=match):
        engine.add_request("bad", prompt, greedy())


def test_duplicate_request_id_is_rejected(engine):
    engine.add_request("dup", PROMPT, greedy())
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("dup", PROMPT, greedy())
    engine.abort("dup")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**kwargs)


def test_unknown_model_and_bad_config(tiny_llama):
    with pytest.raises(ModelNotFoundError, match="tiny-llama"):
        make_engine("no-such-model")
    with pytest.raises(ConfigError, match="exceeds the model's limit"):
        make_engine(tiny_llama, max_model_len=100_000)
    with pytest.raises(ConfigError, match="exceeds the KV pool"):
        make_engine(tiny_llama, num_kv_blocks=4, max_model_len=100)
    with pytest.raises(ConfigError, match="dtype"):
        make_engine(tiny_llama, dtype="float8")


def test_context_limit_finishes_with_length(tiny_llama):
    small = make_engine(tiny_llama, max_model_len=40)
    [c] = small.generate([list(range(5, 35))], greedy(100))
    assert len(c.token_ids) == 10 and c.finish_reason is FinishReason.LENGTH
    assert_no_leaks(small)


def test_chat_template_prompt(engine):
    ids = engine.encode("Hi", chat=True)
    text = engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == "<|bos|><|user|>Hi<|eos|><|assistant|>"


def test_bfloat16_engine_runs_and_mostly_agrees_with_float32(tiny_llama):
    f32 = make_engine(tiny_llama).generate([PROMPT], greedy(8))[0].token_ids
    bf16_engine = make_engine(tiny_llama, dtype="bfloat16")
    assert bf16_engine.kv_cache.dtype == torch.bfloat16
    bf16 = bf16_engine.generate([PROMPT], greedy(8))[0].token_ids
    assert bf16[:2] == f32[:2]  # reduced precision may diverge later, not at once
    assert_no_leaks(bf16_engine)


def test_detokenize_off_gives_the_same_tokens_and_no_text(engine):
    [ref] = engine.generate([PROMPT], greedy(10))
    [c] = engine.generate([PROMPT], greedy(10, detokenize=False))
    assert c.token_ids == ref.token_ids and ref.text and c.text == ""
    with pytest.raises(InvalidRequestError, match="detokenize"):
        SamplingParams(stop=("x",), detokenize=False)
