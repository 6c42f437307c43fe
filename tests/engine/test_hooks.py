"""The three execution hooks migration is built on (DESIGN.md §3)."""

from __future__ import annotations

import random

import pytest
import torch

from services.common.errors import InvalidRequestError, OutOfRangeError
from services.common.types import SamplingParams
from services.engine.attention import merge_partials
from tests.engine.helpers import assert_no_leaks, make_engine


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 4000, (n,), generator=g).tolist()


def test_layer_ranges_compose_to_the_full_forward(tiny_llama):
    engine = make_engine(tiny_llama)
    engine.add_request("a", prompt_ids(40, 0), SamplingParams(temperature=0, max_tokens=4))
    engine.add_request("b", prompt_ids(9, 1), SamplingParams(temperature=0, max_tokens=4))
    engine.step()  # both prefilled; the next batch is two decodes over cached KV
    inputs = engine.runner.prepare(engine.scheduler.schedule())
    model, kv = engine.model, engine.kv_cache
    with torch.inference_mode():
        full = model(inputs.input_ids, inputs.positions, kv, inputs.meta)
        for k in range(model.num_layers + 1):
            hidden = model.embed(inputs.input_ids)
            hidden = model.forward_layers(hidden, inputs.positions, kv, inputs.meta, 0, k)
            hidden = model.forward_layers(hidden, inputs.positions, kv, inputs.meta, k)
            assert torch.equal(hidden, full), f"split at layer {k}"
    with pytest.raises(ValueError, match="outside"):
        model.forward_layers(full, inputs.positions, kv, inputs.meta, 2, 1)


# Partial attention runs in float32; the reference in float64.
def dense_attention(q, k, v, scale):
    """Textbook softmax attention with K/V heads repeated for GQA (the reference)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())


def test_partial_attention_over_random_block_splits_merges_exactly(tiny_llama):
    engine = make_engine(tiny_llama)
    engine.add_request("s", prompt_ids(75, 2), SamplingParams(temperature=0, max_tokens=3))
    engine.step()
    seq = engine._seq("s")
    num_blocks, ctx = seq.num_blocks, seq.num_computed_tokens
    assert (num_blocks, ctx) == (5, 75)
    spec = engine.spec
    q = torch.randn(1, spec.num_heads, spec.head_dim, generator=torch.Generator().manual_seed(0))
    q_pos = torch.tensor([ctx - 1])
    layer = 2
    k_all, v_all = (t[seq.block_table].flatten(0, 1)[:ctx] for t in engine.kv_cache.layer(layer))
    reference = dense_attention(q, k_all, v_all, spec.head_dim**-0.5)
    whole = engine.partial_attention("s", layer, q, q_pos, list(range(num_blocks)))
    assert torch.allclose(whole.normalized().double(), reference, rtol=1e-5, atol=1e-5)
    rng = random.Random(0)
    for _ in range(10):
        blocks = list(range(num_blocks))
        rng.shuffle(blocks)
        cuts = sorted(rng.sample(range(1, num_blocks), rng.randint(1, num_blocks - 1)))
        parts = [blocks[a:b] for a, b in zip([0, *cuts], [*cuts, num_blocks], strict=True)]
        merged = merge_partials([engine.partial_attention("s", layer, q, q_pos, p) for p in parts])
        assert torch.allclose(merged.normalized().double(), reference, rtol=1e-5, atol=1e-5), parts
    engine.abort("s")
    assert_no_leaks(engine)


def test_partial_attention_respects_causality_for_prefill_queries(tiny_llama):
    engine = make_engine(tiny_llama)
    engine.add_request("s", prompt_ids(40, 3), SamplingParams(temperature=0, max_tokens=3))
    engine.step()
    spec = engine.spec
    q = torch.randn(3, spec.num_heads, spec.head_dim, generator=torch.Generator().manual_seed(1))
    q_pos = torch.tensor([0, 15, 39])
    k_all, v_all = (
        t[engine._seq("s").block_table].flatten(0, 1)[:40] for t in engine.kv_cache.layer(0)
    )
    parts = [engine.partial_attention("s", 0, q, q_pos, [b]) for b in (2, 0, 1)]
    assert (
        torch.isinf(parts[0].max[0]).all() and (parts[0].denom[0] == 0).all()
    )  # pos 0 sees no block 2
    merged = merge_partials(parts).normalized().double()
    for i, p in enumerate(q_pos.tolist()):
        ref = dense_attention(q[i : i + 1], k_all[: p + 1], v_all[: p + 1], spec.head_dim**-0.5)
        assert torch.allclose(merged[i : i + 1], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidRequestError, match="block index"):
        engine.partial_attention("s", 0, q, q_pos, [3])
    engine.abort("s")
    assert_no_leaks(engine)


def continue_decoding(engine, request_id, steps):
    tokens = []
    for _ in range(steps):
        tokens += [t for o in engine.step() if o.request_id == request_id for t in o.new_token_ids]
    return tokens


@pytest.mark.parametrize("decoded_before_export", [1, 6])
def test_export_every_layer_import_and_continue_is_token_identical(
    tiny_llama, decoded_before_export
):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    a, b = make_engine(tiny_llama), make_engine(tiny_llama)
    a.add_request("s", prompt_ids(37, 4), params)
    for _ in range(decoded_before_export):
        a.step()
    seq = a._seq("s")
    b.begin_import("s", list(seq.token_ids), seq.num_prompt_tokens, seq.num_computed_tokens, params)
    for layer in range(a.spec.num_layers):
        data, layout = a.export_kv("s", layer)
        assert layout.num_tokens == seq.num_computed_tokens
        assert layout.block_hashes == tuple(seq.block_hashes)
        assert data.shape == (2, seq.blocks_needed(layout.num_tokens), 16, 2, 64)
        b.import_kv("s", data, layout)
    b.finish_import("s")
    assert b._seq("s").block_hashes == seq.block_hashes  # B derives the same block identities
    remaining = params.max_tokens - seq.num_output_tokens
    assert continue_decoding(b, "s", remaining) == continue_decoding(a, "s", remaining)
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_import_rejects_mismatched_kv(tiny_llama):
    params = SamplingParams(temperature=0, max_tokens=5)
    a, b = make_engine(tiny_llama), make_engine(tiny_llama, dtype="bfloat16")
    a.add_request("s", prompt_ids(20, 5), params)
    a.step()
    seq = a._seq("s")
    b.begin_import("s", list(seq.token_ids), seq.num_prompt_tokens, seq.num_computed_tokens, params)
    data, layout = a.export_kv("s", 0)
    with pytest.raises(InvalidRequestError, match="different model or dtype"):
        b.import_kv("s", data, layout)
    with pytest.raises(InvalidRequestError, match="num_kv_tokens"):
        b.begin_import("t", [1, 2, 3], 3, 3, params)
    b.abort("s")
    a.abort("s")
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_prompt_import_accepts_the_longest_prompt_a_prefill_worker_accepts(tiny_llama):
    engine = make_engine(tiny_llama, max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    longest = list(range(5, 68))  # 63 tokens: max_model_len - 1
    engine.check_prompt(longest)  # what a prefill worker checks
    engine.begin_prompt_import("r", longest, params)
    out = engine.finish_prompt_import("r", 7)
    # The first token fills the context: the request ends there, as a local prefill would.
    assert (out.new_token_ids, out.finished, out.finish_reason.value) == ([7], True, "length")
    with pytest.raises(OutOfRangeError, match="at most 63 prompt tokens"):
        engine.begin_prompt_import("s", [*longest, 9], params)
    assert_no_leaks(engine)
