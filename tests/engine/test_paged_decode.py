"""The C++ paged decode kernel against the torch path it replaces (gather + SDPA)."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import pytest
import torch

from services.engine import attention, paged_decode
from services.engine.attention import AttentionMetadata
from tests.engine.helpers import (
    GREEDY,
    LogitsRecorder,
    assert_no_leaks,
    make_engine,
    rel_error,
)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")

BLOCK_SIZE = 16
# Lengths around block boundaries, a single token, and one long sequence.
MIXED_LENGTHS = [1, 2, 15, 16, 17, 31, 32, 33, 48, 100, 300]
# (atol, rtol); bf16: the torch path rounds inside SDPA, the kernel once at the end (~2 ulp)
TOLERANCE = {torch.float32: (1e-5, 0.0), torch.bfloat16: (1e-2, 1e-2)}


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    assert paged_decode.load(), "g++ is here, so the kernel must build"


def decode_inputs(
    lengths: list[int],
    heads: int,
    kv_heads: int,
    head_size: int = 64,
    block_size: int = BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random q and caches; each sequence gets shuffled blocks, the table padded with 0."""
    gen = torch.Generator().manual_seed(seed)
    tables = [-(-n // block_size) for n in lengths]
    num_blocks = sum(tables) + 1
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_size, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_size, generator=gen).to(dtype)
    q = torch.randn(len(lengths), heads, head_size, generator=gen).to(dtype)
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(tables)
    padded = []
    for n in tables:
        padded.append(ids[:n] + [0] * (width - n))
        ids = ids[n:]
    lens = torch.tensor(lengths)
    span = torch.arange(width * block_size)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long),
        prefills=[],
        decode_rows=torch.arange(len(lengths)),
        decode_blocks=torch.tensor(padded).flatten(),
        decode_mask=(span[None, :] < lens[:, None])[:, None, None, :],
        decode_lens=lens,
    )
    return q, k_cache, v_cache, meta


def torch_path(q, k_cache, v_cache, meta, scale, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(paged_decode, "supports", lambda q, k_cache: False)
        return attention._decode_attention(q, k_cache, v_cache, meta, scale)


def kernel_path(q, k_cache, v_cache, meta, scale) -> torch.Tensor:
    assert paged_decode.supports(q, k_cache)
    return attention._decode_attention(q, k_cache, v_cache, meta, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_kernel_matches_torch_path_on_mixed_lengths(dtype, group, monkeypatch):
    q, k, v, meta = decode_inputs(MIXED_LENGTHS, heads=2 * group, kv_heads=2, dtype=dtype)
    expected = torch_path(q, k, v, meta, 0.125, monkeypatch)
    got = kernel_path(q, k, v, meta, 0.125)
    assert got.dtype == dtype and got.shape == q.shape
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("head_size", [32, 128])
@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_other_head_and_block_sizes(head_size, block_size, monkeypatch):
    q, k, v, meta = decode_inputs(
        [1, 7, 8, 9, 40, 70], heads=6, kv_heads=3, head_size=head_size, block_size=block_size
    )
    expected = torch_path(q, k, v, meta, head_size**-0.5, monkeypatch)
    got = kernel_path(q, k, v, meta, head_size**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_large_scores_stay_finite(monkeypatch):
    """A max-subtracted softmax: scores in the hundreds neither overflow nor lose the peak."""
    q, k, v, meta = decode_inputs([5, 33], heads=4, kv_heads=2)
    q = q * 60.0
    expected = torch_path(q, k, v, meta, 0.125, monkeypatch)
    got = kernel_path(q, k, v, meta, 0.125)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_strided_q_and_threads_give_identical_results():
    """The model passes q as a view of its fused qkv rows; threads split the batch."""
    q, k, v, meta = decode_inputs(MIXED_LENGTHS, heads=9, kv_heads=3)
    fused = torch.cat([q, torch.randn(len(MIXED_LENGTHS), 6, 64)], dim=1)
    strided = fused[:, :9]
    assert not strided.is_contiguous()
    one = kernel_path(q, k, v, meta, 0.125)
    assert torch.equal(kernel_path(strided, k, v, meta, 0.125), one)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for lengths in (MIXED_LENGTHS, MIXED_LENGTHS[:1]):  # items: sequences, then kv heads
            n = len(lengths)
            sub = AttentionMetadata(
                slot_mapping=meta.slot_mapping,
                prefills=[],
                decode_rows=torch.arange(n),
                decode_blocks=meta.decode_blocks.view(len(MIXED_LENGTHS), -1)[:n].flatten(),
                decode_mask=meta.decode_mask[:n],
                decode_lens=meta.decode_lens[:n],
            )
            assert torch.equal(kernel_path(q[:n], k, v, sub, 0.125), one[:n])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3])
def test_partial_results_with_lse_merge_like_the_torch_partials(dtype, group, monkeypatch):
    """``decode_partials`` (attention migration: the helper's part and the owner's local part
    of located sequences) through the kernel's ``paged_decode_lse``, and row by row through
    ``partial_attention``: the same partial results, and merged with a second part they give
    the attention over both parts' tokens."""
    q, k_cache, v_cache, meta = decode_inputs(MIXED_LENGTHS, 3 * group, 3, dtype=dtype)
    b = len(MIXED_LENGTHS)
    tables, lens = meta.decode_blocks.view(b, -1), meta.decode_lens
    kernel = attention.decode_partials(q, k_cache, v_cache, tables, lens, 0.125)
    with monkeypatch.context() as m:
        m.setattr(paged_decode, "supports", lambda q, k_cache: False)
        torch_parts = attention.decode_partials(q, k_cache, v_cache, tables, lens, 0.125)
    assert torch_parts.denom.max() > 1.0  # the torch path really is unnormalised
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(kernel.normalized(), torch_parts.normalized(), atol=atol, rtol=rtol)
    lse = torch_parts.max + torch_parts.denom.log()
    torch.testing.assert_close(kernel.max, lse, atol=1e-4, rtol=1e-5)
    # A second part: every sequence's same tokens again. Merged, the output is unchanged (the
    # same keys twice) and the log-sum-exp grows by exactly log 2.
    merged = attention.merge_partials([kernel, torch_parts])
    torch.testing.assert_close(merged.normalized(), torch_parts.normalized(), atol=atol, rtol=rtol)
    merged_lse = merged.max + merged.denom.log()
    torch.testing.assert_close(merged_lse, lse + torch.log(torch.tensor(2.0)), atol=1e-4, rtol=0)
    parts = attention.split_partials(kernel, [1] * b)
    assert [p.out.shape[0] for p in parts] == [1] * b
    assert torch.equal(attention.concat_partials(parts).out, kernel.out)


def test_lse_output_of_the_wrong_shape_is_refused():
    q, k_cache, v_cache, meta = decode_inputs([5, 9], 4, 2)
    tables = meta.decode_blocks.view(2, -1)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.banaserve.paged_decode_lse(
            q, k_cache, v_cache, tables, meta.decode_lens, 0.1, torch.empty_like(q),
            torch.empty(2, 3),
        )  # fmt: skip


def test_lengths_from_the_mask_when_metadata_has_none():
    q, k, v, meta = decode_inputs(MIXED_LENGTHS, heads=4, kv_heads=2)
    expected = kernel_path(q, k, v, meta, 0.125)
    meta.decode_lens = None
    assert torch.equal(kernel_path(q, k, v, meta, 0.125), expected)


@pytest.mark.parametrize(
    ("lens", "block", "match"),
    [
        ([0, 5], None, "context length 0"),
        ([5, 40], None, "context length 40"),
        ([5, 5], 99, "block id 99"),
    ],
)
def test_bad_tables_are_refused_not_read(lens, block, match):
    q, k, v, meta = decode_inputs([5, 20], heads=4, kv_heads=2)
    tables = meta.decode_blocks.view(2, -1).clone()
    if block is not None:
        tables[1, 0] = block
    with pytest.raises(RuntimeError, match=match):
        paged_decode.decode(q, k, v, tables, torch.tensor(lens), 0.125)


def test_unbuildable_kernel_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(paged_decode, "_loaded", None)
    monkeypatch.setattr(paged_decode, "kernel_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(paged_decode, "compile_command", lambda src, out: ["false", str(out)])
    q, k, v, meta = decode_inputs([3, 17], heads=4, kv_heads=2)
    with caplog.at_level(logging.WARNING, logger=paged_decode.__name__):
        assert not paged_decode.supports(q, k)
        assert not paged_decode.load()  # tried once per process
    assert [r.message.split(":")[0] for r in caplog.records] == [
        "paged decode kernel unavailable, using the torch path"
    ]
    got = attention._decode_attention(q, k, v, meta, 0.125)
    monkeypatch.setattr(paged_decode, "_loaded", True)
    torch.testing.assert_close(got, kernel_path(q, k, v, meta, 0.125), atol=1e-5, rtol=0)
    assert list(tmp_path.iterdir()) == [tmp_path / ".lock"]  # no half-written library


def test_the_build_is_reused_not_redone():
    """The module fixture built (or found) the library; asking again compiles nothing."""
    cache_dir = paged_decode.kernel_cache_dir()
    path = paged_decode.library_path(cache_dir)
    built_at = path.stat().st_mtime_ns
    assert paged_decode.build(cache_dir) == path
    assert path.stat().st_mtime_ns == built_at


PROMPTS = [list(range(5, 5 + n)) for n in (1, 9, 15, 16, 30, 47)]  # decodes cross blocks
PARAMS = dataclasses.replace(GREEDY, max_tokens=20)


def generate(tiny_llama, dtype: str) -> tuple[list[list[int]], LogitsRecorder]:
    recorder = LogitsRecorder()
    engine = make_engine(
        tiny_llama,
        logits_hook=recorder,
        dtype=dtype,
        block_size=BLOCK_SIZE,
        enable_prefix_caching=False,
    )
    tokens = [c.token_ids for c in engine.generate(PROMPTS, PARAMS)]
    assert_no_leaks(engine)
    assert [len(t) for t in tokens] == [20] * len(PROMPTS)
    return tokens, recorder


def test_greedy_float32_generation_is_token_identical_to_the_torch_path(tiny_llama, monkeypatch):
    calls: list[int] = []
    decode = paged_decode.decode

    def counted(q, *args):
        calls.append(q.shape[0])
        return decode(q, *args)

    monkeypatch.setattr(paged_decode, "decode", counted)
    with_kernel, _ = generate(tiny_llama, "float32")
    # Every layer (4) of every step: the 1-token prompt's prefill is a decode row too,
    # then 19 decode steps of all 6 sequences.
    assert calls == [1] * 4 + [len(PROMPTS)] * 4 * 19
    monkeypatch.setattr(paged_decode, "supports", lambda q, k_cache: False)
    calls.clear()
    assert generate(tiny_llama, "float32")[0] == with_kernel
    assert calls == []


def test_greedy_bfloat16_differs_from_the_torch_path_only_at_rounding_ties(tiny_llama, monkeypatch):
    """bf16 rounds at different places in the two paths, and tiny-llama's random weights
    give near-tied logits: while two runs agree on the tokens so far, the logits must
    agree to bf16 precision, and a token may differ only where the top two were tied."""
    with_kernel, kernel_logits = generate(tiny_llama, "bfloat16")
    monkeypatch.setattr(paged_decode, "supports", lambda q, k_cache: False)
    reference, torch_logits = generate(tiny_llama, "bfloat16")
    for ours, theirs, rid in zip(with_kernel, reference, kernel_logits.logits, strict=True):
        for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            got, expected = kernel_logits.logits[rid][step], torch_logits.logits[rid][step]
            assert rel_error(got, expected) < 0.05
            if a != b:
                top2 = expected.topk(2).values
                assert float(top2[0] - top2[1]) < 0.05 * float(expected.abs().max())
                break


def test_the_engine_loads_the_kernels_when_created_not_at_its_first_step(tiny_llama, monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(paged_decode, "load", lambda: calls.append(True) or True)
    engine = make_engine(tiny_llama)  # float32: no linear asks for the kernels
    assert calls == [True]
    assert_no_leaks(engine)
