"""The kvstore's host-memory block pool: bounded in bytes, two-phase writes, pinned reads, LRU.

A block is named by its chained content hash and holds ``num_layers`` layers of
``layer_bytes`` each, so a reader can fetch layer 0 of a run of blocks before layer 1. The
layers lie one after another in one buffer per block, allocated at the block's first write:
a reservation costs no time for its size, and nothing per layer beyond the bytes.

Block states; only ``BlockPool`` changes them:

    reserve() --> WRITING --commit()--> COMMITTED --eviction--> disk tier (if any) or gone
                     |                      ^                        |
              abort(), expire()             +------ pin() promotes --+
                     v
                   gone

Who calls what, when:

1. A writer calls ``reserve(hashes, num_layers, layer_bytes)``. It is given only the hashes
   it must write (``to_write``); hashes already stored, in memory or on disk, come back as
   ``existing`` and hashes an earlier reservation is writing as ``in_flight`` (the first
   reservation wins). Memory for ``to_write`` is taken now, evicting least recently used
   unpinned COMMITTED blocks, or ``ResourceExhaustedError`` is raised and nothing changed.
2. It fills every layer of every block with ``write`` (or receives into ``write_buffer``),
   then calls ``commit``, which returns the committed hashes for the caller to announce to
   the metadata service, or ``abort``.
3. A reader calls ``pin(hashes)``: the longest prefix held is pinned (blocks found only on
   disk are promoted back into memory, room permitting), ``read`` returns read-only views
   without copying, and ``unpin`` releases them.
4. The owner calls ``expire()`` periodically: reservations and pins older than their TTL are
   dropped, so a writer or reader that dies cannot hold memory or blocks forever. ``expire``
   never removes a committed block.
A committed block carries a checksum (services/kvstore/checksum.py), verified when ``pin``
finds it in memory or promotes it from disk: a block whose bytes changed is dropped and read as
a miss (``num_corrupt`` counts them), so it is recomputed rather than served.

5. ``on_evict(hashes)`` is called synchronously, once at the end of a ``reserve`` or ``pin``
   that made blocks unavailable from this store: dropped from memory with no disk tier,
   dropped by the disk tier's own bound, or found corrupt on disk. A block moved to disk is
   still served and is not reported. The callback must not call back into the pool; the
   metadata layer queues the hashes and withdraws their entries.

Every ``reserve`` and ``pin`` opens an entry, even one with nothing to write or pin, that ends
in ``commit``/``abort``, ``unpin`` or ``expire``. Ids count from 1, separately for each.

Invariants:
- ``num_bytes_used`` is what every block in memory is charged, WRITING included: its payload
  plus ``BLOCK_OVERHEAD_BYTES`` (``charged_bytes``), so it bounds the host memory the pool
  really holds; it never exceeds ``capacity_bytes``; use (the LRU order) is a commit, a
  promotion or a pin;
- a hash lives in at most one tier; a pinned or WRITING block is never evicted;
- buffers are never reused: a view held past its pin's expiry reads stale but intact bytes.

Single-threaded: every method is called from one asyncio event loop.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.common.errors import (
    ConfigError,
    InvalidRequestError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from services.common.hashing import BlockHash
from services.common.limits import check_block_hashes
from services.kvstore.checksum import block_checksum, intact
from services.kvstore.disk import DiskTier

log = logging.getLogger(__name__)

# The most layers a block may have (INVALID_ARGUMENT beyond). Models have far fewer (Llama 3
# 405B: 126, DeepSeek-V3: 61); the bound keeps the per-layer work of one call small (a write
# of every layer, the written-layer mask, a Pin reply's num_layers).
MAX_NUM_LAYERS = 1024
# Host memory a block costs beyond its payload, charged against ``capacity_bytes`` with it, so
# that blocks of any shape hold no more memory than the pool is allowed. Measured on CPython
# 3.11 (tests/kvstore/test_reserve_memory.py checks it): ~440 bytes of RSS per stored one-layer
# block, up to ~550 with MAX_NUM_LAYERS (the written-layer mask) - the ``Block``, its buffer's
# bytearray header, its block-table and LRU entries, its hash and checksum objects. Doubled for
# allocator rounding and dict tables just after a resize; next to a real block (tens of KiB per
# layer) it is noise.
BLOCK_OVERHEAD_BYTES = 1024


def charged_bytes(num_layers: int, layer_bytes: int) -> int:
    """What one block counts against ``capacity_bytes``: payload plus its fixed overhead."""
    return num_layers * layer_bytes + BLOCK_OVERHEAD_BYTES


@dataclass(frozen=True)
class PoolConfig:
    capacity_bytes: int
    reservation_ttl_s: float = 30.0
    pin_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if self.capacity_bytes <= 0:
            raise ConfigError(f"capacity_bytes must be positive, got {self.capacity_bytes}")
        for name in ("reservation_ttl_s", "pin_ttl_s"):  # NaN too: it never compares <= 0
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be positive, got {value}")


class BlockStatus(enum.Enum):
    WRITING = enum.auto()  # reserve() made it; commit() or abort()/expire() end it
    COMMITTED = enum.auto()  # readable; eviction or nothing ends it


class Tier(enum.Enum):
    MEMORY = "memory"
    DISK = "disk"


@dataclass(slots=True)
class Block:
    block_hash: BlockHash
    num_layers: int
    layer_bytes: int
    status: BlockStatus
    reservation_id: int | None = None  # the writer while WRITING
    num_pins: int = 0
    data: bytearray | None = None  # the layers in order; None until the first write
    written_mask: int = 0  # bit ``l`` set once layer ``l`` was written
    checksum: int | None = None  # set at commit

    @property
    def num_bytes(self) -> int:
        """The payload (what the metadata announces and the disk stores)."""
        return self.num_layers * self.layer_bytes

    @property
    def num_charged_bytes(self) -> int:
        return charged_bytes(self.num_layers, self.layer_bytes)

    @property
    def fully_written(self) -> bool:
        return self.written_mask == (1 << self.num_layers) - 1

    def layer(self, layer: int) -> memoryview:
        """A writable view of one layer (no copy); allocates the block's buffer, zeroed, the
        first time, so a reservation costs time only as it is written."""
        if self.data is None:
            self.data = bytearray(self.num_bytes)
        start = layer * self.layer_bytes
        return memoryview(self.data)[start : start + self.layer_bytes]

    @property
    def layers(self) -> list[memoryview]:
        """Every layer, as writable views (what the disk tier stores)."""
        return [self.layer(i) for i in range(self.num_layers)]


@dataclass(frozen=True)
class WriteReservation:
    reservation_id: int
    to_write: tuple[BlockHash, ...]  # this writer's job, in request order
    existing: tuple[BlockHash, ...]  # already stored (memory or disk)
    in_flight: tuple[BlockHash, ...]  # an earlier reservation is writing them
    expires_at: float


@dataclass(frozen=True)
class ReadPin:
    pin_id: int
    hashes: tuple[BlockHash, ...]  # the pinned prefix of the requested hashes
    expires_at: float


@dataclass(frozen=True)
class Expired:
    reservation_ids: tuple[int, ...]
    pin_ids: tuple[int, ...]


@dataclass(frozen=True)
class PoolStats:
    capacity_bytes: int
    num_bytes_used: int
    num_blocks: int
    num_committed_blocks: int
    num_pinned_blocks: int
    num_reservations: int
    num_pins: int
    num_disk_blocks: int
    num_disk_bytes: int
    num_evicted: int
    num_promoted: int


class BlockPool:
    def __init__(
        self,
        config: PoolConfig,
        disk: DiskTier | None = None,
        on_evict: Callable[[list[BlockHash]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.disk = disk
        # Public: the metadata layer that withdraws evicted blocks is built after the pool.
        self.on_evict = on_evict
        self._clock = clock
        self.blocks: dict[BlockHash, Block] = {}
        self._lru: OrderedDict[BlockHash, None] = OrderedDict()  # COMMITTED, least recent first
        self._reservations: dict[int, WriteReservation] = {}
        self._pins: dict[int, ReadPin] = {}
        self._reservation_ids = itertools.count(1)
        self._pin_ids = itertools.count(1)
        self.num_bytes_used = 0
        self.num_evicted = 0
        self.num_promoted = 0
        self.num_corrupt = 0
        self._disk_checksums: dict[BlockHash, int | None] = {}  # blocks the disk tier holds

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_reservations(self) -> int:
        return len(self._reservations)

    @property
    def num_pins(self) -> int:
        return len(self._pins)

    def lru_order(self) -> list[BlockHash]:
        """Committed blocks in memory, least recently used first."""
        return list(self._lru)

    def locate(self, block_hash: BlockHash) -> Tier | None:
        """Where a readable copy is; None for a miss or a block still being written."""
        block = self.blocks.get(block_hash)
        if block is not None:
            return Tier.MEMORY if block.status is BlockStatus.COMMITTED else None
        if self.disk is not None and block_hash in self.disk:
            return Tier.DISK
        return None

    def contains(self, block_hash: BlockHash) -> bool:
        return self.locate(block_hash) is not None

    def holdings(self) -> list[tuple[BlockHash, int, int]]:
        """``(hash, payload bytes, num_layers)`` of every readable block, in memory and on disk:
        what the node announces in full when it (re)joins the index. A block only on disk is
        served too (``pin`` promotes it), so it is announced as well."""
        held = [(h, b.num_bytes, b.num_layers) for h, b in self.blocks.items() if h in self._lru]
        return held + (self.disk.entries() if self.disk is not None else [])

    def discard(self, hashes: Sequence[BlockHash]) -> list[BlockHash]:
        """Drops the committed copies of ``hashes`` no reader holds, from either tier; returns
        the hashes dropped. A pinned copy stays until its readers are done (and the LRU takes
        it); a block being written, or not held, is left alone. ``on_evict`` is not called: the
        caller knows these blocks are not indexed as this node's."""
        dropped = []
        for h in hashes:
            block = self.blocks.get(h)
            if block is not None:
                if block.status is BlockStatus.COMMITTED and block.num_pins == 0:
                    self._remove(block)
                    dropped.append(h)
            elif self.disk is not None and h in self.disk:
                self.disk.discard(h)
                self._disk_checksums.pop(h, None)
                dropped.append(h)
        return dropped

    def stats(self) -> PoolStats:
        return PoolStats(
            capacity_bytes=self.config.capacity_bytes,
            num_bytes_used=self.num_bytes_used,
            num_blocks=len(self.blocks),
            num_committed_blocks=len(self._lru),
            num_pinned_blocks=sum(1 for b in self.blocks.values() if b.num_pins),
            num_reservations=len(self._reservations),
            num_pins=len(self._pins),
            num_disk_blocks=len(self.disk) if self.disk is not None else 0,
            num_disk_bytes=self.disk.num_bytes if self.disk is not None else 0,
            num_evicted=self.num_evicted,
            num_promoted=self.num_promoted,
        )

    # -- writes ---------------------------------------------------------------------------

    def reserve(
        self, hashes: Sequence[BlockHash], num_layers: int, layer_bytes: int
    ) -> WriteReservation:
        _check_hashes(hashes)
        if len(set(hashes)) != len(hashes):
            raise InvalidRequestError("a reservation cannot name a block twice")
        if num_layers <= 0 or layer_bytes <= 0:
            raise InvalidRequestError(
                f"num_layers and layer_bytes must be positive, got {num_layers}, {layer_bytes}"
            )
        if num_layers > MAX_NUM_LAYERS:
            raise InvalidRequestError(
                f"num_layers is {num_layers}; at most {MAX_NUM_LAYERS} are allowed"
            )
        to_write, existing, in_flight = [], [], []
        for h in hashes:
            block = self.blocks.get(h)
            if block is not None and block.status is BlockStatus.WRITING:
                in_flight.append(h)
            elif self.contains(h):
                existing.append(h)
            else:
                to_write.append(h)
        num_bytes = len(to_write) * charged_bytes(num_layers, layer_bytes)
        victims = self._victims(num_bytes)
        if victims is None:
            raise ResourceExhaustedError(
                f"cannot make room for {num_bytes} bytes: {self.num_bytes_used} of "
                f"{self.config.capacity_bytes} used, the rest pinned or being written"
            )
        gone = self._evict(victims)
        reservation = WriteReservation(
            next(self._reservation_ids),
            tuple(to_write),
            tuple(existing),
            tuple(in_flight),
            self._clock() + self.config.reservation_ttl_s,
        )
        rid = reservation.reservation_id
        for h in to_write:
            self._add(Block(h, num_layers, layer_bytes, BlockStatus.WRITING, rid))
        self._reservations[reservation.reservation_id] = reservation
        self._announce(gone)
        return reservation

    def write(
        self,
        reservation_id: int,
        block_hash: BlockHash,
        layer: int,
        data: bytes | bytearray | memoryview,
    ) -> None:
        block = self._block_to_write(reservation_id, block_hash, layer)
        source = memoryview(data).cast("B")
        if source.nbytes != block.layer_bytes:
            raise InvalidRequestError(
                f"layer {layer} of {block_hash.hex()} is {block.layer_bytes} bytes, "
                f"got {source.nbytes}"
            )
        block.layer(layer)[:] = source
        block.written_mask |= 1 << layer

    def write_buffer(self, reservation_id: int, block_hash: BlockHash, layer: int) -> memoryview:
        """A writable view of one layer for a data plane to receive into; counts as written."""
        block = self._block_to_write(reservation_id, block_hash, layer)
        block.written_mask |= 1 << layer
        return block.layer(layer)

    def commit(self, reservation_id: int) -> list[BlockHash]:
        """Make the reservation's blocks readable; returns them for the caller to announce."""
        reservation = self._reservation(reservation_id)
        blocks = [self.blocks[h] for h in reservation.to_write]
        unfinished = [b for b in blocks if not b.fully_written]
        if unfinished:
            first = unfinished[0]
            raise InvalidRequestError(
                f"reservation {reservation_id}: {len(unfinished)} of its {len(blocks)} blocks "
                f"not fully written (the first, {first.block_hash.hex()}, has "
                f"{first.written_mask.bit_count()} of {first.num_layers} layers)"
            )
        del self._reservations[reservation_id]
        for block in blocks:
            block.status = BlockStatus.COMMITTED
            block.reservation_id = None
            # CRC-32 chains: one pass over the buffer is one over the layers in order.
            block.checksum = block_checksum((block.data,))
            self._lru[block.block_hash] = None
        return list(reservation.to_write)

    def abort(self, reservation_id: int) -> None:
        reservation = self._reservation(reservation_id)
        del self._reservations[reservation_id]
        for h in reservation.to_write:
            self._remove(self.blocks[h])

    # -- reads ----------------------------------------------------------------------------

    def pin(self, hashes: Sequence[BlockHash]) -> ReadPin:
        """Pin the longest prefix of ``hashes`` held here; stops at the first miss, and at the
        first block whose shape (layers, layer bytes) differs from the first's: a pin's reads
        are ``num_blocks × layer_bytes`` of one shape (a writer outside the model's hashing
        could mix them: probe, session 43)."""
        _check_hashes(hashes)
        pinned: list[BlockHash] = []
        gone: list[BlockHash] = []
        shape = None
        for h in hashes:
            block = self._readable(h, gone)
            if block is None:
                break
            if shape is None:
                shape = (block.num_layers, block.layer_bytes)
            elif (block.num_layers, block.layer_bytes) != shape:
                break
            block.num_pins += 1
            self._lru.move_to_end(h)
            pinned.append(h)
        pin = ReadPin(next(self._pin_ids), tuple(pinned), self._clock() + self.config.pin_ttl_s)
        self._pins[pin.pin_id] = pin
        self._announce(gone)
        return pin

    def read(self, pin_id: int, block_hash: BlockHash, layer: int) -> memoryview:
        """A read-only view of one layer of a pinned block (no copy)."""
        pin = self._pin(pin_id)
        if block_hash not in pin.hashes:
            raise InvalidRequestError(f"pin {pin_id} does not hold {block_hash.hex()}")
        block = self.blocks[block_hash]
        _check_layer(block, layer)
        return block.layer(layer).toreadonly()

    def unpin(self, pin_id: int) -> None:
        pin = self._pin(pin_id)
        del self._pins[pin_id]
        for h in pin.hashes:
            self.blocks[h].num_pins -= 1

    def expire(self) -> Expired:
        """Abort reservations and release pins past their TTL."""
        now = self._clock()
        reservation_ids = tuple(
            r.reservation_id for r in self._reservations.values() if r.expires_at <= now
        )
        pin_ids = tuple(p.pin_id for p in self._pins.values() if p.expires_at <= now)
        for reservation_id in reservation_ids:
            self.abort(reservation_id)
        for pin_id in pin_ids:
            self.unpin(pin_id)
        return Expired(reservation_ids, pin_ids)

    # -- helpers --------------------------------------------------------------------------

    def _reservation(self, reservation_id: int) -> WriteReservation:
        reservation = self._reservations.get(reservation_id)
        if reservation is None:
            raise RequestNotFoundError(f"no open reservation {reservation_id}")
        return reservation

    def _pin(self, pin_id: int) -> ReadPin:
        pin = self._pins.get(pin_id)
        if pin is None:
            raise RequestNotFoundError(f"no open pin {pin_id}")
        return pin

    def _block_to_write(self, reservation_id: int, block_hash: BlockHash, layer: int) -> Block:
        self._reservation(reservation_id)
        block = self.blocks.get(block_hash)
        if block is None or block.reservation_id != reservation_id:
            raise InvalidRequestError(
                f"reservation {reservation_id} is not writing {block_hash.hex()}"
            )
        _check_layer(block, layer)
        return block

    def _readable(self, block_hash: BlockHash, gone: list[BlockHash]) -> Block | None:
        """The committed block in memory, promoted from disk if need be; None for a miss."""
        block = self.blocks.get(block_hash)
        if block is not None:
            if block.status is not BlockStatus.COMMITTED:
                return None
            return block if self._intact(block, gone) else None
        if self.disk is None or block_hash not in self.disk:
            return None
        return self._promote(self.disk, block_hash, gone)

    def _promote(
        self, disk: DiskTier, block_hash: BlockHash, gone: list[BlockHash]
    ) -> Block | None:
        stored = disk.get(block_hash)
        checksum = self._disk_checksums.pop(block_hash, None)
        if stored is None:  # unreadable: the disk tier deleted it
            gone.append(block_hash)
            return None
        num_layers, data = stored
        if not intact((data,), checksum):
            log.warning("kvstore: block %s changed on disk; dropped", block_hash.hex())
            self.num_corrupt += 1
            disk.discard(block_hash)
            gone.append(block_hash)
            return None
        layer_bytes = len(data) // num_layers
        block = Block(
            block_hash, num_layers, layer_bytes, BlockStatus.COMMITTED, data=data, checksum=checksum
        )
        victims = self._victims(block.num_charged_bytes)
        if victims is None:
            return None
        # Off the disk before evicting to it, so the disk's own bound cannot drop it.
        disk.discard(block_hash)
        gone.extend(self._evict(victims))
        self._add(block)
        self._lru[block_hash] = None
        self.num_promoted += 1
        return block

    def _victims(self, num_bytes: int) -> list[Block] | None:
        """Least recently used unpinned committed blocks freeing ``num_bytes``; None if none do."""
        free = self.config.capacity_bytes - self.num_bytes_used
        victims: list[Block] = []
        for h in self._lru:
            if free >= num_bytes:
                break
            block = self.blocks[h]
            if block.num_pins == 0:
                victims.append(block)
                free += block.num_charged_bytes
        return victims if free >= num_bytes else None

    def _evict(self, victims: list[Block]) -> list[BlockHash]:
        """Move victims out of memory; returns the hashes no tier holds any more."""
        gone: list[BlockHash] = []
        for block in victims:
            self._remove(block)
            self.num_evicted += 1
            if self.disk is None:
                gone.append(block.block_hash)
            else:
                self._disk_checksums[block.block_hash] = block.checksum
                dropped = self.disk.put(block.block_hash, block.layers)
                for h in dropped:
                    self._disk_checksums.pop(h, None)
                gone.extend(dropped)
        return gone

    def _intact(self, block: Block, gone: list[BlockHash]) -> bool:
        """Verifies a committed block in memory; a changed one is dropped (unless a reader
        holds it pinned: it stays until unpinned, and is never handed out again)."""
        if intact((block.data,), block.checksum):
            return True
        log.warning("kvstore: block %s changed in memory; dropped", block.block_hash.hex())
        self.num_corrupt += 1
        if block.num_pins == 0:
            self._remove(block)
            gone.append(block.block_hash)
        return False

    def _add(self, block: Block) -> None:
        self.blocks[block.block_hash] = block
        self.num_bytes_used += block.num_charged_bytes

    def _remove(self, block: Block) -> None:
        del self.blocks[block.block_hash]
        self._lru.pop(block.block_hash, None)
        self.num_bytes_used -= block.num_charged_bytes

    def _announce(self, gone: list[BlockHash]) -> None:
        if gone and self.on_evict is not None:
            self.on_evict(gone)


_check_hashes = check_block_hashes  # the one check (services/common/limits.py)


def _check_layer(block: Block, layer: int) -> None:
    if not 0 <= layer < block.num_layers:
        raise InvalidRequestError(
            f"layer {layer} out of range for {block.block_hash.hex()} ({block.num_layers} layers)"
        )
