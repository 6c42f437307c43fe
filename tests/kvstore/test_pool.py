"""BlockPool: two-phase writes, pins, LRU eviction, TTL expiry and the disk tier."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.errors import (
    ConfigError,
    InvalidRequestError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from services.common.hashing import BlockHash
from services.kvstore.disk import HEADER, DiskTier
from services.kvstore.pool import (
    BlockPool,
    BlockStatus,
    Expired,
    PoolConfig,
    Tier,
    charged_bytes,
)

NUM_LAYERS = 2
LAYER_BYTES = 8
BLOCK_BYTES = charged_bytes(NUM_LAYERS, LAYER_BYTES)  # what the pool counts per block
FILE_BYTES = HEADER.size + NUM_LAYERS * LAYER_BYTES


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def h(i: int) -> BlockHash:
    return bytes([i]) * 16


def payload(block_hash: BlockHash, layer: int) -> bytes:
    return bytes((block_hash[0] * 16 + layer * 8 + i) % 256 for i in range(LAYER_BYTES))


class Harness:
    """A pool of ``num_blocks`` blocks' worth of bytes, a fake clock and an eviction log."""

    def __init__(self, num_blocks: int = 4, disk: DiskTier | None = None) -> None:
        self.clock = FakeClock()
        self.evicted: list[list[BlockHash]] = []
        self.pool = BlockPool(
            PoolConfig(num_blocks * BLOCK_BYTES, reservation_ttl_s=30.0, pin_ttl_s=10.0),
            disk=disk,
            on_evict=self.evicted.append,
            clock=self.clock,
        )

    def fill(self, reservation_id: int, hashes: list[BlockHash]) -> None:
        for block_hash in hashes:
            for layer in range(NUM_LAYERS):
                self.pool.write(reservation_id, block_hash, layer, payload(block_hash, layer))

    def store(self, *hashes: BlockHash) -> list[BlockHash]:
        """Reserve, write and commit each block on its own, so the LRU order is call order."""
        committed = []
        for block_hash in hashes:
            reservation = self.pool.reserve([block_hash], NUM_LAYERS, LAYER_BYTES)
            self.fill(reservation.reservation_id, list(reservation.to_write))
            committed += self.pool.commit(reservation.reservation_id)
        return committed

    def read_all(self, pin_id: int, block_hash: BlockHash) -> list[bytes]:
        return [bytes(self.pool.read(pin_id, block_hash, layer)) for layer in range(NUM_LAYERS)]


def expected(block_hash: BlockHash) -> list[bytes]:
    return [payload(block_hash, layer) for layer in range(NUM_LAYERS)]


def assert_no_leaks(pool: BlockPool) -> None:
    assert pool.num_pins == 0
    assert pool.num_reservations == 0
    assert pool.num_bytes_used == sum(b.num_charged_bytes for b in pool.blocks.values())
    assert pool.num_bytes_used <= pool.config.capacity_bytes
    assert all(b.status is BlockStatus.COMMITTED for b in pool.blocks.values())
    assert all(b.num_pins == 0 for b in pool.blocks.values())
    assert sorted(pool.lru_order()) == sorted(pool.blocks)
    if pool.disk is not None:
        files = sorted(p.name for p in pool.disk.directory.iterdir())
        assert files == sorted(f"{x.hex()}.kv" for x in pool.disk.hashes())
        assert pool.disk.num_bytes == sum(p.stat().st_size for p in pool.disk.directory.iterdir())
        assert not set(pool.disk.hashes()) & set(pool.blocks)


def snapshot(pool: BlockPool) -> tuple:
    return (
        {x: (b.status, b.num_pins) for x, b in pool.blocks.items()},
        pool.lru_order(),
        pool.num_bytes_used,
        pool.stats(),
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"capacity_bytes": 0},
        {"capacity_bytes": 16, "reservation_ttl_s": 0.0},
        {"capacity_bytes": 16, "pin_ttl_s": -1.0},
    ],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        PoolConfig(**kwargs)


def test_two_phase_write_round_trip_is_byte_exact_per_layer() -> None:
    t = Harness()
    reservation = t.pool.reserve([h(1), h(2)], NUM_LAYERS, LAYER_BYTES)
    assert (reservation.reservation_id, reservation.to_write) == (1, (h(1), h(2)))
    assert (reservation.existing, reservation.in_flight, reservation.expires_at) == ((), (), 30.0)
    assert t.pool.num_bytes_used == 2 * BLOCK_BYTES
    assert t.pool.locate(h(1)) is None  # being written is not readable
    t.fill(1, [h(1)])
    for layer in range(NUM_LAYERS):  # a data plane receiving in place
        t.pool.write_buffer(1, h(2), layer)[:] = payload(h(2), layer)
    assert t.pool.commit(1) == [h(1), h(2)]
    assert t.pool.locate(h(1)) is Tier.MEMORY

    pin = t.pool.pin([h(1), h(2)])
    assert (pin.pin_id, pin.hashes, pin.expires_at) == (1, (h(1), h(2)), 10.0)
    assert t.read_all(1, h(1)) == expected(h(1))
    assert t.read_all(1, h(2)) == expected(h(2))
    view = t.pool.read(1, h(2), 1)
    assert view.readonly and view.obj is t.pool.blocks[h(2)].data  # no copy
    t.pool.unpin(1)
    assert t.evicted == []
    assert_no_leaks(t.pool)


def test_second_writer_of_same_hash_gets_no_assignment() -> None:
    t = Harness()
    first = t.pool.reserve([h(1), h(2)], NUM_LAYERS, LAYER_BYTES)
    second = t.pool.reserve([h(1), h(2), h(3)], NUM_LAYERS, LAYER_BYTES)
    assert (second.to_write, second.in_flight, second.existing) == ((h(3),), (h(1), h(2)), ())
    assert t.pool.num_bytes_used == 3 * BLOCK_BYTES
    with pytest.raises(InvalidRequestError):
        t.pool.write(second.reservation_id, h(1), 0, payload(h(1), 0))

    t.pool.abort(first.reservation_id)
    third = t.pool.reserve([h(1)], NUM_LAYERS, LAYER_BYTES)
    assert third.to_write == (h(1),)
    t.fill(second.reservation_id, [h(3)])
    t.fill(third.reservation_id, [h(1)])
    assert t.pool.commit(second.reservation_id) == [h(3)]
    assert t.pool.commit(third.reservation_id) == [h(1)]

    late = t.pool.reserve([h(1), h(2)], NUM_LAYERS, LAYER_BYTES)
    assert (late.to_write, late.existing) == ((h(2),), (h(1),))
    t.pool.abort(late.reservation_id)
    assert sorted(t.pool.blocks) == [h(1), h(3)]
    assert_no_leaks(t.pool)


def test_commit_before_all_layers_written_is_rejected() -> None:
    t = Harness()
    reservation = t.pool.reserve([h(1)], NUM_LAYERS, LAYER_BYTES)
    t.pool.write(reservation.reservation_id, h(1), 0, payload(h(1), 0))
    with pytest.raises(
        InvalidRequestError,
        match=rf"^reservation 1: 1 of its 1 blocks not fully written \(the first, {h(1).hex()}, "
        r"has 1 of 2 layers\)$",
    ):
        t.pool.commit(reservation.reservation_id)
    assert t.pool.blocks[h(1)].status is BlockStatus.WRITING
    t.pool.write(reservation.reservation_id, h(1), 1, payload(h(1), 1))
    assert t.pool.commit(reservation.reservation_id) == [h(1)]
    assert_no_leaks(t.pool)


def test_write_checks_owner_layer_and_size() -> None:
    t = Harness()
    reservation = t.pool.reserve([h(1)], NUM_LAYERS, LAYER_BYTES)
    rid = reservation.reservation_id
    with pytest.raises(InvalidRequestError):
        t.pool.write(rid, h(1), 0, b"short")
    with pytest.raises(InvalidRequestError):
        t.pool.write(rid, h(1), NUM_LAYERS, payload(h(1), 0))
    with pytest.raises(InvalidRequestError):
        t.pool.write(rid, h(9), 0, payload(h(9), 0))
    with pytest.raises(RequestNotFoundError):
        t.pool.write(rid + 1, h(1), 0, payload(h(1), 0))
    assert t.pool.blocks[h(1)].written_mask == 0
    t.pool.abort(rid)
    with pytest.raises(RequestNotFoundError):
        t.pool.commit(rid)
    assert_no_leaks(t.pool)


@pytest.mark.parametrize(
    ("hashes", "num_layers", "layer_bytes"),
    [([h(1), h(1)], 2, 8), ([b"short"], 2, 8), ([h(1)], 0, 8), ([h(1)], 2, 0)],
)
def test_reserve_rejects_bad_input(hashes: list[bytes], num_layers: int, layer_bytes: int) -> None:
    t = Harness()
    with pytest.raises(InvalidRequestError):
        t.pool.reserve(hashes, num_layers, layer_bytes)
    assert t.pool.num_blocks == 0
    assert_no_leaks(t.pool)


def test_eviction_takes_lru_unpinned_committed_blocks_in_order() -> None:
    t = Harness(num_blocks=4)
    t.store(h(1), h(2), h(3), h(4))
    pin_1 = t.pool.pin([h(1)])
    pin_3 = t.pool.pin([h(3)])
    assert t.pool.lru_order() == [h(2), h(4), h(1), h(3)]  # a pin is a use

    reservation = t.pool.reserve([h(5), h(6)], NUM_LAYERS, LAYER_BYTES)
    assert t.evicted == [[h(2), h(4)]]
    assert sorted(t.pool.blocks) == [h(1), h(3), h(5), h(6)]
    assert t.pool.stats().num_evicted == 2
    # Only pinned and in-flight blocks are left: nothing can be evicted.
    with pytest.raises(ResourceExhaustedError):
        t.pool.reserve([h(7)], NUM_LAYERS, LAYER_BYTES)
    assert t.read_all(pin_1.pin_id, h(1)) == expected(h(1))

    t.fill(reservation.reservation_id, [h(5), h(6)])
    t.pool.commit(reservation.reservation_id)
    t.pool.unpin(pin_3.pin_id)
    t.store(h(7))
    assert t.evicted == [[h(2), h(4)], [h(3)]]
    t.pool.unpin(pin_1.pin_id)
    assert t.pool.lru_order() == [h(1), h(5), h(6), h(7)]
    assert_no_leaks(t.pool)


def test_resource_exhausted_reserves_and_evicts_nothing() -> None:
    t = Harness(num_blocks=4)
    t.store(h(1), h(2), h(3))
    pin = t.pool.pin([h(1), h(2)])
    before = snapshot(t.pool)
    # Needs 3 blocks; 1 free + 1 evictable (h3) is not enough, so h3 must survive.
    with pytest.raises(ResourceExhaustedError):
        t.pool.reserve([h(4), h(5), h(6)], NUM_LAYERS, LAYER_BYTES)
    with pytest.raises(ResourceExhaustedError):  # larger than the whole pool
        t.pool.reserve([h(x) for x in range(10, 15)], NUM_LAYERS, LAYER_BYTES)
    assert snapshot(t.pool) == before
    assert t.evicted == []
    t.pool.unpin(pin.pin_id)
    assert_no_leaks(t.pool)


def test_uncommitted_reservation_expires_and_frees_its_space() -> None:
    t = Harness(num_blocks=2)
    stale = t.pool.reserve([h(1), h(2)], NUM_LAYERS, LAYER_BYTES)
    t.pool.write(stale.reservation_id, h(1), 0, payload(h(1), 0))
    t.clock.now = 29.9
    assert t.pool.expire() == Expired((), ())
    with pytest.raises(ResourceExhaustedError):
        t.pool.reserve([h(3)], NUM_LAYERS, LAYER_BYTES)
    t.clock.now = 30.0
    assert t.pool.expire() == Expired((1,), ())
    assert (t.pool.num_bytes_used, t.pool.num_blocks) == (0, 0)
    with pytest.raises(RequestNotFoundError):
        t.pool.commit(stale.reservation_id)
    again = t.pool.reserve([h(1)], NUM_LAYERS, LAYER_BYTES)
    assert (again.reservation_id, again.to_write) == (2, (h(1),))
    t.pool.abort(again.reservation_id)
    assert t.evicted == []  # never committed, never announced
    assert_no_leaks(t.pool)


def test_pin_expires_after_its_ttl_and_the_block_becomes_evictable() -> None:
    t = Harness(num_blocks=1)
    t.store(h(1))
    pin = t.pool.pin([h(1)])
    with pytest.raises(ResourceExhaustedError):
        t.pool.reserve([h(2)], NUM_LAYERS, LAYER_BYTES)
    t.clock.now = 10.0
    assert t.pool.expire() == Expired((), (1,))
    with pytest.raises(RequestNotFoundError):
        t.pool.read(pin.pin_id, h(1), 0)
    with pytest.raises(RequestNotFoundError):
        t.pool.unpin(pin.pin_id)
    assert t.pool.blocks[h(1)].num_pins == 0
    t.store(h(2))
    assert t.evicted == [[h(1)]]
    assert_no_leaks(t.pool)


def test_pin_stops_at_first_miss() -> None:
    t = Harness()
    t.store(h(1), h(2), h(4))
    writing = t.pool.reserve([h(5)], NUM_LAYERS, LAYER_BYTES)
    assert t.pool.pin([h(1), h(2), h(3), h(4)]).hashes == (h(1), h(2))
    assert t.pool.pin([h(4), h(5), h(1)]).hashes == (h(4),)  # being written is a miss
    assert t.pool.pin([h(3)]).hashes == ()
    with pytest.raises(InvalidRequestError):
        t.pool.read(3, h(1), 0)  # not in this pin
    for pin_id in (1, 2, 3):
        t.pool.unpin(pin_id)
    t.pool.abort(writing.reservation_id)
    assert_no_leaks(t.pool)


def test_pin_stops_at_the_first_block_of_another_shape() -> None:
    """Probe, session 43: a pin over blocks of two shapes answered the first's while its reads
    were sized by each block; a pin's blocks now share one shape."""
    t = Harness(num_blocks=8)
    t.store(h(1))
    other = t.pool.reserve([h(2)], NUM_LAYERS + 1, LAYER_BYTES)
    for layer in range(NUM_LAYERS + 1):
        t.pool.write(other.reservation_id, h(2), layer, payload(h(2), 0))
    t.pool.commit(other.reservation_id)
    assert t.pool.pin([h(1), h(2)]).hashes == (h(1),)
    assert t.pool.pin([h(2), h(1)]).hashes == (h(2),)
    for pin_id in (1, 2):
        t.pool.unpin(pin_id)
    assert_no_leaks(t.pool)


# -- disk tier ---------------------------------------------------------------------------


def test_eviction_goes_to_disk_and_pin_promotes_back_byte_exact(tmp_path: Path) -> None:
    t = Harness(num_blocks=2, disk=DiskTier(tmp_path, 10 * FILE_BYTES))
    t.store(h(1), h(2), h(3))
    assert t.evicted == []  # on disk is still held
    assert (t.pool.locate(h(1)), t.pool.locate(h(3))) == (Tier.DISK, Tier.MEMORY)
    assert t.pool.reserve([h(1)], NUM_LAYERS, LAYER_BYTES).existing == (h(1),)
    t.pool.abort(4)

    pin = t.pool.pin([h(1), h(3)])
    assert pin.hashes == (h(1), h(3))
    assert t.read_all(pin.pin_id, h(1)) == expected(h(1))
    assert (t.pool.locate(h(1)), t.pool.locate(h(2))) == (Tier.MEMORY, Tier.DISK)
    assert t.pool.disk is not None and t.pool.disk.hashes() == [h(2)]
    stats = t.pool.stats()
    assert (stats.num_evicted, stats.num_promoted, stats.num_disk_blocks) == (2, 1, 1)
    t.pool.unpin(pin.pin_id)
    assert t.evicted == []
    assert_no_leaks(t.pool)


def test_promotion_without_room_stops_the_pinned_prefix(tmp_path: Path) -> None:
    t = Harness(num_blocks=2, disk=DiskTier(tmp_path, 10 * FILE_BYTES))
    t.store(h(1), h(2), h(3))
    pin = t.pool.pin([h(2), h(3), h(1)])
    assert pin.hashes == (h(2), h(3))
    assert t.pool.locate(h(1)) is Tier.DISK
    t.pool.unpin(pin.pin_id)
    assert_no_leaks(t.pool)


def test_disk_capacity_drop_is_announced(tmp_path: Path) -> None:
    t = Harness(num_blocks=1, disk=DiskTier(tmp_path, FILE_BYTES))
    t.store(h(1), h(2))
    assert t.evicted == []
    t.store(h(3))
    assert t.evicted == [[h(1)]]
    assert (t.pool.locate(h(1)), t.pool.locate(h(2))) == (None, Tier.DISK)
    assert_no_leaks(t.pool)


def test_corrupt_disk_file_is_a_miss_and_announced(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 10 * FILE_BYTES)
    t = Harness(num_blocks=1, disk=disk)
    t.store(h(1), h(2))
    with open(disk.path(h(1)), "r+b") as f:
        f.truncate(FILE_BYTES - 1)
    pin = t.pool.pin([h(1), h(2)])
    assert pin.hashes == ()
    assert t.evicted == [[h(1)]]
    assert t.pool.locate(h(1)) is None
    t.pool.unpin(pin.pin_id)
    assert_no_leaks(t.pool)


def test_holdings_name_every_readable_block_in_memory_and_on_disk(tmp_path: Path) -> None:
    """What a node re-announces when it rejoins the index: a block only on the disk tier is
    served too (a pin promotes it), so it is named as well (before session 44 it was not, and
    after a resync it was never found again)."""
    t = Harness(num_blocks=2, disk=DiskTier(tmp_path, 10 * FILE_BYTES))
    t.store(h(1), h(2), h(3))  # h(1) goes to disk
    t.pool.reserve([h(4)], NUM_LAYERS, LAYER_BYTES)  # being written: not readable yet
    held = sorted(t.pool.holdings())
    payload_bytes = NUM_LAYERS * LAYER_BYTES
    assert held == [(h(i), payload_bytes, NUM_LAYERS) for i in (1, 2, 3)]
    assert t.pool.locate(h(1)) is Tier.DISK


def test_discard_drops_unpinned_copies_from_either_tier_and_keeps_pinned_ones(
    tmp_path: Path,
) -> None:
    t = Harness(num_blocks=3, disk=DiskTier(tmp_path, 10 * FILE_BYTES))
    t.store(h(1), h(2), h(3), h(4))  # h(1) on disk
    pin = t.pool.pin([h(3)])
    writing = t.pool.reserve([h(5)], NUM_LAYERS, LAYER_BYTES)
    assert t.pool.locate(h(1)) is Tier.DISK
    dropped = t.pool.discard([h(1), h(2), h(3), h(5), h(9)])
    assert dropped == [h(1), h(2)]
    assert [t.pool.locate(h(i)) for i in (1, 2, 3, 4)] == [None, None, Tier.MEMORY, Tier.MEMORY]
    assert not any(tmp_path.glob("*.kv"))  # h(1)'s file is gone
    assert t.evicted == []  # the caller knows: nothing to withdraw
    t.fill(writing.reservation_id, [h(5)])
    t.pool.commit(writing.reservation_id)
    t.pool.unpin(pin.pin_id)
    assert sorted(b for b, _, _ in t.pool.holdings()) == [h(3), h(4), h(5)]
    assert_no_leaks(t.pool)
