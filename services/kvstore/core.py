"""One kvstore node's logic, without grpc (kvstore.proto has the wire lifecycle).

The node owns a ``BlockPool`` (host memory, optional disk tier) and keeps Redis in step with it
through a ``MetadataSession``:

1. ``commit`` makes a reservation's blocks readable, then announces them (an announce that
   fails while Redis is down is not lost: the session re-announces every holding on resync);
2. blocks the pool evicts are queued by ``on_evict`` and withdrawn by a background task, so a
   lookup may briefly name a block that is gone; ``pin`` then pins less, and the reader
   recomputes the rest — metadata may lag data, never the reverse for long;
3. ``expire`` runs every ``sweep_interval_s``: reservations and pins past their TTL are freed;
4. stopping (``begin_drain``, on SIGTERM): the node leaves Redis at once, so no lookup names its
   blocks from then on, and refuses new writes; the reads pinned before go on, and the node
   stops once none is left (``holds_work``) or its drain's time is up.

Data plane requests (``handle_data``) read one layer of a pin's blocks or write one layer of a
reservation's blocks; the payload is those blocks' bytes, block after block (each block's
layer one opaque slab: the KV wire layout of services/common/kv_wire.py, never looked into).

Every call that names block hashes checks them with ``check_block_hashes`` first (the one
check, services/common/limits.py), so Lookup, Pin, Reserve and writes accept the same hashes.
``unpin`` and ``abort`` are idempotent (kvstore.proto): an unknown, expired or already released
id is a no-op, since the caller only wants it gone. A pin of nothing and a reservation with
nothing to write (no hashes, or all stored or in flight) hold nothing and are id 0, so a caller
that got 0 can still unpin, or commit (of nothing) or abort, as after any other.

Single-threaded: every method runs on the node's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from services.common.errors import (
    ConfigError,
    InvalidRequestError,
    RequestNotFoundError,
    ShuttingDownError,
)
from services.common.hashing import BlockHash
from services.common.limits import check_block_hashes
from services.kvstore.metadata import (
    BlockEntry,
    MetadataSession,
    MetadataStore,
    MetadataUnavailableError,
    NodeInfo,
    NodeNotRegisteredError,
)
from services.kvstore.pool import BlockPool, PoolStats, ReadPin, WriteReservation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVStoreConfig:
    sweep_interval_s: float = 1.0
    heartbeat_interval_s: float = 1.0
    # How stale the live-node list a lookup returns may be (writers place blocks over it); it
    # spares every lookup a second Redis round trip.
    node_list_ttl_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("sweep_interval_s", "heartbeat_interval_s", "node_list_ttl_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class LookupResult:
    node_ids: list[str]  # per block of the longest cached prefix
    nodes: list[NodeInfo]  # every live node
    num_seen: int  # blocks from the first held or looked up before (>= len(node_ids))


@dataclass(frozen=True)
class PinResult:
    pin: ReadPin
    num_layers: int
    layer_bytes: int  # 0 when nothing is pinned


@dataclass(frozen=True)
class DataRead:
    pin_id: int
    layer: int
    num_blocks: int


@dataclass(frozen=True)
class DataWrite:
    reservation_id: int
    layer: int
    block_hashes: tuple[BlockHash, ...]
    num_layers: int = 1  # layers [layer, layer + num_layers), one after another


class KVStoreNode:
    """A pool plus its Redis metadata; see the module docstring for the flow."""

    def __init__(
        self,
        pool: BlockPool,
        metadata: MetadataStore,
        config: KVStoreConfig | None = None,
    ) -> None:
        self.pool = pool
        pool.on_evict = self.on_evict  # this node withdraws what its pool evicts
        self.metadata = metadata
        self.config = config or KVStoreConfig()
        self.node: NodeInfo | None = None  # known once the servers are bound: ``start``
        self.session: MetadataSession | None = None
        self._pinned: dict[int, tuple[BlockHash, ...]] = {}  # pin id -> its blocks
        self._nodes: list[NodeInfo] | None = None  # live nodes, as of ``_nodes_at``
        self._nodes_at = 0.0
        self._to_withdraw: list[BlockHash] = []
        self._withdraw_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.draining = False  # ``begin_drain``
        self.num_duplicates_dropped = 0  # ``drop_duplicates``

    def on_evict(self, hashes: list[BlockHash]) -> None:
        """The pool's eviction callback: queue the withdrawals (never calls into the pool)."""
        self._to_withdraw += hashes
        self._withdraw_wake.set()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, node: NodeInfo) -> None:
        """Registers ``node`` (this node's addresses) in Redis and starts the background work."""
        self.node = node
        self.session = MetadataSession(
            self.metadata,
            node,
            self.holdings,
            on_refused=self.drop_duplicates,
            interval_s=self.config.heartbeat_interval_s,
        )
        await self.session.start()
        self._tasks = [
            asyncio.create_task(self._sweep_loop(), name="kvstore-sweep"),
            asyncio.create_task(self._withdraw_loop(), name="kvstore-withdraw"),
        ]

    async def begin_drain(self) -> None:
        """Stopping (module docstring, 4): deregistered, so lookups skip this node's blocks."""
        self.draining = True
        if self.session is not None:
            await self.session.stop(deregister=True)

    def holds_work(self) -> bool:
        """A read is pinned here (its reader fetches, or its pin has not expired yet)."""
        return bool(self._pinned)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.session is not None:
            await self.session.stop(deregister=True)
        await self.metadata.close()

    def holdings(self) -> list[BlockEntry]:
        return [BlockEntry(*held) for held in self.pool.holdings()]

    def drop_duplicates(self, hashes: list[BlockHash]) -> None:
        """Another live node owns these blocks in the index (it announced them first): this
        node's copies could never be looked up, so they go (``MetadataStore.announce``)."""
        dropped = self.pool.discard(hashes)
        self.num_duplicates_dropped += len(dropped)
        log.info(
            "dropped %d of %d blocks another node holds in the index (%d pinned or gone)",
            len(dropped),
            len(hashes),
            len(hashes) - len(dropped),
        )

    # -- control plane ---------------------------------------------------------------------

    async def lookup(self, hashes: Sequence[BlockHash]) -> LookupResult:
        """The longest cached prefix's owners, the live nodes and how much of the chain was
        held or looked up before (``MetadataStore.lookup``; marks it looked up)."""
        check_block_hashes(hashes)
        locations, num_seen = await self.metadata.lookup(hashes)
        owners = [loc.node_id for loc in locations]
        return LookupResult(owners, await self._live_nodes(), num_seen)

    async def _live_nodes(self) -> list[NodeInfo]:
        now = time.monotonic()
        if self._nodes is None or now - self._nodes_at > self.config.node_list_ttl_s:
            self._nodes, self._nodes_at = await self.metadata.live_nodes(), now
        return self._nodes

    def pin(self, hashes: Sequence[BlockHash]) -> PinResult:
        check_block_hashes(hashes)
        pin = self.pool.pin(hashes)
        if not pin.hashes:  # nothing to hold: no pin, id 0 (kvstore.proto), none left to expire
            self.pool.unpin(pin.pin_id)
            return PinResult(replace(pin, pin_id=0), 0, 0)
        self._pinned[pin.pin_id] = pin.hashes
        first = self.pool.blocks[pin.hashes[0]]
        return PinResult(pin, first.num_layers, first.layer_bytes)

    def unpin(self, pin_id: int) -> None:
        self._pinned.pop(pin_id, None)
        with contextlib.suppress(RequestNotFoundError):
            self.pool.unpin(pin_id)

    def reserve(
        self, hashes: Sequence[BlockHash], num_layers: int, layer_bytes: int
    ) -> WriteReservation:
        check_block_hashes(hashes)
        if self.draining:
            raise ShuttingDownError("this kvstore node is stopping: it takes no new write")
        reservation = self.pool.reserve(hashes, num_layers, layer_bytes)
        if not reservation.to_write:  # nothing to write: no reservation, id 0, like a pin
            self.pool.abort(reservation.reservation_id)
            return replace(reservation, reservation_id=0)
        return reservation

    async def commit(self, reservation_id: int) -> int:
        if reservation_id == 0:  # the reservation of nothing to write (``reserve``)
            return 0
        committed = self.pool.commit(reservation_id)
        entries = [self._entry(h) for h in committed]
        if entries and not self.draining:  # a stopping node is out of the index for good
            try:
                refused = await self.metadata.announce(self.node, entries)
                if refused:
                    self.drop_duplicates(refused)
            except (MetadataUnavailableError, NodeNotRegisteredError) as exc:
                # Not lost: the session announces every holding when it next syncs.
                log.warning("announce of %d blocks deferred: %s", len(entries), exc)
        return len(committed)

    def abort(self, reservation_id: int) -> None:
        with contextlib.suppress(RequestNotFoundError):
            self.pool.abort(reservation_id)

    def stats(self) -> PoolStats:
        return self.pool.stats()

    def _entry(self, block_hash: BlockHash) -> BlockEntry:
        block = self.pool.blocks[block_hash]
        return BlockEntry(block_hash, block.num_bytes, block.num_layers)

    # -- data plane ------------------------------------------------------------------------

    def read(self, request: DataRead) -> bytes:
        hashes = self._pinned.get(request.pin_id)
        if hashes is None:
            raise RequestNotFoundError(f"no pin {request.pin_id} (expired or released)")
        if not 0 < request.num_blocks <= len(hashes):
            raise InvalidRequestError(
                f"pin {request.pin_id} holds {len(hashes)} blocks, {request.num_blocks} asked"
            )
        views = [
            self.pool.read(request.pin_id, h, request.layer) for h in hashes[: request.num_blocks]
        ]
        return b"".join(views)

    def write(self, request: DataWrite, payload: memoryview) -> int:
        check_block_hashes(request.block_hashes)
        n = len(request.block_hashes) * request.num_layers
        if n == 0 or len(payload) % n:
            raise InvalidRequestError(
                f"{len(payload)} bytes do not split into {request.num_layers} layers of "
                f"{len(request.block_hashes)} blocks"
            )
        size = len(payload) // n
        for i in range(n):
            layer, block = divmod(i, len(request.block_hashes))
            chunk = payload[i * size : (i + 1) * size]
            self.pool.write(
                request.reservation_id,
                request.block_hashes[block],
                request.layer + layer,
                chunk,
            )
        return len(payload)

    # -- background ------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            expired = self.pool.expire()
            for pin_id in expired.pin_ids:
                self._pinned.pop(pin_id, None)
            if expired.reservation_ids or expired.pin_ids:
                log.info(
                    "expired %d reservations, %d pins",
                    len(expired.reservation_ids),
                    len(expired.pin_ids),
                )

    async def _withdraw_loop(self) -> None:
        while True:
            await self._withdraw_wake.wait()
            self._withdraw_wake.clear()
            hashes, self._to_withdraw = self._to_withdraw, []
            try:
                await self.metadata.withdraw(self.node, hashes)
            except (MetadataUnavailableError, NodeNotRegisteredError) as exc:
                # Retried until it lands (a resync after a Redis restart also drops them, since
                # registering withdraws everything and only holdings are announced again).
                log.warning("withdraw of %d evicted blocks deferred: %s", len(hashes), exc)
                self._to_withdraw = hashes + self._to_withdraw
                await asyncio.sleep(self.config.heartbeat_interval_s)
                self._withdraw_wake.set()
