"""The worker side of layer migration: one agent per worker executes the coordinator's calls.

Lifecycle of a migration on a worker (the RPCs of migration.proto, one method each):

- DONOR: ``prepare`` (record, answer digests) -> ``copy_kv`` (any number of times: what the
  helper lacks, while serving) -> ``switch`` (the pause: last delta, then the split layout with
  a ``DataStagePort``) -> ``activate`` (optionally drop the layers) -> ``revert`` (layers back,
  KV back, local layout) -> ``release``. ``abort`` from anywhere: every layer local again, the
  sequences whose KV is on the helper recompute.
- HELPER: ``prepare`` (check digests, host the range, serve it on the data plane through
  ``MigrationHost``) -> the donor's data-plane messages -> ``release`` or ``abort`` (drop it).

Every engine change runs on the engine thread through ``engine_call`` (between two steps);
data-plane exchanges run on this agent's event loop. Only the agent changes a record's state.
Leases: every call for a migration extends it; ``check`` (run every ``check_interval_s`` by
``run``) aborts the migrations whose lease ran out, and the donor falls back on its own when its
port reports the helper unreachable (the engine has already run or failed that step).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from services.common.errors import (
    AlreadyExistsError,
    InvalidRequestError,
    RequestNotFoundError,
)
from services.common.migration_states import MigrationState
from services.engine.engine import Engine
from services.engine.snapshot import EngineSnapshot
from services.engine.stages import StageLayout
from services.migration import donor
from services.migration.host import MigrationHost
from services.migration.link import HelperLink
from services.migration.ports import DataStagePort
from services.migration.records import (
    SWITCHED,
    AgentConfig,
    MigrationRecord,
    Peer,
    Role,
    layer_digest,
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
        self._digests: dict[int, str] = {}
        self._data_server: dataplane.DataServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._falling_back: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------

    async def serve_data(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the migration data plane (the helper side); its address."""
        self._loop = asyncio.get_running_loop()
        if self.data_kind:
            self._data_server = dataplane.serve(self.data_kind, self.host.handle, host, port)
            await self._data_server.start()
            self.data_address = self._data_server.address
        return self.data_address

    async def run(self) -> None:
        """Check leases until cancelled."""
        while True:
            await asyncio.sleep(self.config.check_interval_s)
            await self.check()

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
    ) -> tuple[MigrationRecord, str, dict[int, str], list[int]]:
        """The record, this worker's fingerprint and digests of ``layers``, and (helper) the
        layers whose weights it lacks (then nothing is hosted and the record is ABORTED)."""
        self._loop = asyncio.get_running_loop()
        if not migration_id:
            raise InvalidRequestError("migration_id is empty")
        if role is Role.DONOR and self.donor_refusal:
            raise InvalidRequestError(self.donor_refusal)
        if migration_id in self.records:
            raise AlreadyExistsError(f"migration {migration_id!r} is already here")
        mine_fp, mine = await self.engine_call(lambda e: self._describe(e, layers))
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
            needed = self._weights_needed(layers, mine_fp, mine, fingerprint, digests or {})
            if needed:
                record.state, record.reason = (
                    MigrationState.ABORTED,
                    f"weights needed for layers {needed}",
                )
            else:
                await self._host(record, fingerprint, num_hosted_blocks)
        self._add(record)
        return record, mine_fp, mine, needed

    def _describe(self, engine: Engine, layers: range) -> tuple[str, dict[int, str]]:
        num_layers = engine.spec.num_layers
        if not 0 < layers.start < layers.stop == num_layers:
            raise InvalidRequestError(
                f"layers [{layers.start}, {layers.stop}): only [k, {num_layers}) with k >= 1 move"
            )
        for i in layers:
            if i not in self._digests and engine.model.holds_layer(i):
                self._digests[i] = layer_digest(engine.model.layers[i])
        return engine.fingerprint, {i: self._digests[i] for i in layers if i in self._digests}

    @staticmethod
    def _weights_needed(
        layers: range, fp: str, mine: dict[int, str], theirs_fp: str, theirs: dict[int, str]
    ) -> list[int]:
        if theirs_fp and theirs_fp != fp:
            return list(layers)  # another model or dtype: its KV never mixes with ours
        return [i for i in layers if i not in mine or (i in theirs and theirs[i] != mine[i])]

    async def _host(self, record: MigrationRecord, fingerprint: str, num_blocks: int) -> None:
        def host(engine: Engine) -> None:
            blocks = num_blocks or engine.block_manager.num_blocks
            fp = fingerprint or engine.fingerprint
            hosted = engine.migration.host_layers(
                record.migration_id, record.start, record.end, blocks, fp
            )
            self.host.add(record.migration_id, hosted)

        await self.engine_call(host)

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
        if record.role is Role.DONOR:
            if record.port is not None or record.weights_dropped:
                await self.engine_call(donor.fall_back)
            await self._disconnect(record)
        else:
            self.host.remove(record.migration_id)
            await self.engine_call(lambda e: self._unhost(e, record.migration_id))
        record.state, record.reason = state, reason
        record.weights_dropped = False
        self._trim()

    @staticmethod
    def _unhost(engine: Engine, migration_id: str) -> None:
        if migration_id in engine.migration.hosted_layers:
            engine.migration.release_hosted_layers(migration_id)

    # -- donor ----------------------------------------------------------------------------

    async def copy_kv(self, migration_id: str, helper: Peer) -> tuple[int, int, float]:
        """One stage of the copy: (bytes, sequences, seconds)."""
        record = self._donor(migration_id, MigrationState.PLANNED, MigrationState.COPYING)
        t0 = self.clock()
        await self._connect(record, helper)
        num_bytes, moved = await self._copy_stage(record)
        record.state = MigrationState.COPYING
        return num_bytes, moved, self.clock() - t0

    async def _copy_stage(self, record: MigrationRecord) -> tuple[int, int]:
        seqs = await self.engine_call(donor.running)
        held = await self._link(record).held(list(seqs))
        num_bytes, moved = 0, 0
        for rid in seqs:
            chunks = await self.engine_call(
                lambda e, rid=rid: donor.export_delta(e, rid, record.layers, held.get(rid, 0))
            )
            if chunks:
                num_bytes += await self._link(record).send(chunks)
                moved += 1
        return num_bytes, moved

    async def switch(
        self, migration_id: str, num_micro_batches: int, stage_timeout_s: float | None
    ) -> donor.PauseResult:
        record = self._donor(migration_id, MigrationState.PLANNED, MigrationState.COPYING)
        link = self._link(record)
        loop = asyncio.get_running_loop()
        await self._copy_stage(record)  # one more stage first: the pause sends only a step's KV
        held = await link.held(list(await self.engine_call(donor.running)))
        port = DataStagePort(
            link.client,
            migration_id,
            loop,
            stage_timeout_s or self.config.data_timeout_s,
            lambda reason: self._port_failed(migration_id, reason),
        )

        def layout(num_layers: int) -> StageLayout:
            kwargs = {"timeout_s": stage_timeout_s} if stage_timeout_s else {}
            return StageLayout.split(num_layers, record.start, port, num_micro_batches, **kwargs)

        def send(chunks: list[donor.KVChunk]) -> int:
            return self._blocking(link.send(chunks))

        # Switched before the engine's next step can fail through the port (and fall back).
        previous, record.port, record.state = record.state, port, MigrationState.SWITCHING
        try:
            return await self.engine_call(
                lambda e: donor.switch(e, record.layers, held, send, layout)
            )
        except BaseException:
            record.port, record.state = None, previous
            raise

    async def activate(self, migration_id: str, drop_weights: bool) -> tuple[int, int]:
        """(blocks before, blocks after) of the donor's pool."""
        record = self._donor(migration_id, MigrationState.SWITCHING, MigrationState.ACTIVE)

        def drop(engine: Engine) -> tuple[int, int]:
            before = engine.block_manager.num_blocks
            if drop_weights and engine.model.holds_layer(record.start):
                engine.migration.drop_layers(record.start)
            return before, engine.block_manager.num_blocks

        result = await self.engine_call(drop)
        record.weights_dropped = record.weights_dropped or drop_weights
        record.state = MigrationState.ACTIVE
        return result

    async def revert(self, migration_id: str) -> donor.PauseResult:
        """Layers back (weights first, then the KV copied back in stages while the donor still
        steps through the helper), then the pause: the last delta and the local layout. The
        result counts every byte copied back; its pause is the last step's only."""
        record = self._donor(migration_id, MigrationState.SWITCHING, MigrationState.ACTIVE)
        await self.engine_call(lambda e: e.migration.restore_layers())
        record.weights_dropped = False
        pre_bytes, pre_ids = await self._copy_back(record)
        result = await self._revert_pause(record)
        return donor.PauseResult(
            pre_bytes + result.num_bytes,
            tuple(sorted({*pre_ids, *result.request_ids})),
            result.pause_s,
            result.requeued,
        )

    async def _copy_back(self, record: MigrationRecord) -> tuple[int, list[str]]:
        """The staged reverse copy: each sequence's KV the donor lacks, up to what it had
        computed when asked, written back between steps (the pause sends only what follows)."""
        seqs = await self.engine_call(donor.running)
        held = await self._link(record).held(list(seqs))
        num_bytes, moved = 0, []
        for rid, done in seqs.items():
            if held.get(rid, 0) < done:
                continue
            missing = await self.engine_call(lambda e, rid=rid: e.placement.missing(rid))
            chunks = [
                await self._link(record).fetch_kv(rid, layer, have, done)
                for layer, have in missing.items()
                if have < done
            ]
            if chunks:
                n = await self.engine_call(lambda e, rid=rid, c=chunks: donor.restore(e, rid, c))
                num_bytes += n
                moved.append(rid)
        record.moved(num_bytes, moved)
        return num_bytes, moved

    async def _revert_pause(self, record: MigrationRecord) -> donor.PauseResult:
        link = self._link(record)

        def fetch_held(ids: list[str]) -> dict[str, int]:
            return self._blocking(link.held(ids))

        def fetch_kv(rid: str, layer: int, start: int, end: int) -> Any:
            return self._blocking(link.fetch_kv(rid, layer, start, end))

        result = await self.engine_call(lambda e: donor.revert(e, fetch_held, fetch_kv))
        record.moved(result.num_bytes, result.request_ids)
        record.weights_dropped, record.state = False, MigrationState.REVERTING
        await self._disconnect(record)
        return result

    def _port_failed(self, migration_id: str, reason: str) -> None:
        """On the loop: the helper is unreachable; run every layer here again (once)."""
        record = self.records.get(migration_id)
        if record is None or record.state not in SWITCHED or migration_id in self._falling_back:
            return
        self._falling_back.add(migration_id)

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
        if record.link is None:
            raise InvalidRequestError(f"migration {record.migration_id}: CopyKV first (no helper)")
        return record.link

    async def _disconnect(self, record: MigrationRecord) -> None:
        if record.port is not None:
            record.port.close()
            record.port = None
        if record.link is not None:
            link, record.link = record.link, None
            await link.close()

    def _observed(self, migration_id: str, kind: str, nbytes: int, ids: tuple[str, ...]) -> None:
        """The host handled a donor's message: the helper's view follows it."""
        record = self.records.get(migration_id)
        if record is None or record.state.terminal:
            return
        if kind in ("kv_import", "kv_export"):
            record.moved(nbytes, ids)
        nxt = {
            "kv_import": MigrationState.COPYING,
            "stage_run": MigrationState.ACTIVE,
            "kv_export": MigrationState.REVERTING,
        }
        if kind in nxt:
            record.state = nxt[kind]
