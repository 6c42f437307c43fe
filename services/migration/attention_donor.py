"""The donor's side of an attention migration on its engine thread (every function here runs
inside ``engine_call``; attention_agent.py calls them): which sequences move, their blocks'
export, locating them on a port (the switch, and each refill), evicting them (an abort) and
bringing them back (a revert)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from services.common.errors import (
    InvalidRequestError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from services.common.hashing import BlockHash
from services.engine.engine import Engine
from services.engine.sequence import SequenceStatus
from services.migration.donor import KVChunk

if TYPE_CHECKING:
    from services.migration.attention_agent import AttentionSelection
    from services.migration.attention_port import DataAttentionPort


def choose(
    engine: Engine,
    sel: AttentionSelection,
    copied: Mapping[str, tuple[BlockHash, ...]],
    port: DataAttentionPort | None = None,
) -> list[tuple[str, tuple[BlockHash, ...]]]:
    """Running, decoding sequences not ``copied`` yet, the longest first (or those named), with
    the hashes of the leading full blocks that move. With ``port`` (a refill): as many as the
    selection's limit less the sequences located on that port now, copied before or not (a
    located sequence that was preempted may move again once it decodes)."""
    located = engine.placement.located
    names = set(sel.request_ids)
    exclude = copied if port is None else {}
    seqs = [
        s
        for s in engine.scheduler.running
        if s.status is SequenceStatus.RUNNING
        and s.request_id not in located
        and s.request_id not in exclude
        and s.request_id not in engine.fetches
        and s.num_computed_tokens >= s.num_prompt_tokens
        and s.block_hashes
        and (not names or _named(s.request_id, names))
    ]
    seqs.sort(key=lambda s: -s.num_computed_tokens)
    if port is None:
        room = max(0, sel.limit - len(copied))
    else:
        room = max(0, sel.limit - sum(1 for p in located.values() if p is port))
    cap = sel.max_blocks_per_sequence or None
    return [(s.request_id, tuple(s.block_hashes[:cap])) for s in seqs[:room]]


def _named(engine_id: str, names: set[str]) -> bool:
    """A decode worker runs a request as ``ID#N`` (services/decode/table.py); a selection names
    it by the id its client sent (``ID``), or by the engine's."""
    return engine_id in names or engine_id.rpartition("#")[0] in names


def running(engine: Engine, request_id: str):
    return next((s for s in engine.scheduler.running if s.request_id == request_id), None)


def export_blocks(engine: Engine, request_id: str, hashes: tuple[BlockHash, ...]) -> list[KVChunk]:
    """Every layer of the sequence's leading blocks ``hashes`` (none if it no longer has them)."""
    seq = running(engine, request_id)
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
        seq = running(engine, rid)
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


def evict_located(engine: Engine, port: DataAttentionPort) -> list[str]:
    """Recompute every sequence located on ``port`` (abort: its blocks are not coming back)."""
    seqs = [
        s for s in engine.scheduler.running if engine.placement.located.get(s.request_id) is port
    ]
    for seq in seqs:
        engine.placement.evict(seq)
    return [s.request_id for s in seqs]


def begin_recall(engine: Engine, request_id: str) -> bool | str:
    """True: blocks reserved; "requeued": none free, the sequence recomputes; "gone": ended."""
    try:
        engine.migration.begin_recall(request_id)
    except ResourceExhaustedError:
        seq = running(engine, request_id)
        if seq is not None:
            engine.placement.evict(seq)
        return "requeued"
    except RequestNotFoundError:
        return "gone"
    return True


def finish_recall(engine: Engine, request_id: str, chunks: list) -> tuple[int, float]:
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
