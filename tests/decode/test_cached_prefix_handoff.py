"""A reservation reuses the prompt's leading blocks that the decode worker's prefix cache holds
(DecodeConfig.reuse_cached_prefix): ReserveKV says how many (``num_cached_blocks``), the transfer
carries only the blocks after them, and the tokens are exactly those of one engine that
generates the prompt alone. Real DecodeService on port 0, the KV from a second engine; each test
ends with the Stats leak check."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.decode.core import DecodeConfig
from services.rpc.gen.banaserve.v1 import decode_pb2
from tests.decode.helpers import (
    GREEDY,
    PrefillSide,
    assert_clean,
    decode_server,
    prompt_ids,
    reference_tokens,
    reserve_request,
)
from tests.engine.helpers import make_engine

BLOCK = 16  # tiny-llama's engine default


async def generate(stub, prefill, rid, prompt, first_block=None):
    """Reserve, hand off from the block ReserveKV names (or ``first_block``), stream: (the
    reservation's num_cached_blocks, the transfer's bytes, every token)."""
    reply = await stub.ReserveKV(reserve_request(rid, prompt))
    first = prefill.prefill(rid, prompt, GREEDY)
    start = reply.num_cached_blocks if first_block is None else first_block
    frames = prefill.frames(rid, reply.reservation_id, first, first_block=start)
    done = await stub.TransferKV(frames)
    tokens = [first]
    async for frame in stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id=rid)):
        if frame.WhichOneof("frame") == "delta":
            tokens += frame.delta.token_ids
    return reply.num_cached_blocks, done.num_bytes, tokens


def test_a_shared_prefix_is_sent_once_and_tokens_are_unchanged(tiny_llama):
    reference = make_engine(tiny_llama)
    prefix = prompt_ids(3 * BLOCK + 5, 21)  # three full blocks and a partial one
    prompts = [prefix + prompt_ids(n, 22 + i) for i, n in enumerate((9, 20, 1))]

    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            cached, whole, tokens = await generate(stub, prefill, "a", prompts[0])
            assert cached == 0
            assert tokens == reference_tokens(reference, prompts[0], GREEDY)
            for i, prompt in enumerate(prompts[1:]):
                cached, sent, tokens = await generate(stub, prefill, f"b{i}", prompt)
                assert cached == 3, (i, cached)  # the full blocks of the shared prefix
                total_blocks = -(-len(prompt) // BLOCK)
                assert sent == whole // 4 * (total_blocks - 3), (i, sent, whole)
                assert tokens == reference_tokens(reference, prompt, GREEDY), i
            await assert_clean(stub)

    asyncio.run(main())


def test_the_block_of_the_last_prompt_token_always_comes(tiny_llama):
    reference = make_engine(tiny_llama)
    prompt = prompt_ids(2 * BLOCK, 31)  # whole blocks only: the second must still be sent

    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            assert (await generate(stub, prefill, "a", prompt))[0] == 0
            cached, sent, tokens = await generate(stub, prefill, "b", prompt)
            assert cached == 1 and sent > 0
            assert tokens == reference_tokens(reference, prompt, GREEDY)
            await assert_clean(stub)

    asyncio.run(main())


@pytest.mark.parametrize("wrong", [0, 2])
def test_a_transfer_from_another_block_is_refused_and_frees_the_reservation(tiny_llama, wrong):
    prompt = prompt_ids(3 * BLOCK + 2, 41)

    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            await generate(stub, prefill, "a", prompt)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await generate(stub, prefill, "b", prompt, first_block=wrong)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"starts at block {wrong}; this reservation takes it from block 3" in (
                info.value.details()
            )
            await assert_clean(stub)  # the reused blocks were released with the rest

    asyncio.run(main())


def test_reuse_can_be_turned_off(tiny_llama):
    prompt = prompt_ids(3 * BLOCK + 2, 51)

    async def main():
        config = DecodeConfig(reuse_cached_prefix=False)
        async with decode_server(tiny_llama, config) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            first = await generate(stub, prefill, "a", prompt)
            second = await generate(stub, prefill, "b", prompt)
            assert (first[0], second[0]) == (0, 0) and first[1:] == second[1:]
            await assert_clean(stub)

    asyncio.run(main())


def test_reused_blocks_stay_shared_while_both_requests_run(tiny_llama):
    """Two reservations on one cached prefix at once: neither frees the other's blocks."""
    reference = make_engine(tiny_llama)
    prefix = prompt_ids(2 * BLOCK, 61)
    prompts = {"a": prefix + [7], "b": prefix + [8, 9], "c": prefix + [10]}

    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            await generate(stub, prefill, "a", prompts["a"])
            replies = {
                rid: await stub.ReserveKV(reserve_request(rid, prompts[rid])) for rid in "bc"
            }
            assert {r.num_cached_blocks for r in replies.values()} == {2}
            await stub.Release(decode_pb2.ReleaseRequest(request_id="c"))  # drops its refs
            first = prefill.prefill("b", prompts["b"], GREEDY)
            frames = prefill.frames("b", replies["b"].reservation_id, first, first_block=2)
            await stub.TransferKV(frames)
            tokens = [first]
            call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="b"))
            async for frame in call:
                if frame.WhichOneof("frame") == "delta":
                    tokens += frame.delta.token_ids
            assert tokens == reference_tokens(reference, prompts["b"], GREEDY)
            await assert_clean(stub)

    asyncio.run(main())


async def stream_all(stub, rid):
    tokens, finished = [], None
    async for frame in stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id=rid)):
        if frame.WhichOneof("frame") == "delta":
            tokens += frame.delta.token_ids
        else:
            finished = frame.finished
    return tokens, finished


def test_a_short_suffix_on_a_cached_prefix_is_prefilled_here(tiny_llama):
    """Conditional disaggregation (ReserveKVRequest.local_prefill_max_tokens): a decode worker
    prefills a prompt itself when its cache holds all but at most that many tokens; the stream
    then starts with the first token. A longer suffix, or the limit 0, takes the handoff."""
    reference = make_engine(tiny_llama)
    prefix = prompt_ids(3 * BLOCK, 71)
    short, long_ = prefix + prompt_ids(10, 72), prefix + prompt_ids(40, 73)

    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            # Nothing cached yet: 58 tokens to compute > 16, so the KV is handed off.
            reply = await stub.ReserveKV(reserve_request("a", short, local_prefill_max_tokens=16))
            assert not reply.prefilling_locally and reply.num_cached_blocks == 0
            await stub.Release(decode_pb2.ReleaseRequest(request_id="a"))
            await generate(stub, prefill, "warm", short)  # now the prefix is cached here
            for rid, prompt, limit, local in [
                ("b", short, 16, True),  # 10 tokens after the 48 cached
                ("c", long_, 16, False),  # 40 after them
                ("d", short, 0, False),  # never
            ]:
                reply = await stub.ReserveKV(
                    reserve_request(rid, prompt, local_prefill_max_tokens=limit)
                )
                assert reply.prefilling_locally is local, rid
                if local:
                    tokens, finished = await stream_all(stub, rid)
                    assert finished.num_cached_tokens == 3 * BLOCK  # the prefill's cache hits
                else:
                    assert reply.num_cached_blocks == 3, rid
                    first = prefill.prefill(rid, prompt, GREEDY)
                    frames = prefill.frames(rid, reply.reservation_id, first, first_block=3)
                    await stub.TransferKV(frames)
                    rest, _ = await stream_all(stub, rid)
                    tokens = [first, *rest]
                assert tokens == reference_tokens(reference, prompt, GREEDY), rid
            await assert_clean(stub)

    asyncio.run(main())


def test_a_local_prefill_that_ends_at_its_first_token_finishes(tiny_llama):
    params = GREEDY.__class__(temperature=0.0, max_tokens=1, ignore_eos=True)
    prefix = prompt_ids(2 * BLOCK, 81)

    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            await generate(stub, PrefillSide(tiny_llama), "warm", prefix + [5])
            request = reserve_request("one", prefix + [6], params, local_prefill_max_tokens=4)
            reply = await stub.ReserveKV(request)
            assert reply.prefilling_locally
            tokens, finished = await stream_all(stub, "one")
            assert len(tokens) == 1 and finished.num_completion_tokens == 1
            await assert_clean(stub)

    asyncio.run(main())
