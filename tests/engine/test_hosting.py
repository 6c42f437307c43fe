"""Hosting for another engine: layer ranges run on its hidden states, blocks it attends over,
KV copied by token range (a delta after a copy), and leases that end what nobody renews."""

from __future__ import annotations

import pytest
import torch

from services.common.config import EngineConfig
from services.common.errors import InvalidRequestError, ResourceExhaustedError
from services.common.types import SamplingParams
from services.engine import paged_decode
from services.engine.engine import Engine
from services.engine.hosting import HostedLayers
from services.engine.ports import AttentionQuery, PortError, StageSeq, StageWork
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine

PARAMS = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pair(tiny_llama):
    clock = Clock()
    a = make_engine(tiny_llama, num_kv_blocks=64)
    b = Engine(EngineConfig(model=str(tiny_llama), num_kv_blocks=64), clock=clock)
    return a, b, clock


def test_export_of_a_token_range_starts_at_its_block(tiny_llama):
    a = make_engine(tiny_llama, num_kv_blocks=64)
    a.add_request("s", prompt_ids(70, 1), PARAMS)
    a.step()
    seq = a._seq("s")
    whole, layout = a.export_kv("s", 2)
    delta, tail = a.export_kv("s", 2, start_token=37)
    assert (layout.first_block, layout.num_blocks, layout.num_tokens) == (0, 5, 70)
    assert (tail.first_block, tail.num_blocks, tail.num_tokens) == (2, 3, 70)
    assert tail.block_hashes == tuple(seq.block_hashes[2:4])
    assert torch.equal(delta, whole[:, 2:])
    _, head = a.export_kv("s", 2, 0, 32)
    assert (head.num_blocks, head.block_hashes) == (2, tuple(seq.block_hashes[:2]))
    with pytest.raises(InvalidRequestError, match=r"tokens \[0, 71\) of 70"):
        a.export_kv("s", 2, 0, 71)
    a.abort("s")
    assert_no_leaks(a)


def split_step(engine, k: int):
    """Run ``engine``'s next step by hand (no commit): hidden states after layer k and after
    the last layer."""
    batch = engine.scheduler.schedule()
    inputs = engine.runner.prepare(batch)
    model, kv, meta = engine.model, engine.kv_cache, inputs.meta
    with torch.inference_mode():
        mid = model.forward_layers(model.embed(inputs.input_ids), inputs.positions, kv, meta, 0, k)
        end = model.forward_layers(mid, inputs.positions, kv, meta, k)
    return mid, end, batch


def test_hosted_layers_after_a_copy_and_a_delta_compute_what_the_owner_would(pair):
    a, b, clock = pair
    a.add_request("s", prompt_ids(45, 2), PARAMS)
    a.step()
    hosted = b.migration.host_layers("A", 2, 4, 16, a.fingerprint)
    for layer in (2, 3):  # the copy ...
        hosted.import_kv("s", *a.export_kv("s", layer))
    for _ in range(20):
        a.step()
    held, done = hosted.num_tokens("s"), a._seq("s").num_computed_tokens
    assert (held, done) == (45, 65)
    for layer in (2, 3):  # ... and the delta written meanwhile
        hosted.import_kv("s", *a.export_kv("s", layer, start_token=held))
    assert hosted.num_tokens("s") == 65
    mid, expected, batch = split_step(a, 2)
    work = StageWork(2, 4, mid, (StageSeq("s", 65, 1),))
    assert torch.allclose(hosted.run(work), expected, rtol=0, atol=1e-5)
    assert hosted.num_tokens("s") == 66
    # a retry of the same step rewinds and computes the same again
    assert torch.allclose(hosted.run(work), expected, rtol=0, atol=1e-5)
    with pytest.raises(PortError, match="holds 66 tokens of it, work starts at 70") as error:
        hosted.run(StageWork(2, 4, mid, (StageSeq("s", 70, 1),)))
    assert error.value.request_ids == ("s",)
    with pytest.raises(PortError, match=r"layers \[1, 4\) asked"):
        hosted.run(StageWork(1, 4, mid, (StageSeq("s", 65, 1),)))
    for seq in batch.seqs:  # undo the hand-made schedule's allocation
        a.abort(seq.request_id)
    b.migration.release_hosted_layers("A")
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_a_token_delta_moves_only_the_tokens_past_what_the_helper_holds(pair):
    """``export_tokens`` packs token ranges of many sequences (starting inside a block) and
    ``import_tokens`` writes exactly those tokens: the hosted layers then hold what
    whole-block imports give, and compute what the owner would."""
    a, b, _ = pair
    a.add_request("s", prompt_ids(45, 2), PARAMS)
    a.add_request("t", prompt_ids(21, 3), PARAMS)
    a.step()
    hosted = b.migration.host_layers("A", 2, 4, 32, a.fingerprint)
    first = [StageSeq("s", 0, 45), StageSeq("t", 0, 21)]
    data = a.kv.export_tokens(first, range(2, 4))
    assert data.shape == (2, 2, 66, a.kv_cache.num_kv_heads, a.kv_cache.head_dim)
    whole, _ = a.export_kv("t", 3)  # K of t's token 17 in layer 3: block 1, offset 1
    assert torch.equal(data[1, 0, 45 + 17], whole[0, 1, 1])
    hosted.import_tokens(first, data)
    for _ in range(3):
        a.step()
    delta = [StageSeq("s", 45, 3), StageSeq("t", 21, 3)]  # 3 tokens each, inside blocks 2 and 1
    before = hosted.pool.layer(2)[0].clone()
    hosted.import_tokens(delta, a.kv.export_tokens(delta, range(2, 4)))
    # Blocks never handed out hold whatever the uninitialised pool held (NaN equals NaN here).
    same = torch.isclose(hosted.pool.layer(2)[0], before, rtol=0, atol=0, equal_nan=True)
    changed = (~same).any(dim=(2, 3)).nonzero().tolist()
    table = {r: hosted._seqs[r].block_table for r in ("s", "t")}
    assert changed == sorted(
        [[table["s"][2], i] for i in range(13, 16)] + [[table["t"][1], i] for i in range(5, 8)]
    )  # only the delta's tokens were written
    assert (hosted.num_tokens("s"), hosted.num_tokens("t")) == (48, 24)
    for rid in ("s", "t"):
        for layer in (2, 3):
            owner, lay = a.export_kv(rid, layer)
            got, _ = hosted.export_kv(rid, layer)
            n = lay.num_tokens - lay.first_token
            assert torch.equal(got.flatten(1, 2)[:, :n], owner.flatten(1, 2)[:, :n])
    mid, expected, batch = split_step(a, 2)
    rows = tuple(StageSeq(s.request_id, s.num_computed_tokens, 1) for s in batch.seqs)
    assert torch.allclose(hosted.run(StageWork(2, 4, mid, rows)), expected, rtol=0, atol=1e-5)
    for seq in batch.seqs:
        a.abort(seq.request_id)
    b.migration.release_hosted_layers("A")
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_a_token_delta_is_checked_before_anything_is_written(pair):
    a, b, _ = pair
    a.add_request("s", prompt_ids(40, 2), PARAMS)
    a.step()
    hosted = b.migration.host_layers("A", 2, 4, 2, a.fingerprint)
    spans = [StageSeq("s", 0, 20)]
    data = a.kv.export_tokens(spans, range(2, 4))
    with pytest.raises(InvalidRequestError, match=r"tokens \[30, 41\) of s"):
        a.kv.export_tokens([StageSeq("s", 30, 11)], range(2, 4))
    later = [StageSeq("s", 20, 20)]
    with pytest.raises(InvalidRequestError, match="KV from token 20 of s: only 0 are here"):
        hosted.import_tokens(later, a.kv.export_tokens(later, range(2, 4)))
    with pytest.raises(InvalidRequestError, match="KV tensor"):
        hosted.import_tokens(spans, data[:, :, :19])
    with pytest.raises(InvalidRequestError, match="KV tensor"):
        hosted.import_tokens(spans, data.to(torch.float64))
    with pytest.raises(InvalidRequestError, match="twice"):
        hosted.import_tokens(spans * 2, torch.cat([data, data], dim=2))
    assert hosted.num_sequences == 0 and hosted.num_blocks_used == 0
    whole = [StageSeq("s", 0, 40)]  # 3 blocks of 16, 2 in the pool
    with pytest.raises(ResourceExhaustedError, match="full: 3 more needed"):
        hosted.import_tokens(whole, a.kv.export_tokens(whole, range(2, 4)))
    assert hosted.num_sequences == 0 and hosted.num_blocks_used == 0
    a.abort("s")
    b.migration.release_hosted_layers("A")
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_hosted_sequences_end_when_their_lease_runs_out(pair):
    a, b, clock = pair
    hosted = b.migration.host_layers("A", 3, 4, 16, a.fingerprint, lease_s=5.0)
    hidden = torch.zeros(3, a.spec.hidden_size)
    hosted.run(StageWork(3, 4, hidden, (StageSeq("x", 0, 2), StageSeq("y", 0, 1))))
    assert hosted.num_sequences == 2 and hosted.num_blocks_used == 2
    clock.now += 4.0
    hosted.run(StageWork(3, 4, hidden[:1], (StageSeq("x", 2, 1),)))  # renews x only
    clock.now += 2.0
    b.step()  # expires y at the engine's next step
    assert (hosted.num_sequences, hosted.num_tokens("x"), hosted.num_tokens("y")) == (1, 3, 0)
    with pytest.raises(PortError, match="holds 0 tokens of it, work starts at 1"):
        hosted.run(StageWork(3, 4, hidden[:1], (StageSeq("y", 1, 1),)))
    hosted.release(["x", "unknown"])
    assert hosted.num_sequences == 0 and hosted.num_blocks_used == 0
    assert b.snapshot.hosted_layers[0].owner == "A"
    b.migration.release_hosted_layers("A")
    assert isinstance(hosted, HostedLayers) and not b.migration.hosted_layers


def test_decoding_rows_of_every_hosted_sequence_take_one_kernel_call(pair, monkeypatch):
    """One query row per sequence past its held tokens (what a located decode step sends): the
    helper answers all of them with one ``paged_decode_lse`` call, the same partial results
    (as normalised output and log-sum-exp) as the owner's own over those blocks."""
    a, b, _ = pair
    for rid, n in (("s", 75), ("t", 40)):
        a.add_request(rid, prompt_ids(n, 5), PARAMS)
    a.step()
    held = {"s": 3, "t": 2}
    for rid, blocks in held.items():
        b.migration.hosted_blocks.hold("A", rid, a._seq(rid).block_hashes[:blocks])
        for layer in range(4):
            b.migration.hosted_blocks.import_kv("A", rid, *a.export_kv(rid, layer, 0, 16 * blocks))
    gen = torch.Generator().manual_seed(1)
    queries = [
        AttentionQuery(rid, torch.randn(1, a.spec.num_heads, a.spec.head_dim, generator=gen),
                       torch.tensor([16 * blocks + 5]), 16 * blocks)
        for rid, blocks in held.items()
    ]  # fmt: skip
    calls = []
    decode_lse = paged_decode.decode_lse
    monkeypatch.setattr(
        paged_decode, "decode_lse", lambda *args: calls.append(args[0].shape) or decode_lse(*args)
    )
    far = b.migration.hosted_blocks.attend("A", 2, queries)
    assert calls == [torch.Size([2, a.spec.num_heads, a.spec.head_dim])]
    for query, part, blocks in zip(queries, far, held.values(), strict=True):
        near = a.partial_attention(query.request_id, 2, query.q, query.positions, range(blocks))
        torch.testing.assert_close(part.normalized(), near.normalized(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(part.max + part.denom.log(), near.max + near.denom.log())
    for rid in held:
        a.abort(rid)
    b.migration.hosted_blocks.release("A", list(held))
    b.step()
    assert b.migration.hosted_blocks.num_blocks == 0
    assert_no_leaks(a)


def test_hosted_blocks_answer_partial_attention_like_the_owner(pair):
    a, b, clock = pair
    a.add_request("s", prompt_ids(75, 3), PARAMS)
    a.step()
    seq = a._seq("s")
    b.migration.hosted_blocks.hold("A", "s", seq.block_hashes[:3])
    assert b.stats()["num_hosted_blocks"] == 3 and b.block_manager.num_free_blocks == 61
    for layer in range(4):
        b.migration.hosted_blocks.import_kv("A", "s", *a.export_kv("s", layer, 0, 48))
    q = torch.randn(
        2, a.spec.num_heads, a.spec.head_dim, generator=torch.Generator().manual_seed(0)
    )
    pos = torch.tensor([40, 74])
    [far] = b.migration.hosted_blocks.attend("A", 1, [AttentionQuery("s", q, pos, 48)])
    near = a.partial_attention("s", 1, q, pos, [0, 1, 2])
    for x, y in ((far.out, near.out), (far.max, near.max), (far.denom, near.denom)):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-6)
    with pytest.raises(PortError, match="holds 48 tokens in 4 layers, asked 64"):
        b.migration.hosted_blocks.attend("A", 1, [AttentionQuery("s", q, pos, 64)])
    with pytest.raises(InvalidRequestError, match="not of the blocks held"):
        b.migration.hosted_blocks.import_kv("A", "s", *a.export_kv("s", 0, 0, 32))
    b.migration.hosted_blocks.release("A", ["s"])
    assert b.migration.hosted_blocks.num_blocks == 3  # until the engine collects them
    b.step()
    assert b.migration.hosted_blocks.num_blocks == 0
    b.migration.hosted_blocks.hold("A", "t", seq.block_hashes[:1])
    clock.now += 31.0  # nobody attends: the lease ends
    b.step()
    assert b.migration.hosted_blocks.num_sequences == 0
    a.abort("s")
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_a_hosted_pool_is_not_zero_filled_up_front_but_each_block_at_its_first_use(pair):
    """The helper's pool is left uninitialised (zero-filling a pool the size of its own took
    seconds on its engine thread); a block is zeroed when first handed out, so garbage in the
    pool (NaN here) never reaches a sequence, and the hosted layers compute what the owner
    would."""
    a, b, _ = pair
    a.add_request("s", prompt_ids(45, 2), PARAMS)
    a.step()
    hosted = b.migration.host_layers("A", 2, 4, 16, a.fingerprint)
    for layer in (2, 3):
        for part in hosted.pool.layer(layer):
            part.fill_(float("nan"))  # what uninitialised memory may hold
    hosted.import_kv("s", *a.export_kv("s", 2))  # 45 tokens: blocks for 48, 3 of them
    table = hosted._seqs["s"].block_table
    k, v = hosted.pool.layer(3)  # not written yet: zeroed at allocation, nothing more
    assert len(table) == 3 and all(bool((t[table] == 0).all()) for t in (k, v))
    others = [i for i in range(16) if i not in table]
    assert bool(k[others].isnan().all())  # never handed out: untouched
    hosted.import_kv("s", *a.export_kv("s", 3))
    for _ in range(4):
        a.step()
    for layer in (2, 3):
        hosted.import_kv("s", *a.export_kv("s", layer, start_token=45))
    mid, expected, batch = split_step(a, 2)
    work = StageWork(2, 4, mid, (StageSeq("s", 49, 1),))
    assert torch.allclose(hosted.run(work), expected, rtol=0, atol=1e-5)
    for seq in batch.seqs:
        a.abort(seq.request_id)
    b.migration.release_hosted_layers("A")
    assert_no_leaks(a)
    assert_no_leaks(b)
