"""The fused float32 CPU kernels (``csrc/fused_ops.cpp``) against the torch ops they replace.

Elementwise ops (``models/fused.py``): RMSNorm, add + RMSNorm in place, SwiGLU's
``silu(gate) * up`` and rotate-half RoPE in place. The causal prefill attention kernel
(``paged_decode.prefill``) against SDPA, and a float64 reference. Then the model with and
without them, and the paths that must not take them (bfloat16 for the elementwise ops, float16,
another device, no kernel). bfloat16 prefill attention takes the kernel, widened to float32.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from services.engine import attention, paged_decode
from services.engine.attention import AttentionMetadata, PrefillSpan
from services.engine.models import fused
from services.engine.models.llama import MLP, RMSNorm
from services.engine.models.rope import apply_rotary
from tests.engine.helpers import GREEDY, LogitsRecorder, assert_no_leaks, make_engine, rel_error

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")

# float32: the kernels differ from torch only in the order of float32 additions.
CLOSE = {"atol": 1e-6, "rtol": 1e-5}
# Row shapes: one row, odd sizes (vector tails), smollm2's hidden size, 3-D, no rows at all.
SHAPES = [(1, 576), (7, 33), (5, 16), (3, 1), (2, 3, 17), (4, 1536), (0, 64)]


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    assert paged_decode.load(), "g++ is here, so the kernels must build"


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def wide_rows(x: torch.Tensor, extra: int = 5) -> torch.Tensor:
    """``x`` as a view whose rows lie ``extra`` floats apart (row stride > size, last stride 1)."""
    wide = torch.full((*x.shape[:-1], x.shape[-1] + extra), float("nan"))
    view = wide[..., : x.shape[-1]]
    view.copy_(x)
    assert view.stride(-2) == x.shape[-1] + extra
    return view


# -- elementwise ops ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_torch(shape):
    x, w = randn(*shape, seed=1), randn(shape[-1], seed=2)
    expected = F.rms_norm(x, (shape[-1],), w, 1e-6)
    for given in (x, wide_rows(x), x.transpose(0, -1).contiguous().transpose(0, -1)):
        got = fused.rms_norm(given, w, 1e-6)
        assert got.shape == x.shape and got.is_contiguous()
        torch.testing.assert_close(got, expected, **CLOSE)


def test_rms_norm_eps_and_tiny_rows():
    """eps dominates an all-zero row (output 0, not NaN) and a row of tiny values."""
    x = torch.stack([torch.zeros(40), torch.full((40,), 1e-20), randn(40, scale=1e4)])
    w = randn(40, seed=3)
    for eps in (1e-6, 1e-5, 0.5):
        got = fused.rms_norm(x, w, eps)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, F.rms_norm(x, (40,), w, eps), **CLOSE)


@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_adds_in_place_and_normalises_the_sum(shape):
    x0, r, w = randn(*shape, seed=4), randn(*shape, seed=5), randn(shape[-1], seed=6)
    for residual in (r, wide_rows(r)):
        x = x0.clone()
        got = fused.add_rms_norm_(x, residual, w, 1e-5)
        assert torch.equal(x, x0 + r)  # one float32 add per element: exact
        assert got.data_ptr() != x.data_ptr() or x.numel() == 0
        torch.testing.assert_close(got, F.rms_norm(x0 + r, (shape[-1],), w, 1e-5), **CLOSE)


def test_add_rms_norm_leaves_the_residual_alone():
    x, r, w = randn(6, 64, seed=7), randn(6, 64, seed=8), randn(64, seed=9)
    before = r.clone()
    fused.add_rms_norm_(x, r, w, 1e-6)
    assert torch.equal(r, before)


@pytest.mark.parametrize("shape", [(1, 2), (3, 34), (5, 32), (2, 3, 18), (4, 3072), (0, 64)])
def test_silu_mul_matches_torch(shape):
    gate_up = randn(*shape, seed=10, scale=4.0)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    for given in (gate_up, wide_rows(gate_up)):
        got = fused.silu_mul(given)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, **CLOSE)


def test_silu_mul_over_the_whole_exponent_range():
    """Large |gate| (exp under- and overflow in a naive form), zero, and values across [-100, 100]."""
    n = 16 * 13 + 5  # vector lanes and a scalar tail
    gate = torch.cat([torch.linspace(-100, 100, n - 5), torch.tensor([0.0, -0.0, -88, -87, 89])])
    up = randn(n, seed=11)
    got = fused.silu_mul(torch.cat([gate, up])[None])[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, F.silu(gate) * up, **CLOSE)


def rotary_tables(n: int, d: int, seed: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    angles = randn(n, 1, d // 2, seed=seed, scale=50.0)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half tables repeat the frequencies
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("d", [2, 18, 32, 64, 128])
@pytest.mark.parametrize("n", [0, 1, 7])
def test_rotary_rotates_the_model_view_in_place(n, d):
    """As the model calls it: q and k heads of the fused qkv rows; v heads stay as they are."""
    heads, kv_heads = 6, 2
    qkv = randn(n, heads + 2 * kv_heads, d, seed=13)
    before = qkv.clone()
    cos, sin = rotary_tables(n, d)
    qk = qkv[:, : heads + kv_heads]
    assert not qk.is_contiguous() or n <= 1
    expected = apply_rotary(before[:, : heads + kv_heads], (cos, sin))
    assert fused.rotary_(qk, cos, sin) is qk
    torch.testing.assert_close(qkv[:, : heads + kv_heads], expected, **CLOSE)
    assert torch.equal(qkv[:, heads + kv_heads :], before[:, heads + kv_heads :])


def test_rotary_refuses_odd_head_sizes():
    with pytest.raises(RuntimeError, match="even"):
        fused.rotary_(randn(2, 3, 5), torch.ones(2, 1, 5), torch.zeros(2, 1, 5))


# -- causal prefill attention ---------------------------------------------------------------


def reference_attention(q, k, v, scale) -> torch.Tensor:
    """float64 causal attention, the last ``n`` of ``ctx`` keys being the queries' own."""
    n, heads, _ = q.shape
    ctx, kv_heads, _ = k.shape
    group = heads // kv_heads
    k64 = k.double().repeat_interleave(group, dim=1).transpose(0, 1)
    v64 = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ k64.transpose(1, 2) * scale
    visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (p @ v64).transpose(0, 1)


def prefill_inputs(n, ctx, heads, kv_heads, d, seed=0, scale=1.0):
    """q as the model passes it (a view of fused qkv rows), k/v as gathered from the cache."""
    qkv = randn(n, heads + 2 * kv_heads, d, seed=seed, scale=scale)
    return (
        qkv[:, :heads],
        randn(ctx, kv_heads, d, seed=seed + 1),
        randn(ctx, kv_heads, d, seed=seed + 2),
    )


def kernel_prefill(q, k, v, scale) -> torch.Tensor:
    assert paged_decode.supports_prefill(q, k)
    out = torch.full_like(q, float("nan"))
    paged_decode.prefill(q, k, v, scale, out)
    return out


# (n, ctx): whole prompts around the 32-row block and 16-key tile sizes, then a chunk or a
# prefix-cache hit (ctx > n), down to one new token after a long context.
LENGTHS = [(1, 1), (2, 2), (16, 16), (31, 31), (32, 32), (33, 33), (100, 100), (300, 300),
           (5, 40), (33, 47), (64, 200), (1, 17), (1, 300)]  # fmt: skip


@pytest.mark.parametrize(("n", "ctx"), LENGTHS)
@pytest.mark.parametrize("group", [1, 3, 4])
def test_prefill_kernel_matches_sdpa_and_float64(n, ctx, group):
    q, k, v = prefill_inputs(n, ctx, heads=2 * group, kv_heads=2, d=64, seed=n + ctx)
    got = kernel_prefill(q, k, v, 0.125)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, 0.125), **CLOSE)
    torch.testing.assert_close(got, attention._prefill_attention(q, k, v, 0.125), **CLOSE)


@pytest.mark.parametrize("d", paged_decode.HEAD_SIZES)
@pytest.mark.parametrize("group", [1, 2, 8])
def test_prefill_kernel_every_head_size(d, group):
    for n, ctx in [(37, 37), (20, 90)]:
        q, k, v = prefill_inputs(n, ctx, heads=group * 3, kv_heads=3, d=d, seed=d + group)
        got = kernel_prefill(q, k, v, d**-0.5)
        torch.testing.assert_close(got.double(), reference_attention(q, k, v, d**-0.5), **CLOSE)


def test_prefill_kernel_large_scores_stay_finite():
    """Scores in the hundreds: a max-subtracted softmax neither overflows nor loses the peak.
    float32 scores that large carry ~3e-5 of rounding, SDPA's as much as the kernel's."""
    q, k, v = prefill_inputs(50, 70, heads=4, kv_heads=2, d=64, scale=60.0)
    reference = reference_attention(q, k, v, 0.125)
    got = kernel_prefill(q, k, v, 0.125)
    assert torch.isfinite(got).all()
    sdpa_error = (attention._prefill_attention(q, k, v, 0.125).double() - reference).abs().max()
    assert (got.double() - reference).abs().max() <= 1.5 * sdpa_error < 1e-4


def test_prefill_kernel_writes_strided_out_and_is_thread_independent():
    """``out`` is a row range of the step's output; splitting the work over threads changes
    which thread computes a block, never its value."""
    q, k, v = prefill_inputs(150, 170, heads=6, kv_heads=2, d=64)
    one = kernel_prefill(q, k, v, 0.125)
    big = torch.zeros(160, 9, 64)
    paged_decode.prefill(q, k, v, 0.125, big[5:155, 1:7])
    assert torch.equal(big[5:155, 1:7], one)
    assert (
        not big[:5].any() and not big[155:].any() and not big[:, 0].any() and not big[:, 7:].any()
    )
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(kernel_prefill(q, k, v, 0.125), one)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("n", "ctx"), [(1, 1), (33, 33), (100, 100), (5, 40), (64, 200)])
def test_bfloat16_prefill_is_the_float32_kernel_on_widened_inputs(n, ctx):
    """bfloat16 q/k/v are widened exactly, the kernel runs in float32, and ``out`` gets one
    rounding: the result is the float32 kernel's on the same (bfloat16) values, rounded, so
    it is at least as close to the float64 reference as torch's bfloat16 flash kernel."""
    q, k, v = (t.bfloat16() for t in prefill_inputs(n, ctx, heads=6, kv_heads=2, d=64, seed=n))
    out = torch.full_like(q, float("nan"))
    paged_decode.prefill(q, k, v, 0.125, out)
    wide = kernel_prefill(q.float(), k.float(), v.float(), 0.125)
    assert out.dtype == torch.bfloat16 and torch.equal(out, wide.bfloat16())
    reference = reference_attention(q.float(), k.float(), v.float(), 0.125)
    sdpa = attention._prefill_attention(q, k, v, 0.125)
    sdpa_error = (sdpa.double() - reference).abs().max()
    assert (out.double() - reference).abs().max() <= sdpa_error + 1e-6


def test_prefill_kernel_with_no_queries():
    q, k, v = prefill_inputs(0, 0, heads=4, kv_heads=2, d=64)
    assert kernel_prefill(q, k, v, 0.125).shape == (0, 4, 64)


@pytest.mark.parametrize(
    ("q_shape", "kv_shape", "match"),
    [
        ((4, 4, 80), (4, 2, 80), "head sizes 32, 64 and 128"),  # refused before any thread runs
        ((5, 4, 64), (4, 2, 64), "ctx >= n"),
        ((4, 5, 64), (4, 2, 64), "multiple of kv_heads"),
    ],
)
def test_prefill_kernel_refuses_bad_shapes(q_shape, kv_shape, match):
    q, k = torch.zeros(q_shape), torch.zeros(kv_shape)
    with pytest.raises(RuntimeError, match=match):
        paged_decode.prefill(q, k, k.clone(), 0.1, torch.empty_like(q))


def test_paged_attention_takes_the_kernel_for_each_prefill_span(monkeypatch):
    """Two sequences in one step, one after a cached prefix, blocks scattered in the cache."""
    block, kv_heads, heads, d = 16, 3, 9, 64
    k_cache, v_cache = (
        randn(12, block, kv_heads, d, seed=20),
        randn(12, block, kv_heads, d, seed=21),
    )
    q = randn(40 + 13, heads, d, seed=22)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long),
        prefills=[
            PrefillSpan(q_start=0, q_len=40, ctx_len=40, block_table=torch.tensor([7, 2, 9])),
            PrefillSpan(q_start=40, q_len=13, ctx_len=45, block_table=torch.tensor([4, 11, 0])),
        ],
    )
    rows: list[int] = []
    prefill = paged_decode.prefill
    monkeypatch.setattr(
        paged_decode, "prefill", lambda q, *a: rows.append(len(q)) or prefill(q, *a)
    )
    got = attention.paged_attention(q, k_cache, v_cache, meta, 0.125)
    assert rows == [40, 13]
    monkeypatch.setattr(paged_decode, "supports_prefill", lambda q, k: False)
    expected = attention.paged_attention(q, k_cache, v_cache, meta, 0.125)
    assert rows == [40, 13]
    torch.testing.assert_close(got, expected, **CLOSE)


# -- who takes the fused path --------------------------------------------------------------


def test_which_dtypes_and_devices_take_the_kernels(monkeypatch):
    x = torch.zeros(2, 64)
    assert fused.supports(x) and paged_decode.supports_prefill(x[None], x[None])
    assert not fused.supports(x.bfloat16()) and not fused.supports(x.half())
    assert not fused.supports(x.to("meta"))
    assert paged_decode.supports_prefill(x[None].bfloat16(), x[None].bfloat16())
    assert not paged_decode.supports_prefill(x[None].half(), x[None].half())
    assert not paged_decode.supports_prefill(x[None].bfloat16(), x[None])  # mixed dtypes
    assert not paged_decode.supports_prefill(x[None].to("meta"), x[None].to("meta"))
    odd = torch.zeros(1, 2, 80)  # a head size the kernel was not compiled for
    assert not paged_decode.supports_prefill(odd, odd)
    monkeypatch.setattr(paged_decode, "_loaded", False)  # g++ missing or the build failed
    assert not fused.supports(x) and not paged_decode.supports_prefill(x[None], x[None])


def refuse(*args, **kwargs):
    raise AssertionError("a fused kernel was called on a path that must not take it")


@pytest.mark.parametrize("reason", ["bfloat16", "no kernel"])
def test_modules_fall_back_to_torch(reason, monkeypatch):
    dtype = torch.bfloat16 if reason == "bfloat16" else torch.float32
    if reason == "no kernel":
        monkeypatch.setattr(paged_decode, "_loaded", False)
    for name in ("rms_norm", "add_rms_norm_", "silu_mul", "rotary_"):
        monkeypatch.setattr(fused, name, refuse)
    norm = RMSNorm(48, 1e-6).to(dtype)
    x = randn(3, 48).to(dtype)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (48,), norm.weight, 1e-6))
    q, k, v = (t.to(dtype) for t in prefill_inputs(20, 20, heads=4, kv_heads=2, d=64))
    # bfloat16 prefill attention widens into the kernel (above); only a missing kernel refuses.
    assert paged_decode.supports_prefill(q, k) == (reason == "bfloat16")
    spec = type("Spec", (), {"hidden_size": 48, "intermediate_size": 40, "mlp_bias": False})
    with torch.no_grad():
        MLP(spec).to(dtype)(x)


PROMPTS = [list(range(7, 7 + n)) for n in (1, 17, 40, 90)]


def generate(tiny_llama) -> tuple[list[list[int]], LogitsRecorder]:
    recorder = LogitsRecorder()
    engine = make_engine(
        tiny_llama, logits_hook=recorder, dtype="float32", max_num_batched_tokens=64
    )
    tokens = [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]
    assert_no_leaks(engine)
    return tokens, recorder


def counted(calls: dict[str, int], name: str, fn):
    def wrapper(*args):
        calls[name] = calls.get(name, 0) + 1
        return fn(*args)

    return wrapper


def test_float32_model_with_and_without_the_fused_kernels(tiny_llama, monkeypatch):
    """Chunked prefill (64-token budget) and decode: same tokens, logits to float32 rounding."""
    calls: dict[str, int] = {}
    for name in ("rms_norm", "add_rms_norm_", "silu_mul", "rotary_"):
        monkeypatch.setattr(fused, name, counted(calls, name, getattr(fused, name)))
    monkeypatch.setattr(paged_decode, "prefill", counted(calls, "prefill", paged_decode.prefill))
    tokens, logits = generate(tiny_llama)
    assert set(calls) == {"rms_norm", "add_rms_norm_", "silu_mul", "rotary_", "prefill"}
    monkeypatch.setattr(fused, "supports", lambda x: False)
    monkeypatch.setattr(paged_decode, "supports_prefill", lambda q, k: False)
    calls.clear()
    reference, reference_logits = generate(tiny_llama)
    assert calls == {}
    assert tokens == reference
    for rid, rows in reference_logits.logits.items():
        assert rel_error(torch.stack(logits.logits[rid]), torch.stack(rows)) < 1e-5


def test_the_fused_ab_benchmark_runs_and_restores_the_kernels(tiny_llama, capsys):
    from bench import engine_fused_ab

    supports, supports_prefill = fused.supports, paged_decode.supports_prefill
    argv = ["--model", str(tiny_llama), "--rounds", "1", "--batches", "3", "--steps", "2"]
    assert engine_fused_ab.main([*argv, "--prompt-len", "40"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["prefill", "decode_b3"]
    assert all("torch/fused" in line for line in lines)
    assert fused.supports is supports and paged_decode.supports_prefill is supports_prefill
