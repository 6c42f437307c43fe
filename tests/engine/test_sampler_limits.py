"""Issue 8, item 1: no sampling value a client can send breaks a step.

``SamplingParams`` rejects what no request may ask (non-finite floats, negatives, integers
outside their proto type); everything it accepts samples without error, the extremes included.
"""

from __future__ import annotations

import math

import pytest
import torch

from services.common.errors import InvalidRequestError
from services.common.types import MAX_INT32, MAX_UINT32, MAX_UINT64, MIN_TEMPERATURE, SamplingParams
from services.engine.sampler import Sampler

VOCAB = 32
TINY = 5e-324  # the smallest positive double (subnormal)


def logits(rows: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 8


def sample(params: SamplingParams, row: torch.Tensor, index: int = 0) -> int:
    (token,) = Sampler()(row, [params], [index])
    return token


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=1e-300),
        dict(temperature=TINY),
        dict(temperature=MIN_TEMPERATURE / 2),
        dict(temperature=1.0, top_p=1e-300),
        dict(temperature=1.0, top_p=TINY),
        dict(temperature=1e-300, top_p=1e-300, top_k=1),
    ],
    ids=["t-1e-300", "t-subnormal", "t-below-floor", "p-1e-300", "p-subnormal", "all-tiny"],
)
def test_vanishing_temperature_or_top_p_samples_the_top_token(kwargs):
    row = logits()
    top = int(row.argmax())
    # The same token every time, seeded or not: the distribution is one-hot.
    assert {sample(SamplingParams(**kwargs, seed=s), row) for s in (None, 1, 2, 3)} == {top}


@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, 1e-3, 1e300, 1.7976931348623157e308])
def test_extreme_temperatures_draw_a_token_of_the_vocabulary(temperature):
    row = logits(seed=1)
    tokens = [sample(SamplingParams(temperature=temperature, seed=s), row) for s in range(40)]
    assert all(0 <= t < VOCAB for t in tokens)
    if temperature > 1e100:  # flattened to uniform: many different tokens
        assert len(set(tokens)) > 10


def test_top_k_past_the_vocabulary_is_no_cut():
    row = logits(seed=2)
    wide = SamplingParams(temperature=1.0, top_k=MAX_INT32, seed=7)
    assert sample(wide, row) == sample(SamplingParams(temperature=1.0, seed=7), row)


def test_max_subtraction_keeps_seeded_draws_unchanged_for_ordinary_values():
    """Scaling ``logits - max`` changes nothing a caller can see: the probabilities are the
    same (softmax is shift-invariant), so the seeded draws equal the naive computation's."""
    row = logits(rows=1, seed=3)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=11)
    got = [sample(params, row, index) for index in range(50)]
    naive = []
    for index in range(50):
        scaled = row[0] / 0.7
        kth = torch.topk(scaled, 20).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        g = torch.Generator().manual_seed((11 * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= 0.9
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        naive.append(int(torch.multinomial(scaled.softmax(-1), 1, generator=g).item()))
    assert got == naive


def test_non_finite_logits_take_the_greedy_token_instead_of_failing_the_step():
    rows = logits(rows=3, seed=4)
    rows[0, 5] = float("nan")
    rows[1, 9] = float("inf")
    rows[2] = float("-inf")
    params = [SamplingParams(temperature=1.0, seed=1)] * 3
    assert Sampler()(rows, params, [0, 0, 0]) == rows.max(dim=-1).indices.tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=math.nan), "temperature must be >= 0 and finite, got nan"),
        (dict(temperature=math.inf), "temperature must be >= 0 and finite, got inf"),
        (dict(temperature=-math.inf), "temperature must be >= 0 and finite, got -inf"),
        (dict(temperature=-TINY), "temperature must be >= 0 and finite, got -5e-324"),
        (dict(top_p=math.nan), "top_p must be in (0, 1], got nan"),
        (dict(top_p=math.inf), "top_p must be in (0, 1], got inf"),
        (dict(top_p=-0.0), "top_p must be in (0, 1], got -0.0"),
        (dict(top_p=1 + 1e-15), "top_p must be in (0, 1], got 1.000000000000001"),
        (dict(top_k=-1), f"top_k must be in [0, {MAX_INT32}], got -1"),
        (dict(top_k=MAX_INT32 + 1), f"top_k must be in [0, {MAX_INT32}], got {MAX_INT32 + 1}"),
        (dict(max_tokens=0), "max_tokens must be > 0, got 0"),
        (dict(max_tokens=MAX_INT32 + 1), f"max_tokens must be <= {MAX_INT32}, got 2147483648"),
        (dict(seed=-1), f"seed must be in [0, {MAX_UINT64}], got -1"),
        (dict(seed=MAX_UINT64 + 1), f"seed must be in [0, {MAX_UINT64}], got {MAX_UINT64 + 1}"),
        (dict(stop_token_ids=(MAX_UINT32 + 1,)), f"stop_token_ids must be in [0, {MAX_UINT32}]"),
    ],
)
def test_values_no_request_may_ask_are_rejected(kwargs, message):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert str(err.value) == message


def test_the_edges_of_every_range_are_accepted_and_sample():
    row = logits(seed=5)
    params = SamplingParams(
        temperature=-0.0,  # greedy
        top_k=MAX_INT32,
        top_p=TINY,
        seed=MAX_UINT64,
        max_tokens=MAX_INT32,
        stop_token_ids=(0, MAX_UINT32),
    )
    assert params.greedy
    assert sample(params, row) == int(row.argmax())
    seeded = SamplingParams(temperature=1.0, seed=MAX_UINT64)
    assert 0 <= sample(seeded, row, index=MAX_INT32) < VOCAB
