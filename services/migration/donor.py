"""The donor's work on its engine thread (every function here runs inside ``engine_call``).

KV is append-only, so a copy is always "what the helper lacks": the helper says how many tokens
of each sequence it holds in every hosted layer (``held``), and the donor exports each running
sequence's layers from there to what it has computed — exactly those tokens, packed for many
sequences and every moved layer in one tensor (``export_tokens``), not the whole blocks they
fall in: the switch's last delta is a step or two of tokens a sequence. A sequence preempted
since (its KV freed and being recomputed) has nothing to send until it passes what the helper
holds again. Taking layers back reads token ranges the same way (``lacking``,
``restore_tokens``).

Functions that move bytes while the engine is paused (``switch``, ``revert``) get a ``send``
that runs one exchange on the event loop and blocks this thread until it is answered: that
wait is the pause the donor's requests see.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.common.errors import InvalidRequestError, ResourceExhaustedError
from services.engine.engine import Engine
from services.engine.kv_cache import KVLayout
from services.engine.ports import StageSeq
from services.engine.stages import StageLayout

KVChunk = tuple[str, torch.Tensor, KVLayout]  # request id, one layer's blocks, their layout
FetchHeld = Callable[[list[str]], dict[str, int]]


@dataclass(frozen=True)
class TokenDelta:
    """Tokens ``[start, end)`` of each span's sequence in every layer of ``layers``, packed as
    ``KVTransfer.export_tokens`` gives them (one ``kv_tokens`` message)."""

    spans: tuple[StageSeq, ...]
    layers: range
    fingerprint: str
    data: torch.Tensor

    @property
    def num_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()


SendDeltas = Callable[[list[TokenDelta]], int]  # bytes sent
FetchTokens = Callable[[list[list[StageSeq]]], list[TokenDelta]]  # a delta per group of spans


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


def token_bytes(engine: Engine, layers: range) -> int:
    """One token's K and V in ``layers``."""
    return engine.kv_cache.layer_block_bytes // engine.kv_cache.block_size * len(layers)


def groups(spans: list[StageSeq], size: int, group_bytes: int) -> list[list[StageSeq]]:
    """``spans`` in order, cut into runs of at most ``group_bytes`` (``size`` bytes a token;
    at least one token): one ``kv_tokens`` message each, so a data plane's bound on a message
    holds whatever a sequence's length: a longer span is cut into pieces, in token order. A
    sequence whose pieces fill several groups must reach the helper in that order
    (``HelperLink``)."""
    limit = max(1, group_bytes // max(1, size))  # tokens a message
    out: list[list[StageSeq]] = [[]]
    num_tokens = 0
    for span in spans:
        pieces = [
            StageSeq(span.request_id, start, min(limit, span.end - start))
            for start in range(span.start, span.end, limit)
        ]
        for piece in pieces:
            if out[-1] and num_tokens + piece.num_tokens > limit:
                out.append([])
                num_tokens = 0
            out[-1].append(piece)
            num_tokens += piece.num_tokens
    return out if out[0] else []


def export_tokens(
    engine: Engine,
    request_ids: list[str],
    layers: range,
    held: dict[str, int],
    max_bytes: float,
    group_bytes: int,
) -> tuple[list[TokenDelta], list[str]]:
    """What the helper lacks of ``layers`` for the sequences of ``request_ids``, in order, in
    one visit of the engine thread: each sequence from what the helper holds (``held``) to what
    it has computed, nothing for one not running (or whose prefix is still being fetched), a
    ``TokenDelta`` per ``group_bytes`` of them; stops once ``max_bytes`` are exported (at least
    one sequence). The deltas, and the request ids not visited yet."""
    seqs = {s.request_id: s for s in engine.scheduler.running}
    size = token_bytes(engine, layers)
    spans: list[StageSeq] = []
    total, rest = 0, []
    for i, rid in enumerate(request_ids):
        if total >= max_bytes:
            rest = request_ids[i:]
            break
        seq = seqs.get(rid)
        if seq is None or rid in engine.fetches:
            continue
        done = seq.num_computed_tokens
        start = min(held.get(rid, 0), done)
        if start < done:
            spans.append(StageSeq(rid, start, done - start))
            total += (done - start) * size
    deltas = [
        TokenDelta(tuple(g), layers, engine.fingerprint, engine.kv.export_tokens(g, layers))
        for g in groups(spans, size, group_bytes)
    ]
    return deltas, rest


def lacking(
    engine: Engine, layers: range, held: dict[str, int], group_bytes: int, partial: bool = False
) -> list[list[StageSeq]]:
    """Taking layers back: the tokens of each running sequence whose KV here lacks some of
    ``layers`` and that the helper holds in full (``held``), from the fewest any of them has
    here; in ``groups`` of ``group_bytes``. A sequence the helper lacks recomputes instead.
    With ``partial`` (the staged copy while the donor still steps through the helper, ``held``
    asked a step or so before): what the helper held of each, the rest left to the pause."""
    spans = []
    for rid, done in running(engine).items():
        have = [n for layer, n in engine.placement.missing(rid).items() if layer in layers]
        start = min(have, default=done)
        end = min(done, held.get(rid, 0)) if partial else done
        if start < end and (partial or done <= held.get(rid, 0)):
            spans.append(StageSeq(rid, start, end - start))
    return groups(spans, token_bytes(engine, layers), group_bytes)


def restore_tokens(engine: Engine, deltas: list[TokenDelta]) -> tuple[int, list[str]]:
    """Write KV fetched from the helper back into the sequences it belongs to: (bytes
    written, their ids). A sequence that finished, or computed fewer tokens than its span
    since (preempted), takes none: the revert's pause sees to it."""
    seqs = running(engine)
    num_bytes, moved = 0, []
    for delta in deltas:
        if delta.fingerprint != engine.fingerprint:
            raise InvalidRequestError("KV from the helper was computed by another model or dtype")
        keep, rows, at = [], [], 0
        for span in delta.spans:
            if seqs.get(span.request_id, 0) >= span.end:
                keep.append(span)
                rows.append(torch.arange(at, at + span.num_tokens))
            at += span.num_tokens
        if not keep:
            continue
        data = delta.data
        if len(keep) < len(delta.spans):
            data = data.index_select(2, torch.cat(rows))
        engine.migration.restore_tokens(keep, delta.layers, data)
        num_bytes += data.numel() * data.element_size()
        moved += [span.request_id for span in keep]
    return num_bytes, moved


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
    send: SendDeltas,
    layout: Callable[[int], StageLayout],
    group_bytes: int,
) -> PauseResult:
    """The pause: each running sequence's last delta to the helper, then the split layout."""
    t0 = time.monotonic()
    check_switchable(engine)
    deltas, _ = export_tokens(engine, list(running(engine)), layers, held, math.inf, group_bytes)
    # every sequence's delta in one exchange: the pause waits for one answer, not one each
    num_bytes = send(deltas) if deltas else 0
    moved = [span.request_id for delta in deltas for span in delta.spans]
    requeued = engine.migration.set_stages(layout(engine.spec.num_layers))
    return PauseResult(num_bytes, tuple(moved), time.monotonic() - t0, tuple(requeued))


def revert(
    engine: Engine, layers: range, fetch_held: FetchHeld, fetch: FetchTokens, group_bytes: int
) -> PauseResult:
    """The reverse: weights back if dropped, the KV the donor lacks back from the helper (each
    sequence the helper holds in full), then every layer local again (the rest recompute).
    ``ResourceExhaustedError`` with nothing changed if the pool cannot shrink back yet."""
    t0 = time.monotonic()
    engine.migration.restore_layers()
    seqs = running(engine)
    held = fetch_held(list(seqs)) if seqs else {}
    spans = lacking(engine, layers, held, group_bytes)
    num_bytes, moved = restore_tokens(engine, fetch(spans)) if spans else (0, [])
    requeued = engine.migration.set_stages(StageLayout.local(engine.spec.num_layers))
    return PauseResult(num_bytes, tuple(moved), time.monotonic() - t0, tuple(requeued))


def fall_back(engine: Engine) -> tuple[str, ...]:
    """Abort on the donor: every layer local again (weights reloaded if dropped); sequences
    whose KV is on the helper recompute. ``ResourceExhaustedError`` if the pool cannot shrink."""
    engine.migration.restore_layers()
    if len(engine.migration.stage_layout.stages) > 1:  # remote, or cut by a port's recovery
        return tuple(engine.migration.set_stages(StageLayout.local(engine.spec.num_layers)))
    return ()
