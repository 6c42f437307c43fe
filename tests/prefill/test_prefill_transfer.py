"""Prefill -> gRPC KV transport -> a receiver that imports the KV and decodes on.

The continued greedy tokens must equal an in-process ``Engine.generate`` of the same prompt.
"""

from __future__ import annotations

import asyncio

from services.common.types import SamplingParams
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.prefill.helpers import ImportingDecode, cluster, prefill_request, prompt_ids, run_prefill

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
KV_BYTES_PER_BLOCK_LAYER = 2 * 16 * 2 * 64 * 4  # K+V, block 16, 2 kv heads, dim 64, float32


def reference(tiny_llama, prompts):
    return [c.token_ids for c in make_engine(tiny_llama).generate(prompts, GREEDY)]


def test_prefill_streams_every_layer_and_decode_continues_token_identically(tiny_llama):
    prompt = prompt_ids(75, 11)  # 4 full blocks and a partial one
    decode = ImportingDecode(make_engine(tiny_llama))
    decode.reservations["res-1"] = (prompt, GREEDY)
    prefill_engine = make_engine(tiny_llama)

    async def main():
        # Small chunks: every layer crosses the wire in several messages.
        async with cluster(
            prefill_engine, decode, max_chunk_bytes=2 * KV_BYTES_PER_BLOCK_LAYER
        ) as c:
            request = prefill_request(
                "r1",
                prompt,
                c.decode_address,
                temperature=0,
                max_tokens=MAX_TOKENS,
                ignore_eos=True,
            )
            frames = await run_prefill(c.prefill, request)
            await c.assert_idle()
            return frames

    first, done = asyncio.run(main())
    assert first.WhichOneof("frame") == "first_token" and done.WhichOneof("frame") == "done"
    done = done.done
    num_layers = prefill_engine.spec.num_layers
    assert done.finish_reason == 0  # UNSPECIFIED: the request continues on the decode worker
    assert (done.num_prompt_tokens, done.num_cached_tokens) == (75, 0)
    assert done.kv_bytes == num_layers * 5 * KV_BYTES_PER_BLOCK_LAYER
    transfer, exposed = done.kv_transfer.ToTimedelta(), done.kv_transfer_exposed.ToTimedelta()
    assert transfer.total_seconds() > 0 and exposed <= transfer
    assert done.prefill.ToTimedelta().total_seconds() > 0
    frames = decode.received["r1"].frames
    assert frames[:2] == ["open", "header"] and frames[-1] == "end"
    # 5 blocks in chunks of 2 blocks: three messages per layer, layers in compute order.
    assert frames[2:-1] == [f"layer:{layer}" for layer in range(num_layers) for _ in range(3)]
    tokens = list(first.first_token.token_ids) + decode.decode_all()["r1"]
    assert tokens == reference(tiny_llama, [prompt])[0]
    assert_no_leaks(decode.engine)
    assert prefill_engine.stats()["num_cached_blocks"] == 4  # full blocks stay cached


def test_concurrent_prefills_and_a_prefix_hit_all_continue_token_identically(tiny_llama):
    shared = prompt_ids(48, 12)
    prompts = [shared + prompt_ids(n, 20 + n) for n in (5, 17, 30)] + [prompt_ids(9, 13)]
    decode = ImportingDecode(make_engine(tiny_llama))
    for i, p in enumerate(prompts):
        decode.reservations[f"res-{i}"] = (p, GREEDY)
    prefill_engine = make_engine(tiny_llama)

    async def main():
        async with cluster(prefill_engine, decode) as c:
            first = await run_prefill(
                c.prefill,
                prefill_request(
                    "r0",
                    prompts[0],
                    c.decode_address,
                    "res-0",
                    temperature=0,
                    max_tokens=MAX_TOKENS,
                    ignore_eos=True,
                ),
            )
            rest = await asyncio.gather(
                *(
                    run_prefill(
                        c.prefill,
                        prefill_request(
                            f"r{i}",
                            p,
                            c.decode_address,
                            f"res-{i}",
                            temperature=0,
                            max_tokens=MAX_TOKENS,
                            ignore_eos=True,
                        ),
                    )
                    for i, p in enumerate(prompts)
                    if i
                )
            )
            await c.assert_idle()
            return [first, *rest]

    results = asyncio.run(main())
    assert [r[1].done.num_cached_tokens for r in results] == [0, 48, 48, 0]
    expected = reference(tiny_llama, prompts)
    decoded = decode.decode_all()
    for i, (first, _) in enumerate(results):
        tokens = list(first.first_token.token_ids) + decoded[f"r{i}"]
        assert tokens == expected[i], i
    assert_no_leaks(decode.engine)


def test_first_token_that_ends_the_request_skips_the_handoff(tiny_llama):
    prompt = prompt_ids(20, 14)
    decode = ImportingDecode(make_engine(tiny_llama))
    decode.reservations["res-1"] = (prompt, GREEDY)

    async def main():
        async with cluster(make_engine(tiny_llama), decode) as c:
            request = prefill_request("r1", prompt, c.decode_address, temperature=0, max_tokens=1)
            frames = await run_prefill(c.prefill, request)
            await c.assert_idle()
            return frames

    first, done = asyncio.run(main())
    assert list(first.first_token.token_ids) == reference(tiny_llama, [prompt])[0][:1]
    assert done.done.finish_reason == 2  # LENGTH
    assert done.done.kv_bytes == 0
    # The transfer was cancelled, not ended; cancelled early enough, its header never reached
    # the decode side at all (seen in a loaded full run): either way nothing was handed off.
    seen = decode.received.get("r1")
    assert seen is None or "end" not in seen.frames
    assert_no_leaks(decode.engine)
