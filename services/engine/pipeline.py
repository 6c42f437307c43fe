"""Two step streams, each on its own cadence, while layers run on a helper (DESIGN.md §5).

With a remote stage, two micro-batches inside one step (step.py) cannot keep both workers busy:
both halves' logits come at the step's end, and the next step's input is the token just sampled,
so the helper idles while the owner samples and the owner idles while the helper runs the second
half. Here, instead, the running sequences form two streams that take turns, and one step of one
stream is in flight across two ``Engine.step`` calls. Lifecycle of a step ``S_n``:

1. **start** (call ``n``) — plan ``S_n`` from the running sequences no step in flight computes,
   at most half of them (so the two streams stay even; a sequence left out goes next time), run
   its local layers and submit its remote stage: ``S_n`` is now in flight.
2. **finish** (same call) — the step started by the call before, ``S_{n-1}``, is waited for,
   its logits computed, its tokens sampled and committed. The helper runs ``S_n``'s layers
   meanwhile, and ``S_{n-1}``'s ran while the owner computed ``S_n``'s local layers.
3. **settle** — finish ``S_n`` with nothing started after it. Whatever changes the engine between
   steps (a loop command, an abort, a layout or memory change, the end of the pipelined layout)
   settles first, so nothing but ``step`` itself ever sees a step in flight.

It applies to a layout with a remote stage and ``num_micro_batches=2`` when the step has no layer
hook and no sequence has blocks on an attention helper (those keep the one-step micro-batches),
unless ``EngineConfig.pipelined_steps`` is off.

*A failed step never happened*: if finishing ``S_{n-1}`` fails, ``S_n`` is dropped as well, so
neither commits; the engine recovers as from any failed step and both recompute their tokens
(the helper rewinds a sequence a work item starts below what it holds).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.types import RequestOutput
from services.engine.model_runner import Pending, StageRun
from services.engine.step import Stepper, StepPlan


@dataclass
class InFlight:
    plan: StepPlan
    run: StageRun
    pending: Pending

    @property
    def request_ids(self) -> frozenset[str]:
        return frozenset(s.request_id for s in self.plan.batch.seqs)


class Pipeline:
    def __init__(self, stepper: Stepper, enabled: bool = True) -> None:
        self.stepper = stepper
        self.enabled = enabled  # EngineConfig.pipelined_steps
        self.in_flight: InFlight | None = None  # the engine thread's
        self.num_overlapped_steps = 0  # steps started while another was in flight

    def applies(self, hooked: bool) -> bool:
        placement = self.stepper.placement
        two = placement.layout.remote and placement.layout.num_micro_batches == 2
        return self.enabled and two and not hooked and not placement.located

    @property
    def request_ids(self) -> frozenset[str]:
        """The sequences the step in flight computes."""
        return frozenset() if self.in_flight is None else self.in_flight.request_ids

    def step(self) -> list[RequestOutput]:
        """Start the next step and finish the one in flight; its outputs. Raises ``PortFailed``
        (neither step kept)."""
        old = self.in_flight
        try:  # (``in_flight`` names ``old``'s sequences while the next step is planned)
            new = self._start(old.request_ids if old is not None else frozenset())
        finally:
            self.in_flight = None
        outputs = self._finish(old) if old is not None else []
        self.in_flight = new
        self.num_overlapped_steps += old is not None and new is not None
        return outputs

    def settle(self) -> list[RequestOutput]:
        """Finish the step in flight, starting none; its outputs. Raises ``PortFailed``."""
        old, self.in_flight = self.in_flight, None
        return self._finish(old) if old is not None else []

    def _start(self, exclude: frozenset[str]) -> InFlight | None:
        stepper = self.stepper
        half = max(1, -(-len(stepper.scheduler.running) // 2))
        plan = stepper.plan(exclude, half, split=False)
        if plan is None:
            return None
        run, pending = stepper.runner.start(plan.parts[0], stepper.placement.layout)
        return InFlight(plan, run, pending)

    def _finish(self, step: InFlight) -> list[RequestOutput]:
        timeout_s = self.stepper.placement.layout.timeout_s
        logits = self.stepper.runner.finish(step.plan.parts[0], step.run, step.pending, timeout_s)
        return self.stepper.commit(step.plan, logits)
