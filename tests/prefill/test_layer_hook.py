"""The engine's per-layer hook: KV exported while a step runs is exactly the step's result."""

from __future__ import annotations

import pytest
import torch

from services.common.types import SamplingParams
from tests.engine.helpers import assert_no_leaks, make_engine

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 4000, (n,), generator=g).tolist()


class LayerExports:
    """A layer hook that exports every layer of one request, plus the next layer (not yet
    computed) so the test can tell the hook really runs between layers."""

    def __init__(self, engine, request_id):
        self.engine, self.request_id = engine, request_id
        self.layers, self.next_layer, self.sampling = {}, {}, []

    def __call__(self, layer, ctx):
        self.sampling.append(ctx.sampling)
        self.layers[layer] = self.engine.export_kv(self.request_id, layer)
        if layer + 1 < self.engine.spec.num_layers:
            self.next_layer[layer + 1] = self.engine.export_kv(self.request_id, layer + 1)[0]


@pytest.mark.parametrize(
    ("num_tokens", "cached_prefix", "chunk"),
    [(37, 0, None), (32, 0, None), (53, 32, None), (70, 0, 48)],
    ids=["partial-block", "full-blocks", "after-prefix-hit", "last-chunk"],
)
def test_exports_during_the_step_equal_exports_after_it(
    tiny_llama, num_tokens, cached_prefix, chunk
):
    overrides = {"max_num_batched_tokens": chunk} if chunk else {}
    engine = make_engine(tiny_llama, **overrides)
    prompt = prompt_ids(num_tokens, 7)
    if cached_prefix:
        engine.generate([prompt[:cached_prefix] + [9]], GREEDY)  # leaves the prefix cached
    engine.add_request("s", prompt, GREEDY)
    if chunk:
        assert engine.step() == []  # the first chunk samples nothing
    hook = LayerExports(engine, "s")
    (out,) = engine.step(on_layer_done=hook)
    assert out.request_id == "s" and not out.finished
    num_layers = engine.spec.num_layers
    assert sorted(hook.layers) == list(range(num_layers))
    assert hook.sampling == [("s",)] * num_layers
    seq = engine._seq("s")
    assert seq.num_computed_tokens == num_tokens
    assert seq.num_cached_tokens == cached_prefix
    for layer in range(num_layers):
        during, during_layout = hook.layers[layer]
        after, after_layout = engine.export_kv("s", layer)
        assert during_layout == after_layout, layer
        assert during_layout.num_tokens == num_tokens
        assert during_layout.block_hashes == tuple(seq.block_hashes)
        assert torch.equal(during, after), layer
        if layer > 0:  # when layer l-1 was done, layer l's new KV was not written yet
            assert not torch.equal(hook.next_layer[layer], after), layer
    engine.abort("s")
    assert engine.stats()["num_cached_blocks"] == num_tokens // 16
    assert_no_leaks(engine)


def test_step_without_hook_is_unchanged_and_export_outside_a_step_uses_computed_tokens(
    tiny_llama,
):
    a, b = make_engine(tiny_llama), make_engine(tiny_llama)
    prompt = prompt_ids(40, 8)
    a.add_request("s", prompt, GREEDY)
    b.add_request("s", prompt, GREEDY)
    assert a.step() == b.step(on_layer_done=lambda layer, ctx: None)
    assert a.kv_layout("s", 0) == b.kv_layout("s", 0)
    assert a.kv_layout("s", 0).num_tokens == 40
    a.abort("s")
    b.abort("s")
    assert_no_leaks(a)
    assert_no_leaks(b)
