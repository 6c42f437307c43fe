"""One engine step: plan -> execute(stages) -> commit.

1. **plan** — the scheduler picks the batch (running sequences first, then waiting ones) and the
   runner turns it into tensors. With a remote stage and ``num_micro_batches=2`` the batch is cut
   in two halves of about equal tokens, unless a prefix fetch needs the step whole (a layer
   hook then sees each half's layers as that half computes them, with that half's context).
   With ``located_micro_batches`` > 1 a batch with located sequences (attention migration) is
   dealt into parts (``_deal``): while one part's helpers attend, another computes its layer.
2. **execute** — embedding, then the layout's stages in order (local ones here, remote ones
   through their ``StagePort``), then the logits of the rows that sample. Before each layer a
   pending prefix fetch may be waited for; after each local layer ``on_layer_done`` may run.
3. **commit** — sample one token per finished row, advance every scheduled sequence by the tokens
   it computed, hash the blocks that became full, and build the outputs.

*A failed step never happened*: if execute raises (a prefix that did not arrive, a port that
failed), commit does not run: no ``num_computed_tokens`` moves and nothing is sampled, so the
next step computes the same tokens again and overwrites, identically, whatever KV this one wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial

import torch

from services.common.types import FinishReason, RequestOutput
from services.engine.kv_transfer import KVTransfer
from services.engine.model_runner import ModelRunner, StepInputs
from services.engine.outputs import append_token
from services.engine.placement import Placement
from services.engine.prefix_fetch import PrefixFetch, PrefixFetches, wait_for_layer
from services.engine.requests import RequestState, RequestTable
from services.engine.sampler import Sampler
from services.engine.scheduler import ScheduledBatch, Scheduler
from services.engine.sequence import Sequence

LogitsHook = Callable[[list[Sequence], torch.Tensor], None]


@dataclass(frozen=True)
class StepContext:
    """The step in progress, as a layer hook sees it."""

    # Request id -> tokens whose KV exists once every layer of this step has run.
    num_tokens: dict[str, int]
    # Requests whose tokens are all computed after this step (they sample a token).
    sampling: tuple[str, ...]


LayerDoneHook = Callable[[int, StepContext], None]


@dataclass
class StepPlan:
    batch: ScheduledBatch
    parts: list[StepInputs]  # one per micro-batch, in batch order
    halves: list[ScheduledBatch]  # what each part schedules
    sampled: list[Sequence]  # in the order of the logits rows
    fetches: tuple[PrefixFetch, ...]  # pending prefix fetches the step must wait for


class Stepper:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        requests: RequestTable,
        fetches: PrefixFetches,
        kv: KVTransfer,
        placement: Placement,
        finish: Callable[[RequestState, FinishReason], None],
        logits_hook: LogitsHook | None,
        located_micro_batches: int = 1,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.requests = requests
        self.fetches = fetches
        self.kv = kv
        self.placement = placement
        self.finish = finish
        self.logits_hook = logits_hook
        self.located_micro_batches = located_micro_batches  # EngineConfig's
        self.sampler = Sampler()

    def plan(
        self, exclude: Collection[str] = (), max_running: int | None = None, split: bool = True
    ) -> StepPlan | None:
        """The next step, None if nothing is scheduled. ``exclude`` and ``max_running`` as
        ``Scheduler.schedule``'s; ``split=False`` keeps the batch whole (pipeline.py)."""
        batch = self.scheduler.schedule(exclude, max_running)
        if not batch.seqs:
            return None
        fetches = self.fetches.pending_in(batch.seqs)
        layout = self.placement.layout
        halves = [batch]
        if split and not fetches:
            if layout.remote and layout.num_micro_batches > 1:
                halves = batch.split(layout.num_micro_batches)
            elif self.placement.located and self.located_micro_batches > 1:
                halves = _deal(batch, self.located_micro_batches, self.placement.located)
        parts = [
            self.runner.prepare(
                half, self.placement.located or None, layout.remote, layout.timeout_s
            )
            for half in halves
        ]
        sampled = [
            h.seqs[i] for h, p in zip(halves, parts, strict=True) for i in p.sample_seq_index
        ]
        return StepPlan(batch, parts, halves, sampled, fetches)

    def execute(self, plan: StepPlan, on_layer_done: LayerDoneHook | None) -> torch.Tensor:
        """The logits of the sampled rows; raises if a fetch or a port fails (nothing kept)."""
        layout = self.placement.layout
        if len(plan.parts) > 1:
            if on_layer_done is None:
                return self.runner.run_micro_batches(plan.parts, layout)
            sampled = {s.request_id for s in plan.sampled}
            num_tokens = _step_tokens(plan.batch)
            hooks = [
                partial(_half_hook, on_layer_done, _context(half, sampled)) for half in plan.halves
            ]
            self.kv.step_tokens = num_tokens  # any half's sequence reads its own entry
            try:
                return self.runner.run_micro_batches(plan.parts, layout, hooks)
            finally:
                self.kv.step_tokens = None
        inputs, fetches = plan.parts[0], plan.fetches
        gate = partial(wait_for_layer, fetches) if fetches else None
        remote = layout if layout.remote else None
        if on_layer_done is None:
            logits = self.runner.run(inputs, before_layer=gate, layout=remote)
        else:
            ctx = StepContext(_step_tokens(plan.batch), tuple(s.request_id for s in plan.sampled))
            self.kv.step_tokens = ctx.num_tokens
            try:
                logits = self.runner.run(
                    inputs, lambda layer: on_layer_done(layer, ctx), gate, remote
                )
            finally:
                self.kv.step_tokens = None
        self.fetches.arrived(fetches)  # every layer arrived: commit hashes the blocks
        return logits

    def commit(self, plan: StepPlan, logits: torch.Tensor) -> list[RequestOutput]:
        sampled = plan.sampled
        if self.logits_hook is not None:
            self.logits_hook(sampled, logits.float())
        tokens = self.sampler(
            logits, [s.params for s in sampled], [s.num_output_tokens for s in sampled]
        )
        bm = self.scheduler.block_manager
        for seq, n in zip(plan.batch.seqs, plan.batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            bm.commit_full_blocks(seq)
        self.placement.mark_computed(plan.batch.seqs, plan.batch.num_new_tokens)
        outputs = []
        for seq, token in zip(sampled, tokens, strict=True):
            request = self.requests.active[seq.request_id]
            out = append_token(request, token, self.requests.max_model_len)
            if out.finish_reason is not None:
                self.finish(request, out.finish_reason)
            outputs.append(out)
        return outputs


def _step_tokens(batch: ScheduledBatch) -> dict[str, int]:
    """Request id -> tokens whose KV exists once every layer of the step has run."""
    pairs = zip(batch.seqs, batch.num_new_tokens, strict=True)
    return {s.request_id: s.num_computed_tokens + n for s, n in pairs}


def _context(half: ScheduledBatch, sampled: set[str]) -> StepContext:
    """A micro-batch's view of the step: its own sequences only."""
    ids = tuple(s.request_id for s in half.seqs)
    return StepContext(_step_tokens(half), tuple(r for r in ids if r in sampled))


def _half_hook(hook: LayerDoneHook, ctx: StepContext, layer: int) -> None:
    hook(layer, ctx)


def _deal(batch: ScheduledBatch, parts: int, located: Collection[str]) -> list[ScheduledBatch]:
    """Up to ``parts`` micro-batches, no more than the located sequences (``located``: request
    ids): those dealt out in turn, then the others continuing the turn, so that every part waits
    on helpers at each layer while another computes. One part if one sequence or none is
    located."""
    dealt = [i for i, s in enumerate(batch.seqs) if s.request_id in located]
    parts = min(parts, len(dealt))
    if parts < 2:
        return [batch]
    dealt += [i for i, s in enumerate(batch.seqs) if s.request_id not in located]
    return [
        ScheduledBatch(
            [batch.seqs[i] for i in dealt[k::parts]],
            [batch.num_new_tokens[i] for i in dealt[k::parts]],
        )
        for k in range(parts)
    ]
