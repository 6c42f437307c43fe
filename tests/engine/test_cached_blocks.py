"""A store write-back reads a prompt's blocks back from the prefix cache (Engine.read_cached_blocks):
the bytes a hand-off exported, in the kvstore wire layout, or nothing at all."""

from __future__ import annotations

import torch

from services.common import kv_wire
from services.common.hashing import block_hashes
from services.common.types import SamplingParams
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.prefill.helpers import prompt_ids

ONE = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


def prefilled(model):
    """An engine that prefilled a 100-token prompt (6 full blocks) and dropped it, its blocks
    left in the prefix cache, with each layer's KV as the hand-off exported it."""
    engine = make_engine(model)
    prompt = prompt_ids(100, 5)
    engine.add_request("r", prompt, ONE)
    engine.step()
    exported = [engine.export_kv("r", layer)[0] for layer in range(engine.spec.num_layers)]
    engine.abort("r")
    bs = engine.config.block_size
    hashes = block_hashes(prompt[: 6 * bs], bs, engine.fingerprint)
    blocks = [(h, tuple(prompt[i * bs : (i + 1) * bs])) for i, h in enumerate(hashes)]
    return engine, blocks, exported


def outs_for(engine, groups, fill: float = 7.0) -> list[torch.Tensor]:
    spec, kv = engine.spec, engine.kv_cache
    shape = (spec.num_layers, 2, engine.config.block_size, kv.num_kv_heads, kv.head_dim)
    return [torch.full((shape[0], len(g), *shape[1:]), fill, dtype=kv.dtype) for g in groups]


def wire(out: torch.Tensor) -> bytes:
    return out.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_cached_blocks_are_read_back_as_the_hand_off_exported_them(tiny_llama):
    engine, blocks, exported = prefilled(tiny_llama)
    groups = [[0, 2, 4], [1, 3, 5]]  # two store nodes' shares
    outs = outs_for(engine, groups)
    assert engine.read_cached_blocks([[blocks[i] for i in g] for g in groups], outs)
    for group, out in zip(groups, outs, strict=True):
        assert wire(out) == kv_wire.encode_layers(exported, group).tobytes()
    assert_no_leaks(engine)


def test_blocks_gone_from_the_cache_are_not_read_at_all(tiny_llama):
    engine, blocks, _ = prefilled(tiny_llama)
    wrong = (blocks[3][0], (1,) * len(blocks[3][1]))  # same hash, other tokens: never served
    for name, case in (
        ("a block with other tokens", [blocks[:3], [wrong, *blocks[4:]]]),
        ("a block never cached", [blocks[:3], [(bytes(16), blocks[3][1])]]),
    ):
        outs = outs_for(engine, case)
        assert not engine.read_cached_blocks(case, outs), name
        assert all(bool((out == 7.0).all()) for out in outs), f"{name}: nothing written"
    engine.block_manager.cache_paused = True  # some layers run elsewhere: KV not all here
    assert not engine.read_cached_blocks([blocks], outs_for(engine, [blocks]))
    engine.block_manager.cache_paused = False
    assert engine.block_manager.drop_cached() == 6  # evicted
    assert not engine.read_cached_blocks([blocks], outs_for(engine, [blocks]))
    assert_no_leaks(engine)
