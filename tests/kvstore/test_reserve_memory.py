"""What a reservation costs: the host memory it holds is what it is charged against the pool's
capacity, payload plus a fixed per-block overhead, whatever its shape (many layers, many tiny
blocks); a Reserve allocates nothing for its payload (the first write does), so its size costs
no time; and a Reserve with nothing to write holds nothing, like an empty Pin."""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest

from services.common.errors import InvalidRequestError, ResourceExhaustedError
from services.common.hashing import BlockHash
from services.kvstore.pool import (
    BLOCK_OVERHEAD_BYTES,
    MAX_NUM_LAYERS,
    BlockPool,
    PoolConfig,
    charged_bytes,
)
from services.rpc.gen.banaserve.v1 import kvstore_pb2 as pb
from tests.kvstore.test_servicer import C, code_of, served_node


def h(i: int) -> BlockHash:
    return i.to_bytes(16, "little")


def assert_empty(pool: BlockPool) -> None:
    assert (pool.num_blocks, pool.num_reservations, pool.num_pins, pool.num_bytes_used) == (
        0,
        0,
        0,
        0,
    )


def traced_bytes_of(build) -> tuple[object, int]:
    """``build()``'s result and the bytes it left allocated (tracemalloc: no timing, no RSS)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = build()
        return result, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def store(pool: BlockPool, first: int, num_blocks: int, num_layers: int, layer_bytes: int):
    """Reserve, write and commit ``num_blocks`` fresh blocks (hashes made here, as a request's
    are); returns their hashes."""
    hashes = [h(first + i) for i in range(num_blocks)]
    reservation = pool.reserve(hashes, num_layers, layer_bytes)
    data = bytes(layer_bytes)
    for block_hash in hashes:
        for layer in range(num_layers):
            pool.write(reservation.reservation_id, block_hash, layer, data)
    assert pool.commit(reservation.reservation_id) == hashes
    return hashes


@pytest.mark.parametrize("num_layers", [MAX_NUM_LAYERS + 1, 10_000_000])
def test_reserve_refuses_more_layers_than_any_model_has_before_allocating(num_layers: int) -> None:
    pool = BlockPool(PoolConfig(1 << 30))
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_NUM_LAYERS}"):
        pool.reserve([h(1)], num_layers, 1)
    assert_empty(pool)
    reservation = pool.reserve([h(1)], MAX_NUM_LAYERS, 1)  # the bound itself is fine
    assert pool.num_bytes_used == MAX_NUM_LAYERS + BLOCK_OVERHEAD_BYTES
    pool.abort(reservation.reservation_id)
    assert_empty(pool)


def test_tiny_blocks_are_charged_their_overhead_so_capacity_refuses_them() -> None:
    """D1b: a million one-byte blocks once fitted in 1 MB of capacity and held ~650 MB."""
    pool = BlockPool(PoolConfig(64 << 10))
    with pytest.raises(ResourceExhaustedError):
        pool.reserve([h(i) for i in range(1000)], 1, 1)  # 1000 payload bytes, ~0.5 MB held
    assert_empty(pool)
    fits = (64 << 10) // charged_bytes(1, 1)
    reservation = pool.reserve([h(i) for i in range(fits)], 1, 1)
    assert pool.num_bytes_used == fits * (1 + BLOCK_OVERHEAD_BYTES)
    with pytest.raises(ResourceExhaustedError):
        pool.reserve([h(fits)], 1, 1)
    pool.abort(reservation.reservation_id)
    assert_empty(pool)


@pytest.mark.parametrize(
    ("num_blocks", "num_layers", "layer_bytes"),
    [(20_000, 1, 1), (1, MAX_NUM_LAYERS, 1), (200, 32, 64)],
)
def test_memory_a_stored_block_holds_is_within_what_it_is_charged(
    num_blocks: int, num_layers: int, layer_bytes: int
) -> None:
    pool = BlockPool(PoolConfig(1 << 30))
    store(pool, 1 << 40, 1, 1, 1)  # the pool's own tables, allocated once, are not a block's
    used = pool.num_bytes_used
    hashes, held = traced_bytes_of(lambda: store(pool, 0, num_blocks, num_layers, layer_bytes))
    charged = pool.num_bytes_used - used
    assert held <= charged, f"{held / num_blocks:.0f} bytes held per block, {charged} charged"
    assert charged == num_blocks * charged_bytes(num_layers, layer_bytes)
    pin = pool.pin(hashes)
    assert bytes(pool.read(pin.pin_id, hashes[-1], num_layers - 1)) == bytes(layer_bytes)
    pool.unpin(pin.pin_id)


def test_reserve_allocates_no_payload_so_its_size_costs_no_time() -> None:
    """D1: a Reserve's cost grows with its blocks, not its bytes; the first write allocates."""
    num_layers, layer_bytes = 64, 1 << 20  # 64 MiB in one block
    pool = BlockPool(PoolConfig(1 << 30))
    reservation, held = traced_bytes_of(lambda: pool.reserve([h(1)], num_layers, layer_bytes))
    assert held < 4096
    assert pool.num_bytes_used == charged_bytes(num_layers, layer_bytes)
    rid = reservation.reservation_id
    pool.write(rid, h(1), 3, b"\x07" * layer_bytes)
    for layer in range(num_layers):
        if layer != 3:
            pool.write_buffer(rid, h(1), layer)[:4] = layer.to_bytes(4, "little")
    pool.commit(rid)
    pin = pool.pin([h(1)])
    assert bytes(pool.read(pin.pin_id, h(1), 3)[-2:]) == b"\x07\x07"
    assert bytes(pool.read(pin.pin_id, h(1), 9)[:5]) == b"\x09\x00\x00\x00\x00"  # zero-filled
    pool.unpin(pin.pin_id)


def test_reserve_of_nothing_to_write_holds_nothing_like_an_empty_pin(redis_server, kv_prefix):
    async def main():
        async with served_node(redis_server.url, kv_prefix, 1 << 20) as (stub, _):
            empty = await stub.Reserve(pb.ReserveRequest(num_layers=2, layer_bytes=8))
            assert (empty.reservation_id, list(empty.to_write)) == (0, [])
            assert (await stub.Pin(pb.PinRequest())).pin_id == 0
            stats = await stub.Stats(pb.KVStoreServiceStatsRequest())
            assert (stats.num_reservations, stats.num_pins, stats.num_bytes_used) == (0, 0, 0)
            # What a caller does after any Reserve still works on id 0.
            assert (await stub.Commit(pb.CommitRequest(reservation_id=0))).num_committed == 0
            await stub.Abort(pb.KVStoreServiceAbortRequest(reservation_id=0))
            # An empty Reserve is checked like any other.
            bad = pb.ReserveRequest(num_layers=0, layer_bytes=8)
            assert await code_of(stub.Reserve(bad)) == C.INVALID_ARGUMENT

    asyncio.run(main())


def test_reserve_over_the_wire_refuses_huge_layer_counts_and_tiny_block_floods(
    redis_server, kv_prefix
):
    async def main():
        async with served_node(redis_server.url, kv_prefix, 1 << 20) as (stub, _):
            huge = pb.ReserveRequest(block_hashes=[h(1)], num_layers=1 << 20, layer_bytes=1)
            assert await code_of(stub.Reserve(huge)) == C.INVALID_ARGUMENT
            flood = pb.ReserveRequest(
                block_hashes=[h(i) for i in range(10_000)], num_layers=1, layer_bytes=1
            )
            assert await code_of(stub.Reserve(flood)) == C.RESOURCE_EXHAUSTED
            stats = await stub.Stats(pb.KVStoreServiceStatsRequest())
            assert (stats.num_blocks, stats.num_reservations, stats.num_bytes_used) == (0, 0, 0)

    asyncio.run(main())
