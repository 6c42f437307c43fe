"""Turns a scheduled batch into tensors, runs the model's stages and returns logits.

A step is flattened: every scheduled sequence contributes its new tokens
(one for a decoding sequence, a chunk for a prefilling one) to one
``[num_tokens]`` input. Logits are computed only for the rows whose sequence
has all its tokens computed after this step, i.e. the ones that sample.

The layers run as the engine's ``StageLayout`` says: a local stage is one call of
``model.forward_layers``, a remote one a ``StagePort.submit`` with the hidden states and which
sequence owns which rows. With every layer local the model runs in one call, as it always did.
Two micro-batches (``run_micro_batches``) interleave so that while one half's remote stage is
away, the other half's local layers compute. ``start`` and ``finish`` cut one micro-batch's run
at its first remote stage, so that two engine steps overlap (pipeline.py).

A step may be gated: ``before_layer(i)`` runs before layer ``i`` starts and may
block until KV that layer reads is in place (a prefix arriving layer by layer)
or raise to abandon the step.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from services.engine.attention import AttentionMetadata, PrefillSpan
from services.engine.kv_cache import KVCache
from services.engine.located_attention import LocatedBatch, LocatedSpan
from services.engine.models.llama import LlamaForCausalLM, OnLayerDone
from services.engine.ports import AttentionPort, StagePort, StageSeq, StageWork, wait
from services.engine.scheduler import ScheduledBatch
from services.engine.stages import StageLayout

BeforeLayer = Callable[[int], None]


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # rows whose logits are needed
    sample_seq_index: list[int]  # index into the batch of each sampled row
    seqs: tuple[StageSeq, ...] = field(default=())  # who owns which rows (for remote stages)


class Pending(NamedTuple):
    """A remote stage a micro-batch submitted and waits for."""

    port: StagePort
    future: Future[torch.Tensor]
    request_ids: tuple[str, ...]


# Yields a remote stage it waits for (resumed with its result), or None where it paused at a
# located layer (resumed with None).
StageRun = Generator[Pending | None, torch.Tensor | None, torch.Tensor]


class Rows(NamedTuple):
    """One sequence's new tokens in a step: positions ``[start, start + num_tokens)``."""

    start: int
    num_tokens: int
    block_table: list[int]  # local blocks, after the sequence's ``num_remote_blocks``
    num_remote_blocks: int = 0


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, device: str = "cpu") -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = torch.device(device)

    def prepare(
        self,
        batch: ScheduledBatch,
        located: Mapping[str, AttentionPort] | None = None,
        with_seqs: bool = False,
        port_timeout_s: float = 30.0,
    ) -> StepInputs:
        """The step's tensors. ``located`` maps the request id of each sequence with blocks on a
        helper to that helper's port; ``with_seqs`` also lists row ownership for remote stages."""
        ids: list[int] = []
        rows: list[Rows] = []
        sample_index: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start, ctx = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids += seq.token_ids[start:ctx]
            table = seq.block_table[: seq.blocks_needed(ctx) - seq.num_remote_blocks]
            rows.append(Rows(start, n, table, seq.num_remote_blocks))
            if ctx == seq.num_tokens:
                sample_index.append(i)
        positions, meta, ends = self.metadata(rows)
        if located:
            meta.located = self._located(batch, rows, ends, located, positions, port_timeout_s)
        seqs = ()
        if with_seqs:
            seqs = tuple(
                StageSeq(s.request_id, r.start, r.num_tokens)
                for s, r in zip(batch.seqs, rows, strict=True)
            )
        return StepInputs(
            self._tensor(ids),
            positions,
            meta,
            self._tensor([ends[i] - 1 for i in sample_index]),
            sample_index,
            seqs,
        )

    def metadata(self, rows: list[Rows]) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """Positions, attention metadata and each sequence's end row for a flattened step.

        Sequences with remote blocks are left out of the batched attention (``located``)."""
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillSpan] = []
        decodes: list[tuple[int, int, list[int]]] = []  # row, ctx_len, block table
        ends: list[int] = []
        bs = self.block_size
        for r in rows:
            row, start, ctx = len(positions), r.start, r.start + r.num_tokens
            positions += range(start, ctx)
            table, first = r.block_table, r.num_remote_blocks
            slots += [table[p // bs - first] * bs + p % bs for p in range(start, ctx)]
            ends.append(row + r.num_tokens)
            if first:
                continue
            if r.num_tokens == 1:
                decodes.append((row, ctx, table))
            else:
                prefills.append(PrefillSpan(row, r.num_tokens, ctx, self._tensor(table)))
        meta = AttentionMetadata(slot_mapping=self._tensor(slots), prefills=prefills)
        if decodes:
            self._add_decodes(meta, decodes)
        return self._tensor(positions), meta, ends

    def _located(
        self,
        batch: ScheduledBatch,
        rows: list[Rows],
        ends: list[int],
        ports: Mapping[str, AttentionPort],
        positions: torch.Tensor,
        timeout_s: float,
    ) -> LocatedBatch | None:
        spans = [
            LocatedSpan(
                seq.request_id,
                end - r.num_tokens,
                r.num_tokens,
                r.start + r.num_tokens,
                r.num_remote_blocks * self.block_size,
                self._tensor(r.block_table),
                ports[seq.request_id],
            )
            for seq, r, end in zip(batch.seqs, rows, ends, strict=True)
            if r.num_remote_blocks
        ]
        return LocatedBatch(spans, positions, timeout_s) if spans else None

    def _add_decodes(
        self, meta: AttentionMetadata, decodes: list[tuple[int, int, list[int]]]
    ) -> None:
        width = max(len(table) for _, _, table in decodes)
        padded = [table + [0] * (width - len(table)) for _, _, table in decodes]
        ctx = self._tensor([c for _, c, _ in decodes])
        meta.decode_rows = self._tensor([r for r, _, _ in decodes])
        meta.decode_blocks = self._tensor(padded).flatten()
        meta.decode_lens = ctx
        span = torch.arange(width * self.block_size, device=self.device)
        meta.decode_mask = (span[None, :] < ctx[:, None])[:, None, None, :]

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    # -- execute ------------------------------------------------------------------------

    @torch.inference_mode()
    def run(
        self,
        inputs: StepInputs,
        on_layer_done: OnLayerDone | None = None,
        before_layer: BeforeLayer | None = None,
        layout: StageLayout | None = None,
    ) -> torch.Tensor:
        """Logits ``[len(sample_rows), vocab]``, in the model's dtype, for the rows that sample.

        ``before_layer(i)`` (a prefix fetch's gate) runs before layer ``i`` reads the cache;
        both hooks see only the layers that run here. Raises ``PortFailed`` if a port fails."""
        if layout is not None and layout.remote:
            run, pending = self.start(inputs, layout, on_layer_done, before_layer)
            return self.finish(inputs, run, pending, layout.timeout_s)
        hidden = self.model(
            inputs.input_ids,
            inputs.positions,
            self.kv_cache,
            inputs.meta,
            on_layer_done,
            before_layer,
        )
        return self.model.compute_logits(hidden[inputs.sample_rows])

    @torch.inference_mode()
    def run_micro_batches(
        self,
        parts: list[StepInputs],
        layout: StageLayout,
        on_layer_done: list[OnLayerDone | None] | None = None,
    ) -> torch.Tensor:
        """``run`` over micro-batches, interleaved at their remote stages and at their located
        layers (``_drive``); logits in order. ``on_layer_done[i]``: part ``i``'s hook, after
        each of its local layers. ``layout`` may be all local (attention migration's parts)."""
        hooks = on_layer_done or [None] * len(parts)
        runs = [self._stages(p, layout, h, pause=True) for p, h in zip(parts, hooks, strict=True)]
        hidden = _drive(runs, layout.timeout_s)
        rows = [h[p.sample_rows] for h, p in zip(hidden, parts, strict=True)]
        return self.model.compute_logits(torch.cat(rows))

    @torch.inference_mode()
    def start(
        self,
        inputs: StepInputs,
        layout: StageLayout,
        on_layer_done: OnLayerDone | None = None,
        before_layer: BeforeLayer | None = None,
    ) -> tuple[StageRun, Pending]:
        """Run ``inputs`` up to its first remote stage (``layout`` has one) and submit it;
        ``finish`` goes on. The hooks as ``run``'s."""
        run = self._stages(inputs, layout, on_layer_done, before_layer)
        return run, _remote(next(run))

    @torch.inference_mode()
    def finish(
        self, inputs: StepInputs, run: StageRun, pending: Pending, timeout_s: float
    ) -> torch.Tensor:
        """The logits of a ``start``ed run: waits for each remote stage, runs the rest."""
        while True:
            hidden = wait(pending.future, pending.port, pending.request_ids, timeout_s)
            try:
                pending = _remote(run.send(hidden))
            except StopIteration as done:
                return self.model.compute_logits(done.value[inputs.sample_rows])

    def _stages(
        self,
        inputs: StepInputs,
        layout: StageLayout,
        on_layer_done: OnLayerDone | None = None,
        before_layer: BeforeLayer | None = None,
        pause: bool = False,
    ) -> StageRun:
        """One micro-batch's stages; yields at each remote one and resumes with its result.
        ``pause``: also yields None at each located layer whose helpers' parts are away
        (``LlamaForCausalLM.layer_steps``) and resumes with None."""
        hidden = self.model.embed(inputs.input_ids)
        for stage in layout.stages:
            if stage.port is None:
                steps = self.model.layer_steps(
                    hidden,
                    inputs.positions,
                    self.kv_cache,
                    inputs.meta,
                    stage.start,
                    stage.end,
                    on_layer_done,
                    before_layer,
                    pause,
                )
                hidden = yield from steps  # (never pauses unless ``pause``)
            else:
                work = StageWork(stage.start, stage.end, hidden, inputs.seqs)
                hidden = yield Pending(stage.port, stage.port.submit(work), work.request_ids)
        return hidden


def _remote(got: Pending | None) -> Pending:
    """What an unpaused run yields: only remote stages."""
    assert got is not None, "a run without pause yields remote stages only"
    return got


def _drive(runs: list[StageRun], timeout_s: float) -> list[torch.Tensor]:
    """Run micro-batches round-robin: each computes until it submits a remote stage, or pauses
    at a located layer, then the next one computes while that stage (or the helpers' parts) is
    away; the oldest pending stage is waited for first, a paused one waits as it resumes."""
    results: list[torch.Tensor] = [torch.empty(0)] * len(runs)
    parked: list[tuple[int, Pending]] = []
    ready: list[tuple[int, torch.Tensor | None]] = [(i, None) for i in range(len(runs))]
    while ready or parked:
        if not ready:
            index, pending = parked.pop(0)
            hidden = wait(pending.future, pending.port, pending.request_ids, timeout_s)
            ready.append((index, hidden))
        index, value = ready.pop(0)
        try:
            got = runs[index].send(value)  # type: ignore[arg-type]
        except StopIteration as done:
            results[index] = done.value
            continue
        if got is None:
            ready.append((index, None))  # paused: it goes on after the others' turns
        else:
            parked.append((index, got))
    return results
