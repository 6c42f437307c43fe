"""The donor's calls of a ``layers`` migration: ``MigrationAgent`` hands each one to this class
(those of an ``attention`` migration to ``AttentionAgent``).

Donor A's lifecycle, one method per RPC of migration.proto:

1. ``copy_weights`` (only for a helper lacking identical weights) and ``copy_kv`` (any number
   of times, while A serves): what the helper lacks of ``[k, L)``, KV as token deltas
   (append-only; ``kv_tokens`` messages);
2. ``switch`` (the pause): one more copy stage, then the last delta and the split layout, the
   helper's stage reached through a ``DataStagePort``; from here a port failure makes the agent
   fall back on its own (``MigrationAgent._port_failed``);
3. ``activate``: optionally drop the moved layers' weights (A's KV pool grows);
4. ``revert``: weights back, the helper's KV copied back in stages (``kv_tokens_export``) while
   A still steps through the helper, then the pause: the last delta and the local layout.

Every engine change runs through the agent's ``engine_call`` (between two steps); the
state checks, the link to the helper and the record's state are the agent's.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from services.common.errors import DependencyUnavailableError
from services.common.migration_states import MigrationState
from services.engine.engine import Engine
from services.engine.ports import StageSeq
from services.engine.stages import StageLayout
from services.migration import donor, weights
from services.migration.link import BATCH_BYTES
from services.migration.ports import DataStagePort
from services.migration.records import MigrationRecord, Peer
from services.rpc import dataplane

if TYPE_CHECKING:
    from services.migration.agent import MigrationAgent


class LayerAgent:
    def __init__(self, agent: MigrationAgent) -> None:
        self.agent = agent

    async def copy_weights(
        self, migration_id: str, helper: Peer, layers: list[int]
    ) -> tuple[int, float]:
        """Ship ``layers``' weights to a helper lacking them (weights.py): (bytes, seconds)."""
        record = self.agent._donor(migration_id, MigrationState.PLANNED, MigrationState.COPYING)
        t0 = self.agent.clock()
        link = await self.agent._connect(record, helper)
        send = lambda h, p: link.client.request(h, p, link.timeout_s)  # noqa: E731
        num_bytes = await weights.send_layers(
            self.agent.engine_call,
            send,
            migration_id,
            record.layers,
            layers,
            self.agent.config.weight_chunk_bytes,
        )
        record.state = MigrationState.COPYING
        return num_bytes, self.agent.clock() - t0

    async def copy_kv(self, migration_id: str, helper: Peer) -> tuple[int, int, float]:
        """One stage of the copy: (bytes, sequences, seconds). Skipped when the snapshot shows at
        most ``precopy_skip_bytes`` of KV in use (a prefill worker's, mostly): the switch's
        pause sends it, and the stage's visit would wait for a whole step."""
        record = self.agent._donor(migration_id, MigrationState.PLANNED, MigrationState.COPYING)
        t0 = self.agent.clock()
        await self.agent._connect(record, helper)
        bound = self.agent.kv_bound(record.layers)
        if bound is not None and bound <= self.agent.config.precopy_skip_bytes:
            num_bytes, moved = 0, 0
        else:
            num_bytes, moved = await self._copy_stage(record)
        record.state, record.last_copy_bytes = MigrationState.COPYING, num_bytes
        return num_bytes, moved, self.agent.clock() - t0

    async def _copy_stage(self, record: MigrationRecord) -> tuple[int, int]:
        """Every running sequence's KV the helper lacks, exported a batch of sequences per visit
        of the engine thread (each visit waits for the step in flight to end: on a loaded
        prefill worker a second or more) and each batch sent as one exchange of concurrent
        messages: (bytes, sequences). What the helper holds is asked before the first visit,
        for the sequences sent to it so far (``record.sequences``): it holds nothing of any
        other, so one visit lists and exports them."""
        held = await self.agent._link(record).held(sorted(record.sequences))
        limit = self.agent.config.copy_batch_bytes
        num_bytes, moved = 0, set()
        pending: list[str] | None = None  # the first visit takes every running sequence
        while pending is None or pending:
            deltas, pending = await self.agent.engine_call(
                lambda e, ids=pending: donor.export_tokens(
                    e, list(donor.running(e)) if ids is None else ids, record.layers, held,
                    limit, BATCH_BYTES,
                )
            )  # fmt: skip
            if deltas:
                num_bytes += await self.agent._link(record).send_tokens(deltas)
                moved.update(s.request_id for d in deltas for s in d.spans)
        return num_bytes, len(moved)

    async def switch(
        self, migration_id: str, num_micro_batches: int, stage_timeout_s: float | None
    ) -> donor.PauseResult:
        record = self.agent._donor(migration_id, MigrationState.PLANNED, MigrationState.COPYING)
        link = self.agent._link(record)
        loop = asyncio.get_running_loop()
        last = record.last_copy_bytes
        if last is None or last > self.agent.config.precopy_skip_bytes:
            await self._copy_stage(record)  # one more stage first: the pause sends a step's KV
        held = await link.held(sorted(record.sequences))  # nothing of the others (_copy_stage)
        port = DataStagePort(
            link.client,
            migration_id,
            loop,
            stage_timeout_s or self.agent.config.data_timeout_s,
            lambda reason: self.agent._port_failed(migration_id, reason),
        )

        def layout(num_layers: int) -> StageLayout:
            kwargs = {"timeout_s": stage_timeout_s} if stage_timeout_s else {}
            return StageLayout.split(num_layers, record.start, port, num_micro_batches, **kwargs)

        def send(deltas: list[donor.TokenDelta]) -> int:
            return self.agent._blocking(link.send_tokens(deltas))

        # Switched before the engine's next step can fail through the port (and fall back).
        previous, record.port, record.state = record.state, port, MigrationState.SWITCHING

        def pause(engine: Engine) -> tuple[donor.PauseResult, dict[str, int]]:
            result = donor.switch(engine, record.layers, held, send, layout, BATCH_BYTES)
            return result, donor.running(engine)

        try:
            result, still_running = await self.agent.engine_call(pause)
        except BaseException:
            record.port, record.state = None, previous
            raise
        # Copied, then ended before the switch (a prompt handed on, a request done): the port
        # releases what ends from now on; these the helper would keep until their lease.
        port.release(sorted(record.sequences - set(still_running)))
        return result

    async def activate(self, migration_id: str, drop_weights: bool) -> tuple[int, int]:
        """(blocks before, blocks after) of the donor's pool."""
        record = self.agent._donor(migration_id, MigrationState.SWITCHING, MigrationState.ACTIVE)

        def drop(engine: Engine) -> tuple[int, int]:
            before = engine.block_manager.num_blocks
            if engine.model.holds_layer(record.start):
                engine.migration.drop_layers(record.start)
            return before, engine.block_manager.num_blocks

        if drop_weights:
            result = await self.agent.engine_call(drop)
        else:  # nothing changes: no visit (it would wait for the step in flight)
            blocks = self.agent.snapshot().num_blocks
            result = blocks, blocks
        record.weights_dropped = record.weights_dropped or drop_weights
        record.state = MigrationState.ACTIVE
        return result

    async def revert(self, migration_id: str) -> donor.PauseResult:
        """Layers back (weights first, then the KV copied back in stages while the donor still
        steps through the helper), then the pause: the last delta and the local layout. The
        result counts every byte copied back; its pause is the last step's only."""
        record = self.agent._donor(migration_id, MigrationState.SWITCHING, MigrationState.ACTIVE)
        try:
            pre_bytes, pre_ids = await self._copy_back(record)
            result = await self._revert_pause(record)
        except dataplane.DataPlaneError as e:  # e.g. its lease ran out: it dropped the layers
            raise DependencyUnavailableError(
                f"migration {migration_id}: the helper cannot give the KV back ({e})"
            ) from e
        return donor.PauseResult(
            pre_bytes + result.num_bytes,
            tuple(sorted({*pre_ids, *result.request_ids})),
            result.pause_s,
            result.requeued,
        )

    async def _copy_back(self, record: MigrationRecord) -> tuple[int, list[str]]:
        """The staged reverse copy: weights back (if dropped), then each sequence's KV the
        donor lacks that the helper held when asked, fetched ``copy_batch_bytes`` at a time
        (``kv_tokens_export`` messages at once) and written back in one visit of the engine
        thread each (the pause sends only what follows). The helper is asked first, for the
        sequences sent to it (it holds no other): holding none, the pause does it all, and
        no visit here waits for a step."""
        link = self.agent._link(record)
        held = await link.held(sorted(record.sequences))
        if not any(held.values()):
            return 0, []

        def restore_and_list(engine: Engine) -> list[list[StageSeq]]:
            engine.migration.restore_layers()
            return donor.lacking(engine, record.layers, held, BATCH_BYTES, partial=True)

        lacking = await self.agent.engine_call(restore_and_list)
        record.weights_dropped = False
        per_visit = max(1, self.agent.config.copy_batch_bytes // BATCH_BYTES)
        num_bytes, moved = 0, []
        for i in range(0, len(lacking), per_visit):
            deltas = await link.fetch_tokens(lacking[i : i + per_visit])
            n, ids = await self.agent.engine_call(lambda e, d=deltas: donor.restore_tokens(e, d))
            num_bytes += n
            moved += ids
        record.moved(num_bytes, moved)
        return num_bytes, moved

    async def _revert_pause(self, record: MigrationRecord) -> donor.PauseResult:
        link = self.agent._link(record)

        def fetch_held(ids: list[str]) -> dict[str, int]:
            return self.agent._blocking(link.held(ids))

        def fetch(groups: list[list[StageSeq]]) -> list[donor.TokenDelta]:
            return self.agent._blocking(link.fetch_tokens(groups))

        result = await self.agent.engine_call(
            lambda e: donor.revert(e, record.layers, fetch_held, fetch, BATCH_BYTES)
        )
        record.moved(result.num_bytes, result.request_ids)
        record.weights_dropped, record.state = False, MigrationState.REVERTING
        await self.agent._disconnect(record)
        return result
