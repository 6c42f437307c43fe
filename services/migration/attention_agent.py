"""The worker side of attention migration (DESIGN.md §5): whole KV blocks of the donor's running
sequences, every layer, held by a helper that attends over them for the donor at every step.

The coordinator drives it with the same RPCs as a layer migration (migration.proto, Prepare with
``attention``); ``MigrationAgent`` hands each call for such a migration to this class:

- DONOR: ``prepare`` (record) -> ``copy_kv`` (any number of times: picks running sequences not
  yet copied, the longest first or those the coordinator named, and copies their leading full
  blocks — full blocks never change, so one copy is final — while the donor keeps serving) ->
  ``switch`` (the pause: each copied sequence still running with those blocks is *located*: its
  local copies are freed and its attention merges the helper's part through a
  ``DataAttentionPort``; the helper frees the others) -> ``activate`` -> ``revert`` (per
  sequence, outside any pause: reserve local blocks, fetch every layer back, attend locally
  again; a sequence that finds no free blocks is recomputed instead) -> ``release``.
  ``abort`` (or the lease, or the helper found unreachable by the port): located sequences are
  recomputed here (output unchanged), the helper is told to free what it holds.
- HELPER: ``prepare`` (same model fingerprint, or refused) -> the donor's data-plane messages
  (attention_host.py) -> ``release`` / ``abort`` / lease: every block held for it is freed.

A located sequence that finishes, is aborted or preempted tells the helper through the port's
``release`` (the engine's ``Placement.forget``). Every engine change runs through
``engine_call`` (between two steps; those functions are attention_donor.py's); data-plane
exchanges on the agent's event loop, and the per-layer attention exchanges on the donor's
stepping thread (attention_port.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.common.errors import (
    ConfigError,
    InvalidRequestError,
    PreconditionError,
    RequestNotFoundError,
)
from services.common.hashing import BlockHash
from services.common.limits import check_request_ids
from services.common.migration_states import MigrationState
from services.migration import attention_wire, wire
from services.migration.attention_donor import (
    begin_recall,
    choose,
    evict_located,
    export_blocks,
    finish_recall,
    offload,
)
from services.migration.attention_host import AttentionHost
from services.migration.attention_port import DataAttentionPort, OverlapReport
from services.migration.donor import PauseResult
from services.migration.link import HelperLink
from services.migration.records import (
    KV_IMPORTS,
    KV_MESSAGES,
    SWITCHED,
    MigrationRecord,
    Peer,
    Role,
)
from services.rpc.convert import duration
from services.rpc.dataplane import DataPlaneError, ErrorKind
from services.rpc.dataplane.blocking_tcp import BlockingTcpChannel
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb

if TYPE_CHECKING:
    from services.migration.agent import MigrationAgent

log = logging.getLogger(__name__)
DEFAULT_MAX_SEQUENCES = 4
# How long a donor's end waits for the helper to free the blocks it held (``AttentionAgent.end``).
RELEASE_WAIT_S = 2.0
S = MigrationState


@dataclass(frozen=True)
class AttentionSelection:
    """Which of the donor's sequences move, and how many leading full blocks of each."""

    request_ids: tuple[str, ...] = ()  # empty: the longest running ones
    max_sequences: int = 0  # 0: DEFAULT_MAX_SEQUENCES
    max_blocks_per_sequence: int = 0  # 0: every full block
    # While ACTIVE, keep up to ``limit`` sequences located: as located ones end (finish, abort,
    # preemption), the donor moves its next longest decoding ones (``AttentionAgent._refill``).
    refill: bool = False

    def __post_init__(self) -> None:
        if self.max_sequences < 0 or self.max_blocks_per_sequence < 0:
            raise ConfigError("max_sequences and max_blocks_per_sequence must be >= 0")
        if self.refill and self.request_ids:
            raise ConfigError("refill moves the longest running sequences: no request_ids")

    @property
    def limit(self) -> int:
        return self.max_sequences or DEFAULT_MAX_SEQUENCES


def selection_from_proto(msg: pb.AttentionSelection) -> AttentionSelection:
    check_request_ids(msg.request_ids, "attention.request_ids")
    try:
        return AttentionSelection(
            tuple(msg.request_ids), msg.max_sequences, msg.max_blocks_per_sequence, msg.refill
        )
    except ConfigError as e:
        raise InvalidRequestError(str(e)) from None


@dataclass(eq=False)
class AttentionMove:
    selection: AttentionSelection
    copied: dict[str, tuple[BlockHash, ...]] = field(default_factory=dict)  # donor: on the helper
    port: DataAttentionPort | None = None
    num_blocks: int = 0  # donor: blocks offloaded at the switch (and by refills)
    overlap: OverlapReport | None = None  # donor: the port's counters when it closed
    refiller: asyncio.Task | None = None  # donor, ``selection.refill``: while ACTIVE
    stopping: bool = False  # set (on the loop) before a revert or an end looks at the port


class AttentionAgent:
    def __init__(self, agent: MigrationAgent) -> None:
        self.agent = agent
        self.moves: dict[str, AttentionMove] = {}
        self.host = AttentionHost(agent.engine_call, self._observed)

    def owns(self, migration_id: str) -> bool:
        return migration_id in self.moves

    def overlap(self, migration_id: str) -> OverlapReport | None:
        """How much of the helper's round trips the donor's steps hid (donor only)."""
        move = self.moves.get(migration_id)
        if move is None:
            return None
        return move.port.counters.report() if move.port is not None else move.overlap

    def view_fields(self, record: MigrationRecord) -> dict[str, object]:
        move = self.moves.get(record.migration_id)
        if move is None:
            return {}
        sel = move.selection
        if record.role is Role.HELPER:
            num_blocks = self.host.num_blocks(record.migration_id)
        elif move.port is not None:  # one migration per worker: every located block is ours
            num_blocks = self.agent.snapshot().num_remote_blocks
        else:
            num_blocks = sum(len(h) for h in move.copied.values())
        return {
            "attention": pb.AttentionSelection(
                request_ids=list(sel.request_ids),
                max_sequences=sel.max_sequences,
                max_blocks_per_sequence=sel.max_blocks_per_sequence,
                refill=sel.refill,
            ),
            "num_blocks": num_blocks,
            **_overlap_fields(self.overlap(record.migration_id)),
        }

    # -- every role -------------------------------------------------------------------------

    async def prepare(
        self,
        migration_id: str,
        role: Role,
        donor_peer: Peer,
        helper_peer: Peer,
        lease_s: float | None,
        fingerprint: str,
        selection: AttentionSelection,
    ) -> tuple[MigrationRecord, str, dict[int, str], list[int]]:
        num_layers, mine = await self.agent.engine_call(
            lambda e: (e.spec.num_layers, e.fingerprint)
        )
        if role is Role.HELPER and fingerprint and fingerprint != mine:
            raise InvalidRequestError("the donor runs another model or dtype: its KV never mixes")
        lease = self.agent._lease(lease_s)
        record = MigrationRecord(
            migration_id, role, 0, num_layers, donor_peer, helper_peer, lease,
            self.agent.clock() + lease,
        )  # fmt: skip
        for old in [m for m in self.moves if m not in self.agent.records]:
            del self.moves[old]  # records aged out
        self.moves[migration_id] = AttentionMove(selection)
        if role is Role.HELPER:
            blocks = await self.agent.engine_call(lambda e: e.migration.hosted_blocks)
            self.host.add(migration_id, blocks)
        self.agent._add(record)
        return record, mine, {}, []

    async def end(self, record: MigrationRecord) -> None:
        """Undo what this worker holds (MigrationAgent._end sets the final state)."""
        mid = record.migration_id
        move = self.moves[mid]
        if record.role is Role.HELPER:
            await self.host.end(mid)
            return
        await _stop(move)
        if move.port is not None:
            port = move.port
            evicted = await self.agent.engine_call(lambda e: evict_located(e, port))
            # with those the engine evicted itself when the port failed a step (its recovery)
            record.num_requeued_at_end += len(evicted) + port.num_evicted
            move.overlap, move.port = port.counters.report(), None
            port.close()
        # Freeing them early on the helper is a courtesy: it frees them anyway with the
        # migration's end (the coordinator's call) or its lease. So not over a link found lost,
        # and not waiting long on one that may be: a stalled one held the fall-back's end (the
        # record ACTIVE) for a second keepalive period.
        if record.link is not None and move.copied and not record.helper_lost:
            release = record.link._request(wire.encode_release(mid, list(move.copied)))
            try:
                await asyncio.wait_for(release, RELEASE_WAIT_S)
            except (DataPlaneError, TimeoutError) as e:
                log.debug("migration %s: release on the helper lost: %r", mid, e)
        await self.agent._disconnect(record)

    # -- donor ------------------------------------------------------------------------------

    async def copy_kv(self, migration_id: str, helper: Peer) -> tuple[int, int, float]:
        """One copy stage: sequences chosen now and not copied yet. (bytes, sequences, seconds)"""
        record = self.agent._donor(migration_id, S.PLANNED, S.COPYING)
        t0 = self.agent.clock()
        link = await self.agent._connect(record, helper)
        move = self.moves[migration_id]
        chosen = await self.agent.engine_call(lambda e: choose(e, move.selection, move.copied))
        named = move.selection.request_ids
        if named and not chosen and not move.copied:
            shown = ", ".join(named[:4]) + (f" and {len(named) - 4} more" if len(named) > 4 else "")
            raise RequestNotFoundError(f"none of the named requests ({shown}) decodes here")
        num_bytes, moved = await self._copy(migration_id, link, move, chosen)
        record.state = S.COPYING
        # Its bytes (its sequences count once located: a copied one may end first); with the
        # refills', what the coordinator's record follows (MigrationDriver.follow).
        record.moved(num_bytes, ())
        return num_bytes, len(moved), self.agent.clock() - t0

    async def _copy(
        self,
        migration_id: str,
        link: HelperLink,
        move: AttentionMove,
        chosen: list[tuple[str, tuple[BlockHash, ...]]],
    ) -> tuple[int, list[str]]:
        """Hold, export and send each chosen sequence's blocks; (bytes, request ids copied).
        Stops at the first sequence the helper has no room for."""
        num_bytes, moved = 0, []
        for rid, hashes in chosen:
            try:
                await link._request(attention_wire.encode_blocks_hold(migration_id, rid, hashes))
            except DataPlaneError as e:
                if e.kind is not ErrorKind.REMOTE:
                    raise
                log.info("migration %s: helper holds no more (%s)", migration_id, e.message)
                break
            chunks = await self.agent.engine_call(
                lambda e, rid=rid, hashes=hashes: export_blocks(e, rid, hashes)
            )
            if not chunks:  # finished or preempted meanwhile
                await link._request(wire.encode_release(migration_id, [rid]))
                continue
            # Recorded by the caller (the copy's bytes; a refill's located sequences): the
            # link's own report counted them again (the probe of session 44: a record's KV
            # bytes 3x the copy's after its revert).
            num_bytes += await link.send(chunks, report=False)
            move.copied[rid] = hashes
            moved.append(rid)
        return num_bytes, moved

    async def switch(self, migration_id: str, stage_timeout_s: float | None) -> PauseResult:
        record = self.agent._donor(migration_id, S.PLANNED, S.COPYING)
        link = self.agent._link(record)
        move = self.moves[migration_id]
        if not move.copied and not move.selection.refill:
            # No copy round found a sequence: it would go ACTIVE moving nothing and hold both
            # workers until reverted (probe, session 42); with refill it moves them as they come.
            raise PreconditionError(
                "no sequence decodes here to move (a prefill worker decodes none; an idle "
                "decode worker has none yet): nothing to migrate"
            )
        channel = None
        if self.agent.config.blocking_attention and record.helper.data_transport == "tcp":
            channel = await BlockingTcpChannel.connect(
                record.helper.data_address, self.agent.config.data_timeout_s
            )
        port = DataAttentionPort(
            link.client,
            migration_id,
            asyncio.get_running_loop(),
            stage_timeout_s or self.agent.config.data_timeout_s,
            lambda reason: self._port_failed(migration_id, reason),
            channel=channel,
        )
        previous, record.state, move.port = record.state, S.SWITCHING, port
        try:
            offloaded, stale, pause = await self.agent.engine_call(
                lambda e: offload(e, move.copied, port)
            )
        except BaseException:
            record.state, move.port = previous, None
            port.close()
            raise
        for rid in stale:
            del move.copied[rid]
        if stale:
            await link._request(wire.encode_release(migration_id, stale))
        if not offloaded and not move.selection.refill:
            # Every copied sequence ended (or was preempted) before the switch: ACTIVE would
            # locate none and hold both workers until reverted, as above (probe, session 42).
            record.state, move.port = previous, None
            port.close()
            raise PreconditionError(
                f"the {len(stale)} sequence(s) copied ended before the switch: nothing to migrate"
            )
        move.num_blocks = sum(len(move.copied[r]) for r in offloaded)
        record.moved(0, offloaded)
        return PauseResult(0, tuple(offloaded), pause, ())

    async def activate(self, migration_id: str) -> tuple[int, int]:
        record = self.agent._donor(migration_id, S.SWITCHING, S.ACTIVE)
        record.state = S.ACTIVE
        move = self.moves[migration_id]
        if move.selection.refill and move.port is not None and move.refiller is None:
            move.refiller = asyncio.get_running_loop().create_task(self._refill(migration_id))
        blocks = await self.agent.engine_call(lambda e: e.block_manager.num_blocks)
        return blocks, blocks

    async def _refill(self, migration_id: str) -> None:
        """While ACTIVE: every ``refill_interval_s``, as located sequences have ended, copy the
        next longest decoding ones and locate them on the same port (one exchange per layer
        still carries them all). Revert and end set ``stopping`` before they look at the port's
        sequences and cancel it: a refill's switch that reaches the engine after that locates
        nothing, so theirs sees every sequence located."""
        interval = self.agent.config.refill_interval_s
        while True:
            await asyncio.sleep(interval)
            record, move = self.agent.records.get(migration_id), self.moves.get(migration_id)
            if record is None or move is None or record.state is not S.ACTIVE:
                return
            if move.port is None:
                return
            try:
                await self._refill_once(record, move, move.port)
            except DataPlaneError as e:  # the port's own failure path or the lease ends it
                log.info("migration %s: refill skipped: %s", migration_id, e)
            except Exception as e:  # noqa: BLE001 - located sequences still serve; no more refills
                log.warning("migration %s: refill stopped: %r", migration_id, e)
                return

    async def _refill_once(
        self, record: MigrationRecord, move: AttentionMove, port: DataAttentionPort
    ) -> None:
        mid = record.migration_id
        chosen = await self.agent.engine_call(
            lambda e: choose(e, move.selection, move.copied, port)
        )
        if not chosen:
            return
        link = self.agent._link(record)
        num_bytes, copied = await self._copy(mid, link, move, chosen)
        if not copied:
            return
        batch = {rid: move.copied[rid] for rid in copied}
        done, stale, _ = await self.agent.engine_call(
            lambda e: ([], list(batch), 0.0) if move.stopping else offload(e, batch, port)
        )
        for rid in stale:
            move.copied.pop(rid, None)
        if stale:
            with contextlib.suppress(DataPlaneError):
                await link._request(wire.encode_release(mid, stale))
        move.num_blocks += sum(len(batch[r]) for r in done)
        record.moved(num_bytes, done)

    async def revert(self, migration_id: str) -> PauseResult:
        """Every located sequence's blocks back, one sequence at a time between steps."""
        record = self.agent._donor(migration_id, S.SWITCHING, S.ACTIVE)
        self.agent._link(record)
        move = self.moves[migration_id]
        await _stop(move)
        port = move.port
        located = await self.agent.engine_call(
            lambda e: [r for r, p in e.placement.located.items() if p is port]
        )
        # Again: the helper may have been lost while this waited (the fall-back then ended
        # the migration ABORTED, and nothing is located any more).
        link = self.agent._link(record)
        num_bytes, moved, requeued, paused = 0, [], [], 0.0
        num_layers = record.end
        for rid in located:
            began = await self.agent.engine_call(lambda e, rid=rid: begin_recall(e, rid))
            if began is not True:
                requeued += [rid] if began == "requeued" else []
                continue
            chunks = [await link.fetch_kv(rid, layer, 0, 0) for layer in range(num_layers)]
            n, took = await self.agent.engine_call(
                lambda e, rid=rid, c=chunks: finish_recall(e, rid, c)
            )
            num_bytes, paused = num_bytes + n, paused + took
            moved += [rid] if n else []
        record.moved(num_bytes, moved)
        record.state = S.REVERTING
        if port is not None:
            move.overlap, move.port = port.counters.report(), None
            port.close()
        await self.agent._disconnect(record)
        move.copied.clear()
        return PauseResult(num_bytes, tuple(moved), paused, tuple(requeued))

    def _port_failed(self, migration_id: str, reason: str) -> None:
        """On the loop: the helper is unreachable; its sequences recompute here (once)."""
        record = self.agent.records.get(migration_id)
        falling = self.agent._falling_back
        if record is None or record.state not in SWITCHED or migration_id in falling:
            return
        falling.add(migration_id)
        record.helper_lost = reason  # a revert that already passed its state check stops

        async def fall_back() -> None:
            try:
                await self.agent._end(record, S.ABORTED, reason)
            except Exception as e:  # noqa: BLE001 - the lease check tries again
                log.warning("migration %s: fall back failed: %r", migration_id, e)
            finally:
                falling.discard(migration_id)

        task = asyncio.get_running_loop().create_task(fall_back())
        self.agent._tasks.add(task)
        task.add_done_callback(self.agent._tasks.discard)

    # -- helper -----------------------------------------------------------------------------

    def _observed(self, migration_id: str, kind: str, nbytes: int, ids: tuple[str, ...]) -> None:
        record = self.agent.records.get(migration_id)
        if record is None or record.state.terminal:
            return
        if kind in KV_MESSAGES:
            record.moved(nbytes, ids)
        nxt = {**dict.fromkeys(KV_IMPORTS, S.COPYING), "attention_run": S.ACTIVE,
               "kv_export": S.REVERTING}  # fmt: skip
        if kind in nxt and _ORDER.index(nxt[kind]) > _ORDER.index(record.state):
            record.state = nxt[kind]  # forward only: a refill imports while ACTIVE


_ORDER = (S.PLANNED, S.COPYING, S.SWITCHING, S.ACTIVE, S.REVERTING)


async def _stop(move: AttentionMove) -> None:
    """No more refills: mark the move, cancel the task (if any) and wait for it to unwind."""
    move.stopping = True
    task, move.refiller = move.refiller, None
    if task is not None and task is not asyncio.current_task():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _overlap_fields(report: OverlapReport | None) -> dict[str, object]:
    if report is None:
        return {}
    return {
        "num_attention_calls": report.num_calls,
        "attention_round_trip": duration(report.round_trip_s),
        "attention_waited": duration(report.waited_s),
    }
