"""The C++ small-batch matmul (csrc/small_gemm.cpp) behind bfloat16 ``PackedLinear``s."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from services.engine import paged_decode
from services.engine.models import packed_linear
from services.engine.models.packed_linear import PackedLinear, pack_weight
from services.migration.records import layer_digest

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")

# rows: 1 (decode), odd blocks, 16/64 (decode batches), 200 (several row chunks: a prefill)
ROWS = [1, 3, 13, 16, 64, 200]
# (in, out): the model's shapes, an output count that is no multiple of 32, a tiny one
SHAPES = [(64, 96), (96, 70), (8, 1)]


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    assert paged_decode.load(), "g++ is here, so the kernels must build"


def small_ints(*shape: int, seed: int) -> torch.Tensor:
    """Integers in [-4, 4]: every product and partial sum is exact in float32."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=gen).float()


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.new_empty(x.shape[0], weight.shape[0])
    no_bias = x.new_empty(0)
    torch.ops.banaserve.small_gemm(x, pack_weight(weight), no_bias if bias is None else bias, out)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_exact_sums_equal_the_reference_bit_for_bit(dtype, rows, k, n, with_bias):
    x = small_ints(rows, k, seed=rows).to(dtype)
    w = small_ints(n, k, seed=k).to(dtype)
    b = small_ints(n, seed=n).to(dtype) if with_bias else None
    expected = x.double() @ w.double().T + (0 if b is None else b.double())
    # One rounding, at the end: the exact sum rounded to the output dtype.
    assert torch.equal(gemm(x, w, b), expected.to(dtype))


def test_sums_round_once_to_nearest_even():
    # 1 + 2^-8 + 2^-9 lies between the bfloat16s 1 and 1 + 2^-7, above their midpoint:
    # float32 sums rounded once give 1 + 2^-7; bfloat16 partial sums (1 + 2^-8 is a tie,
    # rounded to even: 1) would give 1.
    x = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.bfloat16)
    w = torch.tensor([[1.0, 2.0**-8, 2.0**-9]], dtype=torch.bfloat16)
    assert gemm(x, w, None).item() == 1.0 + 2.0**-7


def test_random_values_agree_with_onednn_to_bfloat16_precision():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(576, 960, bias=True).to(torch.bfloat16)
    x = torch.randn(16, 576, generator=gen).to(torch.bfloat16)
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    got = gemm(x, linear.weight.detach(), linear.bias.detach()).double()
    # float32 accumulation in another order, then one rounding: within one bf16 ulp
    assert torch.all((got - exact).abs() <= exact.abs() * 2.0**-8 + 1e-3)


def test_strided_rows_are_read_in_place():
    x = small_ints(5, 40, seed=1).to(torch.bfloat16)
    w = small_ints(33, 32, seed=2).to(torch.bfloat16)
    assert torch.equal(gemm(x[:, :32], w, None), gemm(x[:, :32].contiguous(), w, None))


@pytest.mark.parametrize(
    ("x_shape", "packed_shape", "out_shape", "match"),
    [
        ((4, 32), (1, 16, 32), (4, 32), "packed must be"),
        ((4, 32), (2, 32, 32), (4, 32), "out must be"),
        ((4, 32), (1, 32, 32), (3, 32), "out must be"),
    ],
)
def test_mismatched_shapes_are_refused(x_shape, packed_shape, out_shape, match):
    x, packed = torch.zeros(x_shape), torch.zeros(packed_shape)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.banaserve.small_gemm(x, packed, x.new_empty(0), torch.zeros(out_shape))


def test_packed_linear_takes_the_kernel_for_bfloat16_without_native_bf16(monkeypatch):
    monkeypatch.setattr(packed_linear, "native_bf16", lambda: False)
    linear = nn.Linear(64, 70, bias=False).to(torch.bfloat16)
    layer = PackedLinear(linear)
    assert layer.kernel
    assert layer.packed.shape == (3, 64, 32)  # 70 outputs padded to 96, same dtype
    x = small_ints(2, 3, 64, seed=3).to(torch.bfloat16)  # any leading shape
    expected = (x.double() @ linear.weight.double().T).to(torch.bfloat16)
    assert torch.equal(layer(x), expected)


def test_packed_linear_keeps_onednn_where_bf16_is_native_or_float32(monkeypatch):
    monkeypatch.setattr(packed_linear, "native_bf16", lambda: True)
    assert not PackedLinear(nn.Linear(64, 64).to(torch.bfloat16)).kernel
    monkeypatch.setattr(packed_linear, "native_bf16", lambda: False)
    assert not PackedLinear(nn.Linear(64, 64)).kernel


def test_a_kernel_layer_digests_like_a_onednn_one(monkeypatch):
    """Migration compares layer digests across workers, whichever path each one packs for."""
    linear = nn.Linear(64, 70, bias=False).to(torch.bfloat16)
    monkeypatch.setattr(packed_linear, "native_bf16", lambda: False)
    ours = PackedLinear(linear)
    monkeypatch.setattr(packed_linear, "native_bf16", lambda: True)
    onednn = PackedLinear(linear)
    assert ours.kernel and not onednn.kernel
    assert torch.equal(ours.state_dict()["packed"], linear.weight)
    assert layer_digest(ours) == layer_digest(onednn)


def test_onednn_row_counts_past_decode_batches_take_a_bounded_set_of_sizes():
    """oneDNN keeps memory per row count it meets (packed_linear.py): past EXACT_ROWS a call
    is padded to one of ROW_STEPS_PER_OCTAVE sizes per power of two, at most 1/16 more rows."""
    sizes = {m: packed_linear.padded_rows(m) for m in range(1, 8193)}
    assert all(sizes[m] == m for m in range(1, packed_linear.EXACT_ROWS + 1))
    assert all(m <= p <= m * (1 + 1 / packed_linear.ROW_STEPS_PER_OCTAVE) for m, p in sizes.items())
    assert (sizes[65], sizes[100], sizes[1000], sizes[1024], sizes[1025]) == (
        68,
        100,
        1024,
        1024,
        1088,
    )
    octaves = (8192).bit_length() - packed_linear.EXACT_ROWS.bit_length()
    assert len(set(sizes.values())) <= packed_linear.EXACT_ROWS + 16 * octaves + 1
    assert all(packed_linear.padded_rows(p) == p for p in sizes.values())  # stable


@pytest.mark.parametrize("shape", [(3, 64), (2, 50, 64), (130, 64), (1, 1000, 64)])
def test_a_padded_onednn_call_gives_the_rows_asked_for(shape):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = PackedLinear(linear)
    assert not layer.kernel  # float32: oneDNN
    x = torch.randn(*shape)
    out = layer(x)
    assert out.shape == (*shape[:-1], 48)
    torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-5)
