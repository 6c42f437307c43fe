"""The engine against Hugging Face transformers on the same weights, float32.

Logits within 1e-4 relative error and greedy outputs token-identical.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.types import SamplingParams
from tests.engine.helpers import (
    GREEDY,
    LogitsRecorder,
    assert_no_leaks,
    hf_greedy,
    hf_logits,
    make_engine,
    rel_error,
)

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 4000, (n,), generator=g).tolist()


def check_all_sampled_logits(engine, recorder, hf_model, completions):
    """Every sampled position's logits vs one HF forward over the final sequence."""
    for c in completions:
        full = c.prompt_token_ids + c.token_ids
        ref = hf_logits(hf_model, full[:-1])[len(c.prompt_token_ids) - 1 :]
        got = torch.stack(recorder.logits[c.request_id])
        assert got.shape == ref.shape
        assert rel_error(got, ref) < TOLERANCE


def test_prefill_logits(tiny_llama, hf_tiny):
    rec = LogitsRecorder()
    engine = make_engine(tiny_llama, logits_hook=rec)
    [c] = engine.generate([prompt_ids(100, 0)], SamplingParams(temperature=0, max_tokens=1))
    ref = hf_logits(hf_tiny, c.prompt_token_ids)[-1]
    assert rel_error(rec.logits[c.request_id][0], ref) < TOLERANCE
    assert_no_leaks(engine)


def test_chunked_prefill_logits(tiny_llama, hf_tiny):
    rec = LogitsRecorder()
    engine = make_engine(tiny_llama, logits_hook=rec, max_num_batched_tokens=16)
    prompts = [prompt_ids(70, 1), prompt_ids(23, 2)]
    completions = engine.generate(prompts, GREEDY)
    check_all_sampled_logits(engine, rec, hf_tiny, completions)
    assert_no_leaks(engine)


def test_batched_decode_of_mixed_lengths(tiny_llama, hf_tiny):
    rec = LogitsRecorder()
    engine = make_engine(tiny_llama, logits_hook=rec)
    prompts = [prompt_ids(n, 10 + n) for n in (1, 5, 16, 17, 33, 64, 130)]
    completions = engine.generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    check_all_sampled_logits(engine, rec, hf_tiny, completions)
    assert [len(c.token_ids) for c in completions] == [12] * 7
    assert_no_leaks(engine)


def test_prefix_cache_hit_logits(tiny_llama, hf_tiny):
    rec = LogitsRecorder()
    engine = make_engine(tiny_llama, logits_hook=rec)
    shared = prompt_ids(48, 3)
    [first] = engine.generate([shared + prompt_ids(7, 4)], GREEDY)
    [second] = engine.generate([shared + prompt_ids(9, 5)], GREEDY)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 48
    check_all_sampled_logits(engine, rec, hf_tiny, [first, second])
    assert_no_leaks(engine)


def test_greedy_64_tokens_identical(tiny_llama, hf_tiny):
    engine = make_engine(tiny_llama)
    texts = ["Return the value of", "class Foo:\n    def", "The module provides a way to"]
    completions = engine.generate(
        texts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    )
    for c in completions:
        assert c.token_ids == hf_greedy(hf_tiny, c.prompt_token_ids, 64)
    assert len({tuple(c.token_ids) for c in completions}) == 3
    assert_no_leaks(engine)


def test_preemption_does_not_change_greedy_output(tiny_llama):
    prompts = [prompt_ids(n, 20 + n) for n in (30, 40, 50, 60)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = make_engine(tiny_llama).generate(prompts, params)
    tight = make_engine(tiny_llama, num_kv_blocks=12, enable_prefix_caching=False)
    squeezed = tight.generate(prompts, params)
    assert [c.token_ids for c in squeezed] == [c.token_ids for c in roomy]
    assert_no_leaks(tight)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2):
    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    engine = make_engine(smollm2)
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
    ]
    completions = engine.generate(
        questions, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), chat=True
    )
    for c in completions:
        assert c.token_ids == hf_greedy(hf, c.prompt_token_ids, 64)
    assert_no_leaks(engine)


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    engine = make_engine(smollm2)
    [c] = engine.generate(
        ["What is the capital of France?"], SamplingParams(temperature=0, max_tokens=32), chat=True
    )
    assert c.text == "The capital of France is Paris."
