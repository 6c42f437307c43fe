"""Prefill workers sharing prefixes through a real kvstore node (real Redis, real data plane).

Worker A prefills a prompt and writes its full blocks back; worker B, which never saw it, gets
the prefix from the store layer by layer while it computes the suffix. B's output must equal a
run with no store, token for token; a store that fails mid-fetch or is gone changes nothing
but speed.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace

import pytest
import torch

from services.common.config import RpcConfig
from services.common.types import SamplingParams
from services.kvstore.core import KVStoreNode
from services.kvstore.metadata import MetadataStore, NodeInfo
from services.kvstore.pool import BlockPool, PoolConfig
from services.kvstore.servicer import data_handler, kvstore_service
from services.prefill.clients import GrpcKVTransport
from services.prefill.core import FirstToken, PrefillRequest, PrefillResult, PrefillWorker
from services.prefill.kvstore_client import KVStoreClient, StoreError, StoreLookup
from services.prefill.transport import KVTarget
from services.prefill.write_backs import WritePolicy
from services.rpc import dataplane
from services.rpc.server import start_server
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.prefill.helpers import ImportingDecode, cluster, prompt_ids, wait_for

RPC = RpcConfig(grace_s=0.2)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@dataclass
class Store:
    node: KVStoreNode
    address: str
    data: dataplane.DataServer
    server: object


@asynccontextmanager
async def kvstore_node(
    redis_url: str,
    prefix: str,
    transport: str,
    capacity: int = 64 << 20,
    node_id="kvstore-0",
    port: int = 0,
):
    pool = BlockPool(PoolConfig(capacity))
    node = KVStoreNode(pool, MetadataStore.from_url(redis_url, prefix=prefix))
    data = dataplane.serve(transport, data_handler(node))
    await data.start()
    server = await start_server([kvstore_service(node)], replace(RPC, port=port))
    await node.start(NodeInfo(node_id, server.address, data.address, transport))
    try:
        yield Store(node, server.address, data, server)
    finally:
        await server.stop(0)
        await node.stop()
        await data.stop()


async def prefill_on(
    worker: PrefillWorker, decode: ImportingDecode, address: str, rid: str, prompt
):
    decode.reservations[f"res-{rid}"] = (prompt, GREEDY)
    request = PrefillRequest(rid, prompt, GREEDY, KVTarget("decode-0", address, f"res-{rid}"))
    frames = [f async for f in worker.prefill(request, timeout_s=20)]
    first, result = frames
    assert isinstance(first, FirstToken) and isinstance(result, PrefillResult)
    return first.token_ids + decode.decode_all()[rid], result


async def start_workers(
    stack: AsyncExitStack, engines, address: str, timeout_s: float = 2.0, **worker_args
) -> list[PrefillWorker]:
    """A started prefill worker per engine, each with its own client of the store node at
    ``address``; each stops when ``stack`` closes. They write every new block (policy ALL:
    these tests are of the write-back's mechanics) unless ``write_policy`` says otherwise."""
    worker_args.setdefault("write_policy", WritePolicy.ALL)
    workers = []
    for engine in engines:
        client = KVStoreClient(address, RPC, timeout_s=timeout_s)
        worker = PrefillWorker(engine, GrpcKVTransport(RPC), store=client, **worker_args)
        worker.start()
        stack.push_async_callback(worker.stop)
        workers.append(worker)
    return workers


async def store_and_workers(
    stack: AsyncExitStack, redis_url: str, kv_prefix: str, engines, decode, **worker_args
):
    """A kvstore node on the TCP plane, the decode side (``cluster``) and a started prefill
    worker per engine, all closed with ``stack``: (store, cluster, workers)."""
    store = await stack.enter_async_context(kvstore_node(redis_url, kv_prefix, "tcp"))
    c = await stack.enter_async_context(cluster(engines[0], decode))
    workers = await start_workers(stack, engines, store.address, **worker_args)
    return store, c, workers


def committed(store: Store) -> int:
    stats = store.node.stats()
    return stats.num_committed_blocks if stats.num_reservations == 0 else -1


def reference(model, prompt) -> list[int]:
    return make_engine(model).generate([prompt], GREEDY)[0].token_ids


@pytest.mark.parametrize(
    ("transport", "overlap"), [("ucx", True), ("tcp", True), ("grpc", True), ("tcp", False)]
)
def test_prefix_written_by_a_is_fetched_by_b_token_identically(
    tiny_llama, redis_server, kv_prefix, transport, overlap
):
    prompt = prompt_ids(100, 5)  # 6 full blocks of 16 + 4 tokens
    expected = reference(tiny_llama, prompt)
    engines = [make_engine(tiny_llama) for _ in range(2)]
    decode = ImportingDecode(make_engine(tiny_llama))

    async def main():
        async with AsyncExitStack() as stack:
            store = await stack.enter_async_context(
                kvstore_node(redis_server.url, kv_prefix, transport)
            )
            c = await stack.enter_async_context(cluster(engines[0], decode))
            workers = await start_workers(stack, engines, store.address, store_overlap=overlap)
            tokens_a, result_a = await prefill_on(workers[0], decode, c.decode_address, "a", prompt)
            assert (tokens_a, result_a.num_cached_tokens) == (expected, 0)
            # The write-back runs after the first token: wait until the node holds all 6 blocks.
            await wait_for(lambda: committed(store) == 6)
            tokens_b, result_b = await prefill_on(workers[1], decode, c.decode_address, "b", prompt)
            assert (tokens_b, result_b.num_cached_tokens) == (expected, 96)
            assert (workers[1].num_store_hit_tokens, workers[1].num_store_fallbacks) == (96, 0)
            await wait_for(lambda: store.node.stats().num_pins == 0)
            stats = store.node.stats()
            assert (stats.num_blocks, stats.num_reservations) == (6, 0)

    asyncio.run(main())
    for engine in (*engines, decode.engine):
        assert_no_leaks(engine)


def test_store_failing_mid_fetch_or_gone_changes_nothing_but_speed(
    tiny_llama, redis_server, kv_prefix
):
    prompt = prompt_ids(120, 6)
    expected = reference(tiny_llama, prompt)
    engines = [make_engine(tiny_llama) for _ in range(3)]
    decode = ImportingDecode(make_engine(tiny_llama))

    async def main():
        async with AsyncExitStack() as stack:
            store, c, workers = await store_and_workers(
                stack, redis_server.url, kv_prefix, engines, decode, timeout_s=1.0
            )
            await prefill_on(workers[0], decode, c.decode_address, "a", prompt)
            await wait_for(lambda: committed(store) == 7)
            # Reads fail after the lookup and pin succeeded: the step fails, B recomputes.
            real_read = store.node.read
            calls = []

            def failing_read(request):
                calls.append(request.layer)
                if request.layer >= 2:
                    raise RuntimeError("disk on fire")
                return real_read(request)

            store.node.read = failing_read
            tokens_b, _ = await prefill_on(workers[1], decode, c.decode_address, "b", prompt)
            assert tokens_b == expected
            assert workers[1].num_store_fallbacks == 1 and 2 in calls
            store.node.read = real_read
            # The store gone altogether: lookups fail fast, C computes everything.
            await store.server.stop(0)
            await store.data.stop()
            tokens_c, result_c = await prefill_on(workers[2], decode, c.decode_address, "c", prompt)
            assert (tokens_c, result_c.num_cached_tokens) == (expected, 0)

    asyncio.run(main())
    for engine in (*engines, decode.engine):
        assert_no_leaks(engine)


def test_a_worker_asks_the_store_only_for_blocks_past_its_own_cached_prefix(
    tiny_llama, redis_server, kv_prefix
):
    """B's own prefix cache holds the first 4 blocks of a prompt whose 7 full blocks A wrote
    to the store: B pins and fetches only blocks 4-6, output token-identical. A prompt whose
    blocks past B's own prefix the store lacks costs one lookup: no pin, no fetch."""
    shared = prompt_ids(64, 11)  # 4 full blocks of 16
    prompt = shared + prompt_ids(60, 12)  # 7 full blocks + 11 tokens
    other = shared + prompt_ids(40, 13)  # B's own: the 4 shared blocks + 2 of its own
    fresh = shared + prompt_ids(50, 14)  # past the shared blocks, nothing anyone computed
    expected = {name: reference(tiny_llama, p) for name, p in
                (("prompt", prompt), ("other", other), ("fresh", fresh))}  # fmt: skip
    engines = [make_engine(tiny_llama) for _ in range(2)]
    decode = ImportingDecode(make_engine(tiny_llama))

    async def main():
        async with AsyncExitStack() as stack:
            store = await stack.enter_async_context(
                kvstore_node(redis_server.url, kv_prefix, "tcp")
            )
            pins, reads = [], []
            real_pin, real_read = store.node.pin, store.node.read
            store.node.pin = lambda hashes: pins.append(len(hashes)) or real_pin(hashes)
            store.node.read = lambda request: reads.append(request.num_blocks) or real_read(request)
            c = await stack.enter_async_context(cluster(engines[0], decode))
            a, b = await start_workers(stack, engines, store.address)
            await prefill_on(a, decode, c.decode_address, "a", prompt)
            await wait_for(lambda: committed(store) == 7)
            # B computes `other` itself: the store has its 4 shared blocks (pinned, fetched).
            tokens, _ = await prefill_on(b, decode, c.decode_address, "b1", other)
            assert tokens == expected["other"] and pins == [4]
            await wait_for(lambda: store.node.stats().num_pins == 0)
            pins.clear(), reads.clear()
            tokens, result = await prefill_on(b, decode, c.decode_address, "b2", prompt)
            assert (tokens, result.num_cached_tokens) == (expected["prompt"], 112)
            assert pins == [3] and set(reads) == {3}  # blocks 4-6 only, every layer
            assert b.num_store_hit_tokens == 64 + 48 and b.num_store_fallbacks == 0
            await wait_for(lambda: store.node.stats().num_pins == 0)
            pins.clear(), reads.clear()
            tokens, result = await prefill_on(b, decode, c.decode_address, "b3", fresh)
            assert (tokens, result.num_cached_tokens) == (expected["fresh"], 64)
            assert (pins, reads) == ([], [])  # nothing past B's own blocks: no pin, no read

    asyncio.run(main())
    for engine in (*engines, decode.engine):
        assert_no_leaks(engine)


def test_by_default_only_blocks_asked_for_before_are_written_and_then_shared(
    tiny_llama, redis_server, kv_prefix
):
    """The REUSED write policy: a prompt's first sight writes nothing; the second worker that
    asks for its prefix writes those blocks (not its own unique tail); a third fetches them. A
    worker's own prefix-cache hit counts as a reuse too."""
    shared = prompt_ids(96, 31)
    prompts = [shared + prompt_ids(20, 32 + i) for i in range(3)]  # 7 full blocks each
    engines = [make_engine(tiny_llama) for _ in range(3)]
    decode = ImportingDecode(make_engine(tiny_llama))

    async def main():
        async with AsyncExitStack() as stack:
            store, c, workers = await store_and_workers(
                stack,
                redis_server.url,
                kv_prefix,
                engines,
                decode,
                write_policy=WritePolicy.REUSED,
            )

            def stats():
                return [w.write_back_stats for w in workers]

            got = [await prefill_on(workers[0], decode, c.decode_address, "a", prompts[0])]
            await wait_for(lambda: stats()[0].num_not_reused == 1)
            got.append(await prefill_on(workers[1], decode, c.decode_address, "b", prompts[1]))
            await wait_for(lambda: committed(store) == 6 and stats()[1].num_done == 1)
            got.append(await prefill_on(workers[2], decode, c.decode_address, "c", prompts[2]))
            await wait_for(lambda: stats()[2].num_not_reused == 1)  # its tail: first sight
            assert [r.num_cached_tokens for _, r in got] == [0, 0, 96]
            assert [t for t, _ in got] == [reference(tiny_llama, p) for p in prompts]
            assert committed(store) == 6 and workers[2].num_store_hit_tokens == 96
            # The first prompt again on its worker: all of it from the own cache, so all of
            # it is reused; its 7th block is written now.
            tokens, result = await prefill_on(
                workers[0], decode, c.decode_address, "a2", prompts[0]
            )
            assert (tokens, result.num_cached_tokens) == (got[0][0], 112)
            await wait_for(lambda: committed(store) == 7 and stats()[0].num_done == 1)
            assert [(s.num_dropped, s.num_evicted) for s in stats()] == [(0, 0)] * 3

    asyncio.run(main())
    for engine in (*engines, decode.engine):
        assert_no_leaks(engine)


def test_a_write_back_reads_the_prefix_cache_when_it_runs_not_before(
    tiny_llama, redis_server, kv_prefix
):
    """A pending write-back holds no KV: it reads the prompt's blocks back from the worker's
    prefix cache when it runs, a chunk at a time (here one block) through one reused buffer.
    Blocks evicted meanwhile are not written: counted, nothing reserved is left open."""
    prompts = [prompt_ids(100, 21), prompt_ids(100, 22)]  # 6 full blocks each
    engine = make_engine(tiny_llama)
    decode = ImportingDecode(make_engine(tiny_llama))
    block_bytes = engine.kv_cache.layer_block_bytes * engine.spec.num_layers

    async def main():
        async with AsyncExitStack() as stack:
            store = await stack.enter_async_context(
                kvstore_node(redis_server.url, kv_prefix, "tcp")
            )
            reserves = []
            real_reserve = store.node.reserve
            store.node.reserve = lambda h, n, b: reserves.append(len(h)) or real_reserve(h, n, b)
            c = await stack.enter_async_context(cluster(engine, decode))
            (a,) = await start_workers(stack, [engine], store.address, write_back_chunk_bytes=1)
            queued = []  # what the worker queues, run here by hand
            a._write_backs.add = lambda run, num_bytes: queued.append((run, num_bytes))
            for i, prompt in enumerate(prompts):
                await prefill_on(a, decode, c.decode_address, f"p{i}", prompt)
            assert [n for _, n in queued] == [6 * block_bytes] * 2 and reserves == []
            assert await queued[0][0]() is True
            assert reserves == [1] * 6 and committed(store) == 6
            buffer = a._store._staging
            assert buffer is not None and buffer.numel() == block_bytes
            # The second prompt's blocks leave the prefix cache before its write-back runs.
            await a.engine_call(lambda e: e.block_manager.drop_cached())
            assert await queued[1][0]() is False
            assert reserves == [1] * 7 and committed(store) == 6  # reserved, aborted
            assert a._store._staging is buffer
            # What was written is what the engine computed: B fetches it, output unchanged.
            b_engine = make_engine(tiny_llama)
            (b,) = await start_workers(stack, [b_engine], store.address)
            tokens, result = await prefill_on(b, decode, c.decode_address, "b", prompts[0])
            assert (tokens, result.num_cached_tokens) == (reference(tiny_llama, prompts[0]), 96)
            await wait_for(lambda: store.node.stats().num_pins == 0)
            assert store.node.stats().num_reservations == 0

    asyncio.run(main())
    for e in (engine, decode.engine):
        assert_no_leaks(e)


def test_a_fetch_naming_a_block_before_the_pinned_run_fails_for_a_recompute(
    redis_server, kv_prefix
):
    """The worker's own cache dropped a block between its lookup and the fetch: the fetch
    names a block the store never pinned; the read refuses it (the worker recomputes)."""
    hashes = [bytes([i]) * 16 for i in range(1, 6)]
    layers = [torch.randn(2, 5, 16, 2, 8) for _ in range(2)]
    like = torch.empty(2, 16, 2, 8)

    async def main():
        async with kvstore_node(redis_server.url, kv_prefix, "tcp") as store:
            client = KVStoreClient(store.address, RPC, timeout_s=1.0)
            assert await client.lookup(hashes) == StoreLookup(None, 0)  # learns the node
            assert await client.write_back(hashes, layers) == 5
            await wait_for(lambda: committed(store) == 5)
            found = await client.lookup(hashes, first_block=2)
            prefix = found.prefix
            assert found.num_seen == 5  # the 2 before first_block are the caller's, 3 held
            assert (prefix.first_block, prefix.num_blocks) == (2, 5)
            assert [r.start for r in prefix.runs] == [2]
            got = await client.read_layer(prefix, 1, [3, 4], like)
            assert torch.equal(got, layers[1][:, 3:5])
            for positions in ([1, 2], [4, 5]):
                with pytest.raises(StoreError, match="not all in the pinned range"):
                    await client.read_layer(prefix, 0, positions, like)
            with pytest.raises(ValueError, match="first_block 5"):
                await client.lookup(hashes, first_block=5)
            await client.release(prefix)
            await wait_for(lambda: store.node.stats().num_pins == 0)
            await client.close()

    asyncio.run(main())


def test_blocks_are_placed_by_hash_over_two_nodes_and_fetched_from_both(
    tiny_llama, redis_server, kv_prefix
):
    prompt = prompt_ids(200, 8)  # 12 full blocks
    expected = reference(tiny_llama, prompt)
    engines = [make_engine(tiny_llama) for _ in range(2)]
    decode = ImportingDecode(make_engine(tiny_llama))

    async def main():
        async with AsyncExitStack() as stack:
            stores = [
                await stack.enter_async_context(
                    kvstore_node(redis_server.url, kv_prefix, "tcp", node_id=f"kvstore-{i}")
                )
                for i in range(2)
            ]
            c = await stack.enter_async_context(cluster(engines[0], decode))
            # Each worker knows one node; lookups return every live node.
            workers = await start_workers(stack, engines, stores[0].address)
            await prefill_on(workers[0], decode, c.decode_address, "a", prompt)
            await wait_for(lambda: sum(committed(s) for s in stores) == 12)
            per_node = [committed(s) for s in stores]
            assert min(per_node) > 0  # rendezvous placement spread the 12 blocks
            tokens_b, result_b = await prefill_on(workers[1], decode, c.decode_address, "b", prompt)
            assert (tokens_b, result_b.num_cached_tokens) == (expected, 192)

    asyncio.run(main())
    for engine in (*engines, decode.engine):
        assert_no_leaks(engine)


def test_a_writer_follows_a_node_restarted_on_a_new_data_port(redis_server, kv_prefix):
    """A kvstore node restarts on its gRPC port with a new data-plane port (what ``banaserve up``
    does); a prefill worker that looks nothing up (its own prefix cache hits) must not write to
    the old data plane for ever: the broken client is dropped and the node list refreshed."""
    hashes = [bytes([i]) * 16 for i in range(1, 4)]
    layers = [torch.randn(2, 3, 16, 2, 8) for _ in range(2)]

    def blocks(i: slice) -> list[torch.Tensor]:
        return [layer[:, i] for layer in layers]

    async def main():
        async with kvstore_node(redis_server.url, kv_prefix, "tcp") as first:
            port = int(first.address.rsplit(":", 1)[1])
            old_data = first.data.address
            client = KVStoreClient(first.address, RPC, timeout_s=1.0)
            assert (await client.lookup(hashes)).prefix is None  # learns the node
            assert await client.write_back(hashes[:1], blocks(slice(0, 1))) == 1
        async with kvstore_node(redis_server.url, kv_prefix, "tcp", port=port) as second:
            assert second.data.address != old_data
            loop = asyncio.get_running_loop()
            end, failures, written = loop.time() + 15, 0, 0
            while not written:
                assert loop.time() < end, f"still failing after {failures} write-backs"
                try:
                    written = await client.write_back(hashes[1:], blocks(slice(1, 3)))
                except StoreError:
                    failures += 1
                    await asyncio.sleep(0.2)
            assert written == 2
            await wait_for(lambda: committed(second) == 2)
        await client.close()

    asyncio.run(main())


def test_lookups_move_to_another_node_when_theirs_stops_answering(redis_server, kv_prefix):
    """Probe, session 43: prefill workers knew one kvstore node; with it frozen or stopped
    every lookup failed (each waiting out its timeout) while another node served. Lookups now
    move on, after one failure, to the next given address or live node a lookup named."""
    hashes = [bytes([i]) * 16 for i in range(1, 4)]
    layers = [torch.randn(2, 3, 16, 2, 8) for _ in range(2)]

    async def lookups_move_on(first: Store, second: Store) -> None:
        both = KVStoreClient([first.address, second.address], RPC, timeout_s=1.0)
        learned = KVStoreClient(first.address, RPC, timeout_s=1.0)  # given one, it learns
        for client in (both, learned):  # the first answers
            found = await client.lookup(hashes)
            assert found.prefix is not None and found.prefix.num_blocks == 3
            await client.release(found.prefix)
        await first.server.stop(0)
        for client in (both, learned):  # one lookup fails, the next goes to the live node
            with pytest.raises(StoreError, match="lookup failed: UNAVAILABLE"):
                await client.lookup(hashes)
            found = await client.lookup(hashes)
            assert found.prefix is not None and found.prefix.num_blocks == 3
            await client.release(found.prefix)
            await client.close()

    async def main():
        async with kvstore_node(redis_server.url, kv_prefix, "tcp", node_id="kvstore-1") as second:
            writer = KVStoreClient(second.address, RPC, timeout_s=1.0)
            assert (await writer.lookup(hashes)).prefix is None
            assert await writer.write_back(hashes, layers) == 3  # all on the one live node
            await writer.close()
            async with kvstore_node(redis_server.url, kv_prefix, "tcp") as first:
                await lookups_move_on(first, second)

    asyncio.run(main())
