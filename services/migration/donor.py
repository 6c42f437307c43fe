"""The donor's work on its engine thread (every function here runs inside ``engine_call``).

KV is append-only, so a copy is always "what the helper lacks": the helper says how many tokens
of each sequence it holds in every hosted layer (``held``), and the donor exports each running
sequence's layers from there to what it has computed. A sequence preempted since (its KV freed
and being recomputed) has nothing to send until it passes what the helper holds again.

Functions that move bytes while the engine is paused (``switch``, ``revert``) get a ``send``
that runs one exchange on the event loop and blocks this thread until it is answered: that
wait is the pause the donor's requests see.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.common.errors import (
    InvalidRequestError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from services.engine.engine import Engine
from services.engine.kv_cache import KVLayout
from services.engine.stages import StageLayout

KVChunk = tuple[str, torch.Tensor, KVLayout]  # request id, one layer's blocks, their layout
SendChunks = Callable[[list[KVChunk]], int]  # bytes sent
FetchHeld = Callable[[list[str]], dict[str, int]]
FetchKV = Callable[[str, int, int, int], tuple[torch.Tensor, KVLayout]]


@dataclass(frozen=True)
class PauseResult:
    num_bytes: int
    request_ids: tuple[str, ...]  # whose KV moved
    pause_s: float
    requeued: tuple[str, ...]


def running(engine: Engine) -> dict[str, int]:
    """Running sequences with KV here -> tokens computed."""
    return {
        s.request_id: s.num_computed_tokens
        for s in engine.scheduler.running
        if s.num_computed_tokens
    }


def export_delta(engine: Engine, request_id: str, layers: range, held: int) -> list[KVChunk]:
    """One sequence's KV for ``layers`` from token ``held`` on (nothing if not running)."""
    seq = next((s for s in engine.scheduler.running if s.request_id == request_id), None)
    if seq is None or request_id in engine.fetches:
        return []
    done = seq.num_computed_tokens
    start = min(held, done)
    if start >= done:
        return []
    return [(request_id, *engine.export_kv(request_id, layer, start, done)) for layer in layers]


def export_deltas(
    engine: Engine,
    request_ids: list[str],
    layers: range,
    held: dict[str, int],
    max_bytes: int,
) -> tuple[list[KVChunk], list[str]]:
    """``export_delta`` for sequences of ``request_ids`` in order, in one visit of the engine
    thread, until the chunks reach ``max_bytes`` (at least one sequence's); the chunks, and the
    request ids not visited yet."""
    chunks: list[KVChunk] = []
    num_bytes = 0
    for i, rid in enumerate(request_ids):
        if chunks and num_bytes >= max_bytes:
            return chunks, request_ids[i:]
        more = export_delta(engine, rid, layers, held.get(rid, 0))
        chunks += more
        num_bytes += sum(data.numel() * data.element_size() for _, data, _ in more)
    return chunks, []


def check_switchable(engine: Engine) -> None:
    # A fetch writes its prefix into this pool, every layer, while the suffix computes: the
    # helper would lack the prefix's KV for [k, L). Imports need no such wait: the engine
    # moves what they wrote so far to the helper as the layout switches (kv_routes.py).
    if len(engine.fetches):
        raise ResourceExhaustedError("prefix fetches are in flight; switch once they land")


def switch(
    engine: Engine,
    layers: range,
    held: dict[str, int],
    send: SendChunks,
    layout: Callable[[int], StageLayout],
) -> PauseResult:
    """The pause: each running sequence's last delta to the helper, then the split layout."""
    t0 = time.monotonic()
    check_switchable(engine)
    chunks = [
        c for rid in running(engine) for c in export_delta(engine, rid, layers, held.get(rid, 0))
    ]
    # every sequence's delta in one exchange: the pause waits for one answer, not one each
    num_bytes = send(chunks) if chunks else 0
    moved = list(dict.fromkeys(rid for rid, _, _ in chunks))
    requeued = engine.migration.set_stages(layout(engine.spec.num_layers))
    return PauseResult(num_bytes, tuple(moved), time.monotonic() - t0, tuple(requeued))


def revert(engine: Engine, fetch_held: FetchHeld, fetch_kv: FetchKV) -> PauseResult:
    """The reverse: weights back if dropped, the KV the donor lacks back from the helper (each
    sequence the helper holds in full), then every layer local again (the rest recompute).
    ``ResourceExhaustedError`` with nothing changed if the pool cannot shrink back yet."""
    t0 = time.monotonic()
    engine.migration.restore_layers()
    seqs = running(engine)
    held = fetch_held(list(seqs)) if seqs else {}
    num_bytes, moved = 0, []
    for rid, done in seqs.items():
        missing = engine.placement.missing(rid)
        if not missing or held.get(rid, 0) < done:
            continue  # nothing lacking, or the helper never saw all of it: recompute
        for layer, have in missing.items():
            data, layout = fetch_kv(rid, layer, have, done)
            engine.migration.restore_kv(rid, data, layout)
            num_bytes += data.numel() * data.element_size()
        moved.append(rid)
    requeued = engine.migration.set_stages(StageLayout.local(engine.spec.num_layers))
    return PauseResult(num_bytes, tuple(moved), time.monotonic() - t0, tuple(requeued))


def restore(engine: Engine, request_id: str, chunks: list[tuple[torch.Tensor, KVLayout]]) -> int:
    """Write back layers of a sequence's KV fetched from the helper; bytes written. A sequence
    preempted or finished since it was fetched takes none (the revert's pause sees to it)."""
    num_bytes = 0
    try:
        for data, layout in chunks:
            engine.migration.restore_kv(request_id, data, layout)
            num_bytes += data.numel() * data.element_size()
    except (RequestNotFoundError, InvalidRequestError):
        pass
    return num_bytes


def fall_back(engine: Engine) -> tuple[str, ...]:
    """Abort on the donor: every layer local again (weights reloaded if dropped); sequences
    whose KV is on the helper recompute. ``ResourceExhaustedError`` if the pool cannot shrink."""
    engine.migration.restore_layers()
    if len(engine.migration.stage_layout.stages) > 1:  # remote, or cut by a port's recovery
        return tuple(engine.migration.set_stages(StageLayout.local(engine.spec.num_layers)))
    return ()
