"""Where each layer of a step runs: the engine's stage layout (DESIGN.md §5).

A step is plan -> execute(stages) -> commit. The layout cuts the model's layers into contiguous
stages, each run locally or through a ``StagePort``; embedding, the final norm, the LM head and
sampling always stay with the engine that owns the requests. ``StageLayout.local(L)`` (one local
stage over every layer) is what an engine starts with, and a step under it is exactly the
unstaged step: one call into the model.

With a remote stage the step may split its batch into two micro-batches, so that one half's
remote stage overlaps the other half's local layers (``num_micro_batches=2``).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidRequestError
from services.common.limits import MAX_MICRO_BATCHES  # cut between whole sequences (step.py)
from services.engine.ports import StagePort

DEFAULT_STAGE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Stage:
    """Layers ``[start, end)``, run here (``port is None``) or through ``port``."""

    start: int
    end: int
    port: StagePort | None = None

    @property
    def remote(self) -> bool:
        return self.port is not None

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


@dataclass(frozen=True)
class StageLayout:
    stages: tuple[Stage, ...]
    # >= 2: each micro-batch's remote stage overlaps the next ones' local layers (a step with a
    # layer hook, a prefill worker's); 2 without a hook: two step streams (pipeline.py)
    num_micro_batches: int = 1
    timeout_s: float = DEFAULT_STAGE_TIMEOUT_S  # the longest a step waits for a remote stage

    def __post_init__(self) -> None:
        if not 1 <= self.num_micro_batches <= MAX_MICRO_BATCHES:
            raise InvalidRequestError(
                f"num_micro_batches must be in [1, {MAX_MICRO_BATCHES}], "
                f"got {self.num_micro_batches}"
            )
        if self.timeout_s <= 0:
            raise InvalidRequestError(f"timeout_s must be positive, got {self.timeout_s}")
        edges = [s.start for s in self.stages] + [self.stages[-1].end if self.stages else 0]
        if not self.stages or edges[0] != 0 or any(s.start >= s.end for s in self.stages):
            raise InvalidRequestError(f"stages must cut [0, L) into non-empty ranges: {edges}")
        if any(a.end != b.start for a, b in zip(self.stages, self.stages[1:], strict=False)):
            raise InvalidRequestError(f"stages must be contiguous: {self.ranges}")

    @classmethod
    def local(cls, num_layers: int) -> StageLayout:
        return cls((Stage(0, num_layers),))

    @classmethod
    def split(
        cls,
        num_layers: int,
        start: int,
        port: StagePort,
        num_micro_batches: int = 1,
        timeout_s: float = DEFAULT_STAGE_TIMEOUT_S,
    ) -> StageLayout:
        """Layers ``[0, start)`` here, ``[start, num_layers)`` through ``port``."""
        if not 0 < start < num_layers:
            raise InvalidRequestError(f"split layer must be in [1, {num_layers - 1}], got {start}")
        stages = (Stage(0, start), Stage(start, num_layers, port))
        return cls(stages, num_micro_batches, timeout_s)

    @property
    def num_layers(self) -> int:
        return self.stages[-1].end

    @property
    def ranges(self) -> tuple[tuple[int, int, bool], ...]:
        """``(start, end, remote)`` per stage: what a snapshot reports."""
        return tuple((s.start, s.end, s.remote) for s in self.stages)

    @property
    def remote(self) -> bool:
        return any(s.remote for s in self.stages)

    @property
    def remote_layers(self) -> tuple[int, ...]:
        return tuple(i for s in self.stages if s.remote for i in s.layers)

    @property
    def ports(self) -> tuple[StagePort, ...]:
        return tuple(s.port for s in self.stages if s.port is not None)

    def without(self, port: StagePort) -> StageLayout:
        """The same cut with ``port``'s stages run here (after the port failed)."""
        stages = tuple(Stage(s.start, s.end) if s.port is port else s for s in self.stages)
        return StageLayout(stages, self.num_micro_batches, self.timeout_s)
