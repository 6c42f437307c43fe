"""A cached prefix arriving layer by layer while the suffix computes (DESIGN.md §4 step 3).

Engine A computes the prompt and exports its KV; engine B gets the same prompt with
``add_request_with_prefix`` while a writer thread delivers A's prefix layers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from services.common.errors import InvalidRequestError
from services.common.types import SamplingParams
from services.engine.engine import Engine
from services.engine.prefix_fetch import FetchStatus, PrefixFetch, PrefixFetchError
from tests.engine.helpers import assert_no_leaks, make_engine

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
BLOCK = 16
PREFIX = 4 * BLOCK  # of an 87-token prompt: 4 fetched blocks, then 23 computed tokens


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 4000, (n,), generator=g).tolist()


PROMPT = prompt_ids(87, 7)
OTHER = prompt_ids(30, 8)


@dataclass
class Reference:
    tokens: list[int]  # plain greedy output
    kv: list[tuple[torch.Tensor, object]]  # per layer: export_kv of the prompt


@pytest.fixture(scope="module")
def ref(tiny_llama) -> Reference:
    a = make_engine(tiny_llama)
    a.add_request("p", PROMPT, PARAMS)
    tokens = [t for o in a.step() for t in o.new_token_ids]  # the prefill
    kv = [a.export_kv("p", layer) for layer in range(a.spec.num_layers)]
    tokens += run_to_end(a)["p"]
    assert_no_leaks(a)
    return Reference(tokens, kv)


@pytest.fixture(scope="module")
def other_tokens(tiny_llama) -> list[int]:
    return make_engine(tiny_llama).generate([OTHER], PARAMS)[0].token_ids


def run_to_end(engine: Engine, **step_kwargs) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests:
        for out in engine.step(**step_kwargs):
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def fetched_kv(ref: Reference, fetch: PrefixFetch, layer: int) -> torch.Tensor:
    data, layout = ref.kv[layer]
    assert tuple(layout.block_hashes[i] for i in fetch.block_indices) == fetch.block_hashes
    return data[:, list(fetch.block_indices)].contiguous()


def start_writer(engine, fetch, ref, delay_s=0.0, fail_at=None, before_layer=None):
    """Deliver the prefix layer by layer on another thread; returns (thread, write results)."""
    results: list[bool] = []

    def deliver() -> None:
        for layer in range(fetch.num_layers):
            if before_layer is not None:
                before_layer(layer)
            time.sleep(delay_s)
            if layer == fail_at:
                results.append(engine.fail_prefix(fetch.request_id, "store lost a block"))
                return
            results.append(
                engine.write_prefix_layer(fetch.request_id, layer, fetched_kv(ref, fetch, layer))
            )

    thread = threading.Thread(target=deliver, daemon=True)
    thread.start()
    return thread, results


def first_output(engine: Engine, request_id: str, prompt: list[int]):
    engine.add_request(request_id, prompt, PARAMS)
    outputs = [o for o in engine.step() if o.request_id == request_id]
    return outputs[0]


def test_prefix_arriving_while_the_step_runs_is_token_identical(tiny_llama, ref):
    b = make_engine(tiny_llama)
    fetch = b.add_request_with_prefix("p", PROMPT, PARAMS, PREFIX, timeout_s=5)
    assert fetch.block_indices == (0, 1, 2, 3) and fetch.status is FetchStatus.PENDING
    assert fetch.num_layers == 4
    assert fetch.layouts[3].shape == (2, 4, BLOCK, 2, 64) and fetch.layouts[3].layer == 3
    assert fetch.layouts[0].block_hashes == fetch.block_hashes == ref.kv[0][1].block_hashes[:4]
    assert b._seq("p").num_computed_tokens == PREFIX
    writer, results = start_writer(b, fetch, ref, delay_s=0.01)
    start, outputs = time.monotonic(), []
    while b.has_unfinished_requests:
        outputs += b.step()
    writer.join()
    assert time.monotonic() - start < 3  # each arrival wakes the step, not its timeout
    assert results == [True] * 4 and fetch.complete
    assert [t for o in outputs for t in o.new_token_ids] == ref.tokens
    assert {o.num_cached_tokens for o in outputs} == {PREFIX}
    assert b.stats()["num_prefix_fetches"] == 0
    # The fetched blocks became ordinary cached blocks: a later request hits all 5 full ones.
    again = first_output(b, "again", PROMPT)
    assert again.num_cached_tokens == 5 * BLOCK
    assert again.new_token_ids + run_to_end(b)["again"] == ref.tokens
    assert_no_leaks(b)


def test_prefix_written_before_the_step_is_cached_at_once_and_not_waited_for(
    tiny_llama, ref, monkeypatch
):
    b = make_engine(tiny_llama)
    fetch = b.add_request_with_prefix("p", PROMPT, PARAMS, PREFIX)
    for layer in range(fetch.num_layers):
        assert b.write_prefix_layer("p", layer, fetched_kv(ref, fetch, layer), fetch.layouts[layer])
    assert fetch.complete
    gates = []
    run = b.runner.run
    monkeypatch.setattr(
        b.runner, "run", lambda *a, **kw: gates.append(kw.get("before_layer")) or run(*a, **kw)
    )
    b.add_request("q", PROMPT, PARAMS)  # admitted in the same step: hits the fetched blocks
    first = {o.request_id: o for o in b.step()}
    assert gates == [None]
    assert first["p"].num_cached_tokens == first["q"].num_cached_tokens == PREFIX
    rest = run_to_end(b)
    assert first["p"].new_token_ids + rest["p"] == ref.tokens
    assert first["q"].new_token_ids + rest["q"] == ref.tokens
    assert b.write_prefix_layer("p", 0, fetched_kv(ref, fetch, 0)) is False  # gone: finished
    assert_no_leaks(b)


def test_blocks_in_the_local_cache_are_not_fetched(tiny_llama, ref):
    b = make_engine(tiny_llama)
    b.generate([PROMPT[:40]], PARAMS)  # caches blocks 0 and 1 of the prompt
    fetch = b.add_request_with_prefix("p", PROMPT, PARAMS, PREFIX)
    assert fetch.block_indices == (2, 3)
    assert fetch.block_hashes == ref.kv[0][1].block_hashes[2:4]
    assert fetch.layouts[0].shape == (2, 2, BLOCK, 2, 64)
    writer, results = start_writer(b, fetch, ref, delay_s=0.005)
    assert run_to_end(b)["p"] == ref.tokens
    writer.join()
    assert results == [True] * 4
    assert_no_leaks(b)


def test_the_suffix_computes_layer_l_while_later_prefix_layers_are_in_flight(tiny_llama, ref):
    b = make_engine(tiny_llama)
    fetch = b.add_request_with_prefix("p", PROMPT, PARAMS, PREFIX)
    events: list[tuple[str, int]] = []
    computed = [threading.Event() for _ in range(fetch.num_layers)]

    def on_layer_done(layer, ctx) -> None:
        if not computed[layer].is_set():
            events.append(("computed", layer))
            computed[layer].set()

    def wait_for_previous_layer(layer: int) -> None:
        # Layer l is sent only once the suffix has computed layer l-1.
        if layer > 0:
            assert computed[layer - 1].wait(5)
        events.append(("write", layer))

    writer, results = start_writer(b, fetch, ref, before_layer=wait_for_previous_layer)
    assert run_to_end(b, on_layer_done=on_layer_done)["p"] == ref.tokens
    writer.join()
    assert results == [True] * 4
    assert events == [(kind, layer) for layer in range(4) for kind in ("write", "computed")]
    assert_no_leaks(b)


@pytest.mark.parametrize("then", ["recompute", "abort"])
def test_a_failed_fetch_fails_the_step_cleanly(tiny_llama, ref, other_tokens, then):
    b = make_engine(tiny_llama)
    b.add_request("other", OTHER, PARAMS)  # shares the failing step
    fetch = b.add_request_with_prefix("p", PROMPT, PARAMS, PREFIX)
    computed = [threading.Event() for _ in range(fetch.num_layers)]
    writer, results = start_writer(
        b, fetch, ref, fail_at=2, before_layer=lambda layer: layer == 2 and computed[1].wait(5)
    )
    with pytest.raises(PrefixFetchError) as err:
        b.step(on_layer_done=lambda layer, ctx: computed[layer].set())
    writer.join()
    assert results == [True, True, True]  # layers 0 and 1 written, then failed
    assert err.value.request_ids == ("p",) and err.value.reason == "store lost a block"
    assert fetch.failed and computed[1].is_set() and not computed[2].is_set()
    # As if the step never ran: nothing advanced or sampled, nothing hashed.
    assert b._seq("p").num_computed_tokens == PREFIX and b._seq("other").num_computed_tokens == 0
    assert b._seq("p").num_tokens == len(PROMPT) and b._seq("other").num_tokens == len(OTHER)
    assert b.block_manager.num_cached_blocks == 0
    with pytest.raises(PrefixFetchError):
        b.step()  # until the caller deals with it
    assert b.write_prefix_layer("p", 2, fetched_kv(ref, fetch, 2)) is False
    if then == "recompute":
        b.recompute_prefix("p")
        assert b.block_manager.num_cached_blocks == 0  # the fetched blocks left hashless
        tokens = run_to_end(b)
        assert tokens["p"] == ref.tokens
    else:
        b.abort("p")
        tokens = run_to_end(b)
    assert tokens["other"] == other_tokens
    later = first_output(b, "later", PROMPT)
    assert later.num_cached_tokens == (5 * BLOCK if then == "recompute" else 0)
    assert later.new_token_ids + run_to_end(b)["later"] == ref.tokens
    assert_no_leaks(b)


def test_a_fetch_that_stalls_times_out(tiny_llama, ref):
    b = make_engine(tiny_llama)
    fetch = b.add_request_with_prefix("p", PROMPT, PARAMS, PREFIX, timeout_s=0.05)
    assert b.write_prefix_layer("p", 0, fetched_kv(ref, fetch, 0))
    start = time.monotonic()
    with pytest.raises(PrefixFetchError, match="layer 1 did not arrive within 0.05s"):
        b.step()
    assert time.monotonic() - start < 2
    assert fetch.failed and b.write_prefix_layer("p", 1, fetched_kv(ref, fetch, 1)) is False
    b.recompute_prefix("p")
    assert run_to_end(b)["p"] == ref.tokens
    assert_no_leaks(b)


def test_a_request_for_the_same_prompt_never_hits_blocks_still_arriving(
    tiny_llama, ref, monkeypatch
):
    b = make_engine(tiny_llama)
    fetch = b.add_request_with_prefix("p", PROMPT, PARAMS, PREFIX)
    b.add_request("q", PROMPT, PARAMS)
    stepping = threading.Event()
    run = b.runner.run
    monkeypatch.setattr(b.runner, "run", lambda *a, **kw: stepping.set() or run(*a, **kw))
    writer, _ = start_writer(b, fetch, ref, delay_s=0.005, before_layer=lambda _: stepping.wait(5))
    first = {o.request_id: o for o in b.step()}
    writer.join()
    assert first["q"].num_cached_tokens == 0 and first["p"].num_cached_tokens == PREFIX
    rest = run_to_end(b)
    assert first["p"].new_token_ids + rest["p"] == ref.tokens
    assert first["q"].new_token_ids + rest["q"] == ref.tokens
    assert_no_leaks(b)


def test_preempting_a_fetching_request_cancels_its_fetch(tiny_llama, ref):
    prompt = PROMPT[:40]
    expected = make_engine(tiny_llama).generate([prompt], PARAMS)[0].token_ids
    b = make_engine(tiny_llama, num_kv_blocks=5)
    b.add_request("old", prompt_ids(47, 9), PARAMS)
    b.step()
    b.step()  # "old" holds 3 blocks; its next token needs a 4th
    fetch = b.add_request_with_prefix("p", prompt, PARAMS, 2 * BLOCK)  # the last 2 blocks
    assert b.block_manager.num_free_blocks == 0
    b.step()  # "old" preempts "p", the newest
    assert fetch.status is FetchStatus.CANCELLED and fetch.reason == "preempted"
    assert b.write_prefix_layer("p", 0, fetched_kv(ref, fetch, 0)) is False
    assert b.stats()["num_prefix_fetches"] == 0
    assert all(b.block_manager.blocks[i].block_hash is None for i in fetch.block_ids)
    assert run_to_end(b)["p"] == expected  # recomputed whole
    assert_no_leaks(b)


def test_abort_cancels_a_pending_fetch_and_frees_its_blocks(tiny_llama, ref):
    b = make_engine(tiny_llama)
    fetch = b.add_request_with_prefix("p", PROMPT, PARAMS, PREFIX)
    assert b.write_prefix_layer("p", 0, fetched_kv(ref, fetch, 0))
    b.abort("p")
    assert fetch.status is FetchStatus.CANCELLED
    assert b.write_prefix_layer("p", 1, fetched_kv(ref, fetch, 1)) is False
    assert b.fail_prefix("p", "late") is False
    assert b.block_manager.num_cached_blocks == 0
    assert_no_leaks(b)


def test_bad_requests_and_bad_writes_are_rejected(tiny_llama, ref):
    b = make_engine(tiny_llama)
    for n in (0, 15, 96):
        with pytest.raises(InvalidRequestError, match="num_prefix_tokens"):
            b.add_request_with_prefix("p", PROMPT, PARAMS, n)
    with pytest.raises(InvalidRequestError, match="num_prefix_tokens"):
        b.add_request_with_prefix("p", PROMPT[:PREFIX], PARAMS, PREFIX)  # nothing left to compute
    fetch = b.add_request_with_prefix("p", PROMPT, PARAMS, PREFIX)
    with pytest.raises(InvalidRequestError, match="already in use"):
        b.add_request_with_prefix("p", PROMPT, PARAMS, PREFIX)
    _, other_layout = ref.kv[1]
    with pytest.raises(InvalidRequestError, match="not layer 0 of the fetched blocks"):
        b.write_prefix_layer("p", 0, fetched_kv(ref, fetch, 0), other_layout)
    assert fetch.failed  # a bad write fails the fetch, so no step waits for it
    fetch = b.add_request_with_prefix("q", PROMPT, PARAMS, PREFIX)
    with pytest.raises(InvalidRequestError, match="does not match its layout"):
        b.write_prefix_layer("q", 0, fetched_kv(ref, fetch, 0)[:, :3])
    with pytest.raises(PrefixFetchError) as err:
        b.step()
    assert err.value.request_ids == ("p", "q")
    b.abort("p")
    b.abort("q")
    assert_no_leaks(b)
