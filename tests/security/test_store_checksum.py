"""KV from the store cannot change an output silently: every committed block carries a
checksum, verified when a reader pins it (memory) or the pool promotes it (disk). A block whose
bytes changed is dropped and withdrawn, reads as a miss, and is recomputed: the output is the
same as without the store. (Writes themselves are limited to prefill workers: test_kvstore_writes.)"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from services.kvstore.checksum import block_checksum, intact
from services.kvstore.disk import HEADER, DiskTier
from services.kvstore.pool import BlockPool, PoolConfig, charged_bytes
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.kvstore.test_prefill_store import (
    committed,
    prefill_on,
    reference,
    store_and_workers,
    wait_for,
)
from tests.prefill.helpers import ImportingDecode, prompt_ids

LAYER_BYTES = 64
H1, H2, H3 = (bytes([i]) * 16 for i in (1, 2, 3))


def _stored(pool: BlockPool, block_hash: bytes, fill: int) -> None:
    reservation = pool.reserve([block_hash], 2, LAYER_BYTES)
    for layer in range(2):
        pool.write(
            reservation.reservation_id, block_hash, layer, bytes([fill + layer]) * LAYER_BYTES
        )
    pool.commit(reservation.reservation_id)


def test_checksum_covers_every_byte_of_every_layer():
    layers = [bytearray(b"a" * 8), bytearray(b"b" * 8)]
    checksum = block_checksum(layers)
    assert intact(layers, checksum) and intact(layers, None)
    layers[1][7] ^= 1
    assert not intact(layers, checksum)


def test_a_block_changed_in_memory_is_dropped_and_read_as_a_miss():
    withdrawn: list[list[bytes]] = []
    pool = BlockPool(PoolConfig(16 * charged_bytes(2, LAYER_BYTES)), on_evict=withdrawn.append)
    for fill, h in zip((10, 20, 30), (H1, H2, H3), strict=True):
        _stored(pool, h, fill)
    pool.blocks[H2].layers[1][5] ^= 0x40  # a bit flips while the store holds it
    pin = pool.pin([H1, H2, H3])
    assert pin.hashes == (H1,)  # the prefix stops at the changed block
    assert (pool.num_corrupt, withdrawn) == (1, [[H2]])
    assert sorted(pool.blocks) == [H1, H3]
    pool.unpin(pin.pin_id)
    assert pool.pin([H3]).hashes == (H3,)  # the others are served as before


def test_a_block_changed_on_disk_is_dropped_when_promoted(tmp_path):
    withdrawn: list[list[bytes]] = []
    disk = DiskTier(tmp_path, 1 << 20)
    pool = BlockPool(
        PoolConfig(2 * charged_bytes(2, LAYER_BYTES)), disk=disk, on_evict=withdrawn.append
    )
    for fill, h in zip((10, 20, 30), (H1, H2, H3), strict=True):
        _stored(pool, h, fill)  # the third evicts H1 to disk
    assert H1 in disk and sorted(pool.blocks) == [H2, H3]
    path = disk.path(H1)
    data = bytearray(path.read_bytes())
    data[HEADER.size + LAYER_BYTES + 3] ^= 1  # one bit of layer 1 on disk
    path.write_bytes(data)
    pin = pool.pin([H1])
    assert (pin.hashes, pool.num_corrupt, withdrawn) == ((), 1, [[H1]])
    assert H1 not in disk and not path.exists()
    assert pool._disk_checksums == {}


@pytest.mark.integration
def test_a_corrupted_store_block_is_recomputed_and_the_output_is_unchanged(
    tiny_llama, redis_server, kv_prefix
):
    prompt = prompt_ids(100, 5)  # 6 full blocks of 16 + 4 tokens
    expected = reference(tiny_llama, prompt)
    engines = [make_engine(tiny_llama) for _ in range(2)]
    decode = ImportingDecode(make_engine(tiny_llama))

    async def main():
        async with AsyncExitStack() as stack:
            store, c, workers = await store_and_workers(
                stack, redis_server.url, kv_prefix, engines, decode
            )
            tokens_a, _ = await prefill_on(workers[0], decode, c.decode_address, "a", prompt)
            assert tokens_a == expected
            await wait_for(lambda: committed(store) == 6)
            pool = store.node.pool
            victim = sorted(
                pool.blocks.values(), key=lambda b: pool.lru_order().index(b.block_hash)
            )[3]
            victim.layers[0][100] ^= 0xFF  # poison one byte of the 4th block of the prefix
            tokens_b, result_b = await prefill_on(workers[1], decode, c.decode_address, "b", prompt)
            assert tokens_b == expected
            assert result_b.num_cached_tokens == 3 * 16  # the blocks before the changed one
            assert pool.num_corrupt == 1
            # B writes the block it recomputed back: the store is whole again.
            await wait_for(lambda: committed(store) == 6)
            await wait_for(lambda: store.node.stats().num_pins == 0)
            assert pool.blocks[victim.block_hash] is not victim

    asyncio.run(main())
    for engine in (*engines, decode.engine):
        assert_no_leaks(engine)
