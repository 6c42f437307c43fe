"""The worker side of layer migration: one agent per worker executes the coordinator's calls.

Lifecycle of a migration on a worker (the RPCs of migration.proto, one method each):

- DONOR: ``prepare`` (record, answer digests) -> ``copy_kv`` (any number of times: what the
  helper lacks, while serving) -> ``switch`` (the pause: last delta, then the split layout with
  a ``DataStagePort``) -> ``activate`` (optionally drop the layers) -> ``revert`` (layers back,
  KV back, local layout) -> ``release``. ``abort`` from anywhere: every layer local again, the
  sequences whose KV is on the helper recompute.
- HELPER: ``prepare`` (check digests, host the range, serve it on the data plane through
  ``MigrationHost``) -> the donor's data-plane messages -> ``release`` or ``abort`` (drop it).

This class keeps the records, the calls of every role and the link to the helper; the donor's
calls of a ``layers`` migration are ``LayerAgent``'s (layer_agent.py), those of an ``attention``
migration ``AttentionAgent``'s (attention_agent.py).

Every engine change runs on the engine thread through ``engine_call`` (between two steps);
data-plane exchanges run on this agent's event loop. Only the agent changes a record's state.
Leases: every call for a migration extends it; ``check`` (run every ``check_interval_s`` by
``run``) aborts the migrations whose lease ran out, and the donor falls back on its own when its
port reports the helper unreachable (the engine has already run or failed that step).

A stopping worker (``begin_drain``, on SIGTERM) refuses new migrations, says so in every
``RenewLease`` reply (the coordinator then reverts or aborts its migrations), and its drain
waits while ``holds_migrations``: so its peer never falls back because it went.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from services.common.errors import (
    AlreadyExistsError,
    DependencyUnavailableError,
    InvalidRequestError,
    RequestNotFoundError,
    ShuttingDownError,
)
from services.common.limits import clip_reason
from services.common.migration_states import MigrationState
from services.engine.engine import Engine
from services.engine.snapshot import EngineSnapshot
from services.migration import donor, weights
from services.migration.attention_agent import AttentionAgent, AttentionSelection
from services.migration.host import MigrationHost
from services.migration.layer_agent import LayerAgent
from services.migration.link import HelperLink
from services.migration.own_layers import OwnLayers
from services.migration.records import (
    KV_IMPORTS,
    KV_MESSAGES,
    SWITCHED,
    AgentConfig,
    MigrationRecord,
    Peer,
    Role,
)
from services.rpc import dataplane

log = logging.getLogger(__name__)
T = TypeVar("T")
EngineCall = Callable[[Callable[[Engine], T]], Awaitable[T]]
DEFAULT_CONFIG = AgentConfig()


class MigrationAgent:
    def __init__(
        self,
        engine_call: EngineCall[Any],
        snapshot: Callable[[], EngineSnapshot],
        config: AgentConfig = DEFAULT_CONFIG,
        data_kind: str = "",
        clock: Callable[[], float] = time.monotonic,
        donor_refusal: str = "",
    ) -> None:
        self.engine_call = engine_call
        self.donor_refusal = donor_refusal  # non-empty: why this worker cannot be a donor
        self.snapshot = snapshot
        self.config = config
        self.clock = clock
        self.data_kind = data_kind
        self.data_address = ""  # set by ``serve_data``
        self.host = MigrationHost(self._observed)
        self.records: dict[str, MigrationRecord] = {}
        self.own = OwnLayers()  # digests, KV block size: ``learn_layers``
        self._data_server: dataplane.DataServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._falling_back: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False  # ``begin_drain``
        self.layers = LayerAgent(self)  # the donor's calls of the `layers` kind
        self.attention = AttentionAgent(self)  # the `attention` kind (attention_agent.py)
        self.host.attention = self.attention.host

    # -- lifecycle ----------------------------------------------------------------------

    async def serve_data(
        self, host: str = "127.0.0.1", port: int = 0, advertise: str | None = None
    ) -> str:
        """Start the migration data plane (the helper side); the address its donors are told
        (``advertise``, when something in between forwards it, else the one bound)."""
        self._loop = asyncio.get_running_loop()
        if self.data_kind:
            handle = self.host.handle
            self._data_server = await dataplane.listen(self.data_kind, handle, host, port)
            self.data_address = advertise or self._data_server.address
        return self.data_address

    async def run(self) -> None:
        """Learn this worker's layers (in the background: ~0.4 s of digests for smollm2, more
        for a larger model, while the worker already serves), then check leases until
        cancelled."""
        try:
            await self.learn_layers()
        except Exception as e:  # noqa: BLE001 - each prepare then asks the engine itself
            log.warning("layer digests not learnt: %r", e)
        while True:
            await asyncio.sleep(self.config.check_interval_s)
            await self.check()

    def begin_drain(self) -> None:
        """The worker is stopping: no new migration; the coordinator is told at its next
        lease renewal and ends those held (module docstring)."""
        self.draining = True

    def holds_migrations(self) -> bool:
        return any(not record.state.terminal for record in self.records.values())

    async def close(self) -> None:
        for record in list(self.records.values()):
            if not record.state.terminal:
                try:
                    await self._end(record, MigrationState.ABORTED, "the worker is stopping")
                except Exception as e:  # noqa: BLE001 - a dead engine loop: nothing to undo
                    log.warning("migration %s: not undone at stop: %r", record.migration_id, e)
        if self._data_server is not None:
            await self._data_server.stop()
        self.host.close()
        self.attention.host.close()

    # -- every role -----------------------------------------------------------------------

    async def prepare(
        self,
        migration_id: str,
        role: Role,
        layers: range,
        donor_peer: Peer,
        helper_peer: Peer,
        lease_s: float | None,
        fingerprint: str = "",
        digests: dict[int, str] | None = None,
        num_hosted_blocks: int = 0,
        attention: AttentionSelection | None = None,
    ) -> tuple[MigrationRecord, str, dict[int, str], list[int]]:
        """The record, this worker's fingerprint and digests of ``layers``, and (helper) the
        layers whose weights it lacks: hosted all the same, awaiting them (``copy_weights``)."""
        self._loop = asyncio.get_running_loop()
        if not migration_id:
            raise InvalidRequestError("migration_id is empty")
        if self.draining:
            raise ShuttingDownError("this worker is stopping: it takes no new migration")
        if role is Role.DONOR and self.donor_refusal:
            raise InvalidRequestError(self.donor_refusal)
        if migration_id in self.records:
            raise AlreadyExistsError(f"migration {migration_id!r} is already here")
        if attention is not None:
            return await self.attention.prepare(
                migration_id, role, donor_peer, helper_peer, lease_s, fingerprint, attention
            )
        known = self.own.described(layers)  # without a visit once ``learn_layers`` has run
        mine_fp, mine = known or await self.engine_call(lambda e: self.own.describe(e, layers))
        lease = self._lease(lease_s)
        record = MigrationRecord(
            migration_id,
            role,
            layers.start,
            layers.stop,
            donor_peer,
            helper_peer,
            lease,
            self.clock() + lease,
        )
        needed: list[int] = []
        if role is Role.HELPER:
            needed = weights.needed(layers, mine_fp, mine, fingerprint, digests or {})
            # Recorded first: the engine call runs on if this call is cancelled (an abort), and
            # the Abort or the lease that follows must find the migration to undo the hosting.
            self._add(record)
            try:
                hosted = await self.engine_call(
                    lambda e: weights.host_range(
                        e, migration_id, layers, num_hosted_blocks, fingerprint, needed,
                        digests or {},
                    )
                )  # fmt: skip
            except Exception:
                self.records.pop(migration_id, None)  # refused: nothing hosted or recorded
                raise
            if not record.state.terminal:  # else an abort's unhost ran after the hosting
                self.host.add(migration_id, *hosted)
            return record, mine_fp, mine, needed
        self._add(record)
        return record, mine_fp, mine, needed

    async def learn_layers(self) -> None:
        """Learn this worker's layers once (``OwnLayers``), so that ``prepare`` and a copy
        stage answer without a visit of the engine thread."""
        await self.engine_call(self.own.learn)

    def kv_bound(self, layers: range) -> int | None:
        """At most how many bytes of KV of ``layers`` this worker's sequences hold (no visit);
        None before ``learn_layers``."""
        return self.own.kv_bound(self.snapshot(), layers)

    def renew(self, migration_id: str, lease_s: float | None) -> MigrationRecord:
        record = self.get(migration_id)
        if not record.state.terminal:
            if lease_s is not None:
                record.lease_s = self._lease(lease_s)
            record.expires_at = self.clock() + record.lease_s
        return record

    def get(self, migration_id: str) -> MigrationRecord:
        record = self.records.get(migration_id)
        if record is None:
            raise RequestNotFoundError(f"no migration {migration_id!r} here")
        return record

    def list(self) -> list[MigrationRecord]:
        return list(self.records.values())

    async def release(self, migration_id: str) -> MigrationRecord | None:
        record = self.records.get(migration_id)
        if record is None:
            return None
        if record.role is Role.DONOR and record.state in SWITCHED:
            raise InvalidRequestError(
                f"migration {migration_id} is {record.state.value} here: revert or abort it"
            )
        if not record.state.terminal:
            await self._end(record, MigrationState.DONE, "")
        return record

    async def abort(self, migration_id: str, reason: str) -> MigrationRecord | None:
        record = self.records.get(migration_id)
        if record is None:
            return None
        if not record.state.terminal:
            await self._end(record, MigrationState.ABORTED, reason or "aborted on request")
        return record

    async def check(self) -> None:
        """Abort the migrations whose lease ran out."""
        now = self.clock()
        for record in list(self.records.values()):
            if not record.state.terminal and record.expires_at <= now:
                try:
                    await self._end(
                        record, MigrationState.ABORTED, "lease expired: no coordinator call"
                    )
                except Exception as e:  # noqa: BLE001 - retried at the next check
                    log.warning("migration %s: lease abort failed: %r", record.migration_id, e)

    async def _end(self, record: MigrationRecord, state: MigrationState, reason: str) -> None:
        """Undo what this worker holds for ``record`` (raises, changing nothing, if it cannot)."""
        if self.attention.owns(record.migration_id):
            await self.attention.end(record)
        elif record.role is Role.DONOR:
            if record.port is not None or record.weights_dropped:
                port = record.port
                requeued = await self.engine_call(donor.fall_back)
                # with those the engine sent back itself when the port failed a step
                evicted = port.num_evicted if port is not None else 0
                record.num_requeued_at_end += len(requeued) + evicted
            await self._disconnect(record)
        else:
            self.host.remove(record.migration_id)
            await self.engine_call(lambda e: self._unhost(e, record.migration_id))
        record.state, record.reason = state, clip_reason(reason)
        record.weights_dropped = False
        self._trim()

    @staticmethod
    def _unhost(engine: Engine, migration_id: str) -> None:
        if migration_id in engine.migration.hosted_layers:
            engine.migration.release_hosted_layers(migration_id)

    # -- donor (the layers kind in layer_agent.py, the attention kind in attention_agent.py) --

    async def copy_weights(
        self, migration_id: str, helper: Peer, layers: list[int]
    ) -> tuple[int, float]:
        """Ship ``layers``' weights to a helper lacking them (weights.py): (bytes, seconds)."""
        return await self.layers.copy_weights(migration_id, helper, layers)

    async def copy_kv(self, migration_id: str, helper: Peer) -> tuple[int, int, float]:
        """One stage of the copy: (bytes, sequences, seconds)."""
        if self.attention.owns(migration_id):
            return await self.attention.copy_kv(migration_id, helper)
        return await self.layers.copy_kv(migration_id, helper)

    async def switch(
        self, migration_id: str, num_micro_batches: int, stage_timeout_s: float | None
    ) -> donor.PauseResult:
        if self.attention.owns(migration_id):
            return await self.attention.switch(migration_id, stage_timeout_s)
        return await self.layers.switch(migration_id, num_micro_batches, stage_timeout_s)

    async def activate(self, migration_id: str, drop_weights: bool) -> tuple[int, int]:
        """(blocks before, blocks after) of the donor's pool."""
        if self.attention.owns(migration_id):
            return await self.attention.activate(migration_id)
        return await self.layers.activate(migration_id, drop_weights)

    async def revert(self, migration_id: str) -> donor.PauseResult:
        """Layers (or blocks) back; the result counts every byte copied back."""
        record = self.records.get(migration_id)
        if record is not None and record.helper_lost:
            # A donor falls back on its own once its helper is lost (``_port_failed``): a
            # revert must not run beside that fall-back, and after it nothing is left to take
            # back. Either way the helper cannot give the KV back: UNAVAILABLE, every time.
            raise DependencyUnavailableError(
                f"migration {migration_id}: the helper cannot give the KV back: it was lost "
                f"({record.helper_lost}); the donor runs every layer itself again"
            )
        if self.attention.owns(migration_id):
            return await self.attention.revert(migration_id)
        return await self.layers.revert(migration_id)

    def _port_failed(self, migration_id: str, reason: str) -> None:
        """On the loop: the helper is unreachable; run every layer here again (once)."""
        record = self.records.get(migration_id)
        if record is None or record.state not in SWITCHED or migration_id in self._falling_back:
            return
        self._falling_back.add(migration_id)
        record.helper_lost = reason

        async def fall_back() -> None:
            try:
                await self._end(record, MigrationState.ABORTED, reason)
            except Exception as e:  # noqa: BLE001 - the lease check tries again
                log.warning("migration %s: fall back failed: %r", migration_id, e)
            finally:
                self._falling_back.discard(migration_id)

        task = asyncio.get_running_loop().create_task(fall_back())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settled(self) -> None:
        """Wait for the fall-backs in progress (tests: instead of sleeping)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    # -- plumbing --------------------------------------------------------------------------

    def _donor(self, migration_id: str, *states: MigrationState) -> MigrationRecord:
        record = self.renew(migration_id, None)
        if record.role is not Role.DONOR or record.state not in states:
            raise InvalidRequestError(
                f"migration {migration_id} is {record.state.value} here as "
                f"{record.role.value}; this call needs a donor in "
                f"{', '.join(s.value for s in states)}"
            )
        return record

    def _lease(self, lease_s: float | None) -> float:
        lease = self.config.default_lease_s if lease_s is None else lease_s
        if lease <= 0:
            raise InvalidRequestError(f"lease must be positive, got {lease}s")
        return min(lease, self.config.max_lease_s)

    def _add(self, record: MigrationRecord) -> None:
        self.records[record.migration_id] = record
        self._trim()

    def _trim(self) -> None:
        ended = [r for r in self.records.values() if r.state.terminal]
        for record in ended[: max(0, len(ended) - self.config.keep_ended)]:
            del self.records[record.migration_id]

    def _blocking(self, coro: Awaitable[T]) -> T:
        """From the engine thread: run ``coro`` on the agent's loop and wait for it."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return future.result(timeout=self.config.data_timeout_s * 2)

    async def _connect(self, record: MigrationRecord, helper: Peer) -> HelperLink:
        if record.link is not None:
            if helper.data_address and helper.data_address != record.helper.data_address:
                raise InvalidRequestError("the helper's data plane changed mid-migration")
            return record.link
        record.link = await HelperLink.connect(
            helper, record.migration_id, self.config.data_timeout_s, record.moved
        )
        record.helper = helper
        return record.link

    @staticmethod
    def _link(record: MigrationRecord) -> HelperLink:
        if record.helper_lost:  # a call that passed its state check before the fall-back
            helper = record.helper
            raise DependencyUnavailableError(
                f"migration {record.migration_id}: helper {helper.worker_id or '?'} at "
                f"{helper.data_address} is lost ({record.helper_lost}); the donor runs every "
                "layer itself again"
            )
        if record.link is not None:
            return record.link
        raise InvalidRequestError(f"migration {record.migration_id}: CopyKV first (no helper)")

    async def _disconnect(self, record: MigrationRecord) -> None:
        if (port := record.port) is not None:
            await port.drain()  # KV reads of handoffs in flight finish first
            port.close()
            if record.port is port:  # a concurrent disconnect (fall-back, revert) may be first
                record.port = None
        if record.link is not None:
            link, record.link = record.link, None
            await link.close()

    def _observed(self, migration_id: str, kind: str, nbytes: int, ids: tuple[str, ...]) -> None:
        """The host handled a donor's message: the helper's view follows it."""
        record = self.records.get(migration_id)
        if record is None or record.state.terminal:
            return
        if kind in KV_MESSAGES:
            record.moved(nbytes, ids)
        if kind in KV_IMPORTS and record.state is not MigrationState.PLANNED:
            return  # a copy stage, or (switched) a sequence imported since: the state stays
        nxt = {
            **dict.fromkeys(KV_IMPORTS, MigrationState.COPYING),
            "weights_import": MigrationState.COPYING,
            "stage_run": MigrationState.ACTIVE,
            "kv_export": MigrationState.REVERTING,
        }
        if kind in nxt:
            record.state = nxt[kind]
