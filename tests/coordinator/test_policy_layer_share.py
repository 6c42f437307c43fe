"""``python -m services.coordinator.layer_share``: the per-layer share of a decode step, measured
on the in-process engine (tiny-llama), and nothing left in the engine afterwards."""

from __future__ import annotations

from services.coordinator.layer_share import LayerShare, measure
from tests.engine.helpers import make_engine


def test_layer_share_is_measured_on_decode_steps(tiny_llama):
    engine = make_engine(tiny_llama)
    hooks_before = [len(layer._forward_hooks) for layer in engine.model.layers]
    got = measure(engine, batch=2, prompt_tokens=8, steps=4)
    assert (got.num_layers, got.batch) == (4, 2)
    # The decoder layers take most of a step but not all of it (embedding, LM head, sampling).
    assert 0.3 < got.share * got.num_layers < 1.0
    assert got.step_s > 0
    assert engine.scheduler.num_unfinished == 0 and not engine.requests.active
    assert [len(layer._forward_hooks) for layer in engine.model.layers] == hooks_before
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]  # every block back (cached ones too)


def test_describe():
    text = LayerShare(0.2, 0.004, 4, 8).describe()
    assert text == "layer_share 0.2000 (4 layers: 80.0% of a 4.00 ms decode step at batch 8)"
