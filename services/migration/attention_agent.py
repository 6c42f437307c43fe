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
``engine_call`` (between two steps); data-plane exchanges on the agent's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.common.errors import (
    ConfigError,
    InvalidRequestError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from services.common.hashing import BlockHash
from services.common.migration_states import MigrationState
from services.engine.engine import Engine
from services.engine.sequence import SequenceStatus
from services.migration import attention_wire, wire
from services.migration.attention_host import AttentionHost
from services.migration.attention_port import DataAttentionPort, OverlapReport
from services.migration.donor import KVChunk, PauseResult
from services.migration.records import SWITCHED, MigrationRecord, Peer, Role
from services.rpc.convert import duration
from services.rpc.dataplane import DataPlaneError, ErrorKind
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb

if TYPE_CHECKING:
    from services.migration.agent import MigrationAgent

log = logging.getLogger(__name__)
DEFAULT_MAX_SEQUENCES = 4
S = MigrationState


@dataclass(frozen=True)
class AttentionSelection:
    """Which of the donor's sequences move, and how many leading full blocks of each."""

    request_ids: tuple[str, ...] = ()  # empty: the longest running ones
    max_sequences: int = 0  # 0: DEFAULT_MAX_SEQUENCES
    max_blocks_per_sequence: int = 0  # 0: every full block

    def __post_init__(self) -> None:
        if self.max_sequences < 0 or self.max_blocks_per_sequence < 0:
            raise ConfigError("max_sequences and max_blocks_per_sequence must be >= 0")

    @property
    def limit(self) -> int:
        return self.max_sequences or DEFAULT_MAX_SEQUENCES


def selection_from_proto(msg: pb.AttentionSelection) -> AttentionSelection:
    try:
        return AttentionSelection(
            tuple(msg.request_ids), msg.max_sequences, msg.max_blocks_per_sequence
        )
    except ConfigError as e:
        raise InvalidRequestError(str(e)) from None


@dataclass(eq=False)
class AttentionMove:
    selection: AttentionSelection
    copied: dict[str, tuple[BlockHash, ...]] = field(default_factory=dict)  # donor: on the helper
    port: DataAttentionPort | None = None
    num_blocks: int = 0  # donor: blocks offloaded at the switch
    overlap: OverlapReport | None = None  # donor: the port's counters when it closed


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
        if move.port is not None:
            port = move.port
            await self.agent.engine_call(lambda e: _evict_located(e, port))
            move.overlap, move.port = port.counters.report(), None
            port.close()
        if record.link is not None and move.copied:
            try:
                await record.link._request(wire.encode_release(mid, list(move.copied)))
            except DataPlaneError as e:  # the helper frees them with the migration or lease
                log.debug("migration %s: release on the helper lost: %r", mid, e)
        await self.agent._disconnect(record)

    # -- donor ------------------------------------------------------------------------------

    async def copy_kv(self, migration_id: str, helper: Peer) -> tuple[int, int, float]:
        """One copy stage: sequences chosen now and not copied yet. (bytes, sequences, seconds)"""
        record = self.agent._donor(migration_id, S.PLANNED, S.COPYING)
        t0 = self.agent.clock()
        link = await self.agent._connect(record, helper)
        move = self.moves[migration_id]
        chosen = await self.agent.engine_call(lambda e: choose(e, move))
        num_bytes, moved = 0, 0
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
            num_bytes += await link.send(chunks)
            move.copied[rid] = hashes
            moved += 1
        record.state = S.COPYING
        return num_bytes, moved, self.agent.clock() - t0

    async def switch(self, migration_id: str, stage_timeout_s: float | None) -> PauseResult:
        record = self.agent._donor(migration_id, S.PLANNED, S.COPYING)
        link = self.agent._link(record)
        move = self.moves[migration_id]
        port = DataAttentionPort(
            link.client,
            migration_id,
            asyncio.get_running_loop(),
            stage_timeout_s or self.agent.config.data_timeout_s,
            lambda reason: self._port_failed(migration_id, reason),
        )
        previous, record.state, move.port = record.state, S.SWITCHING, port
        try:
            offloaded, stale, pause = await self.agent.engine_call(
                lambda e: offload(e, move.copied, port)
            )
        except BaseException:
            record.state, move.port = previous, None
            raise
        for rid in stale:
            del move.copied[rid]
        if stale:
            await link._request(wire.encode_release(migration_id, stale))
        move.num_blocks = sum(len(move.copied[r]) for r in offloaded)
        record.moved(0, offloaded)
        return PauseResult(0, tuple(offloaded), pause, ())

    async def activate(self, migration_id: str) -> tuple[int, int]:
        record = self.agent._donor(migration_id, S.SWITCHING, S.ACTIVE)
        record.state = S.ACTIVE
        blocks = await self.agent.engine_call(lambda e: e.block_manager.num_blocks)
        return blocks, blocks

    async def revert(self, migration_id: str) -> PauseResult:
        """Every located sequence's blocks back, one sequence at a time between steps."""
        record = self.agent._donor(migration_id, S.SWITCHING, S.ACTIVE)
        link = self.agent._link(record)
        move = self.moves[migration_id]
        port = move.port
        located = await self.agent.engine_call(
            lambda e: [r for r, p in e.placement.located.items() if p is port]
        )
        num_bytes, moved, requeued, paused = 0, [], [], 0.0
        num_layers = record.end
        for rid in located:
            began = await self.agent.engine_call(lambda e, rid=rid: _begin_recall(e, rid))
            if began is not True:
                requeued += [rid] if began == "requeued" else []
                continue
            chunks = [await link.fetch_kv(rid, layer, 0, 0) for layer in range(num_layers)]
            n, took = await self.agent.engine_call(
                lambda e, rid=rid, c=chunks: _finish_recall(e, rid, c)
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
        if kind in ("kv_import", "kv_export"):
            record.moved(nbytes, ids)
        nxt = {"kv_import": S.COPYING, "attention_run": S.ACTIVE, "kv_export": S.REVERTING}
        if kind in nxt:
            record.state = nxt[kind]


def _overlap_fields(report: OverlapReport | None) -> dict[str, object]:
    if report is None:
        return {}
    return {
        "num_attention_calls": report.num_calls,
        "attention_round_trip": duration(report.round_trip_s),
        "attention_waited": duration(report.waited_s),
    }


# ---- on the donor's engine thread (inside engine_call) ---------------------------------------


def choose(engine: Engine, move: AttentionMove) -> list[tuple[str, tuple[BlockHash, ...]]]:
    """Running, decoding sequences not copied yet, the longest first (or those named), with the
    hashes of the leading full blocks that move."""
    sel, located = move.selection, engine.placement.located
    names = set(sel.request_ids)
    seqs = [
        s
        for s in engine.scheduler.running
        if s.status is SequenceStatus.RUNNING
        and s.request_id not in located
        and s.request_id not in move.copied
        and s.request_id not in engine.fetches
        and s.num_computed_tokens >= s.num_prompt_tokens
        and s.block_hashes
        and (not names or s.request_id in names)
    ]
    seqs.sort(key=lambda s: -s.num_computed_tokens)
    room = max(0, sel.limit - len(move.copied))
    cap = sel.max_blocks_per_sequence or None
    return [(s.request_id, tuple(s.block_hashes[:cap])) for s in seqs[:room]]


def _running(engine: Engine, request_id: str):
    return next((s for s in engine.scheduler.running if s.request_id == request_id), None)


def export_blocks(engine: Engine, request_id: str, hashes: tuple[BlockHash, ...]) -> list[KVChunk]:
    """Every layer of the sequence's leading blocks ``hashes`` (none if it no longer has them)."""
    seq = _running(engine, request_id)
    if seq is None or request_id in engine.placement.located:
        return []
    if tuple(seq.block_hashes[: len(hashes)]) != hashes:
        return []
    end = len(hashes) * seq.block_size
    return [
        (request_id, *engine.export_kv(request_id, layer, 0, end))
        for layer in range(engine.spec.num_layers)
    ]


def offload(
    engine: Engine, copied: dict[str, tuple[BlockHash, ...]], port: DataAttentionPort
) -> tuple[list[str], list[str], float]:
    """The switch: locate every copied sequence that still has those blocks; (located, stale,
    seconds)."""
    t0 = time.monotonic()
    done, stale = [], []
    for rid, hashes in copied.items():
        seq = _running(engine, rid)
        ok = (
            seq is not None
            and rid not in engine.placement.located
            and tuple(seq.block_hashes[: len(hashes)]) == hashes
        )
        if ok:
            engine.migration.offload_blocks(rid, len(hashes), port)
            done.append(rid)
        else:
            stale.append(rid)
    return done, stale, time.monotonic() - t0


def _evict_located(engine: Engine, port: DataAttentionPort) -> list[str]:
    """Recompute every sequence located on ``port`` (abort: its blocks are not coming back)."""
    seqs = [
        s for s in engine.scheduler.running if engine.placement.located.get(s.request_id) is port
    ]
    for seq in seqs:
        engine.placement.evict(seq)
    return [s.request_id for s in seqs]


def _begin_recall(engine: Engine, request_id: str) -> bool | str:
    """True: blocks reserved; "requeued": none free, the sequence recomputes; "gone": ended."""
    try:
        engine.migration.begin_recall(request_id)
    except ResourceExhaustedError:
        seq = _running(engine, request_id)
        if seq is not None:
            engine.placement.evict(seq)
        return "requeued"
    except RequestNotFoundError:
        return "gone"
    return True


def _finish_recall(engine: Engine, request_id: str, chunks: list) -> tuple[int, float]:
    """Write every layer back and attend locally again; (bytes, seconds). A sequence that ended
    or was preempted since ``begin_recall`` takes nothing (its recall was freed)."""
    t0 = time.monotonic()
    try:
        for data, layout in chunks:
            engine.migration.import_recalled(request_id, data, layout)
        engine.migration.finish_recall(request_id)
    except (RequestNotFoundError, InvalidRequestError):
        return 0, time.monotonic() - t0
    return sum(d.numel() * d.element_size() for d, _ in chunks), time.monotonic() - t0
