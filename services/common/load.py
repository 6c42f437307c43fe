"""A worker's load (DESIGN.md §5): the one report type, its utilisation, and the step meter.

Workers build a ``LoadReport`` from their engine's counters every ~100 ms and send it to the
router (``services/rpc/load_reports.py`` converts it to and from router.proto ``LoadReport``);
the router keeps the last one per worker and judges load with ``utilisation``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from services.common.errors import InvalidRequestError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


_COUNTS = (
    "num_queued_prefill_tokens",
    "num_running_seqs",
    "num_waiting_seqs",
    "num_blocks_used",
    "num_blocks_free",
    "num_hosted_layers",
    "num_hosted_blocks",
    "num_hosted_layer_blocks",
)


@dataclass(frozen=True)
class LoadReport:
    """What a worker reports (router.proto ``LoadReport``), over its last window.

    Hosted work is what the worker does for others' migrations: layers it runs for another
    worker's sequences, and KV blocks it holds for another worker's attention. Hosted blocks
    come from the worker's own KV pool, so they are also counted in ``num_blocks_used``.
    """

    num_queued_prefill_tokens: int  # prompt tokens admitted but not yet computed
    num_running_seqs: int
    num_waiting_seqs: int
    num_blocks_used: int
    num_blocks_free: int
    step_time_s: float  # mean engine step over the window
    busy_fraction: float  # share of the window spent stepping, in [0, 1]
    window_s: float
    num_hosted_layers: int = 0
    num_hosted_blocks: int = 0
    # KV blocks in use for the hosted layers: each hosted range has a pool of its own (its
    # Prepare's size), so num_blocks_used does not count them.
    num_hosted_layer_blocks: int = 0
    # Requests (the router's ids) this report is the first to count: admitted since the
    # worker's previous report. The router keeps counting a request it sent against the
    # worker's load until a report names it (``services/router/registry.py``).
    admitted: tuple[str, ...] = ()
    # Stopping: it finishes what it has and takes nothing new (router.proto ``draining``).
    draining: bool = False

    def __post_init__(self) -> None:
        for name in _COUNTS:
            value = getattr(self, name)
            _check(value >= 0, f"{name} must be >= 0, got {value}")
        _check(all(self.admitted), "admitted request ids must be non-empty")
        _check(
            math.isfinite(self.step_time_s) and self.step_time_s >= 0,
            f"step_time_s must be finite and >= 0, got {self.step_time_s}",
        )
        _check(
            0.0 <= self.busy_fraction <= 1.0,
            f"busy_fraction must be in [0, 1], got {self.busy_fraction}",
        )
        _check(
            math.isfinite(self.window_s) and self.window_s >= 0,
            f"window_s must be finite and >= 0, got {self.window_s}",
        )

    @property
    def num_blocks(self) -> int:
        return self.num_blocks_used + self.num_blocks_free


class Admissions:
    """The requests a worker admitted since its last load report, for the next one.

    A worker calls ``add`` once its load figures count the request (after the engine command
    that admitted it published its snapshot; a prefill worker at once, its queue being read
    live), and ``take`` while building a report from those figures, on the same thread. Holds
    at most ``limit`` ids (the oldest are dropped: the router then forgets those requests'
    assignments when they end instead)."""

    def __init__(self, limit: int = 1024) -> None:
        self._ids: deque[str] = deque(maxlen=limit)

    def add(self, request_id: str) -> None:
        self._ids.append(request_id)

    def take(self) -> tuple[str, ...]:
        ids = tuple(self._ids)
        self._ids.clear()
        return ids


def utilisation_compute(
    report: LoadReport, prefill_capacity_tokens: int, full_step_s: float = 0.0
) -> float:
    """Busy fraction, or queued prefill work over what counts as a full worker if higher.

    ``full_step_s`` > 0 weighs the busy fraction by how full the steps were (their mean
    length over ``full_step_s``, at most 1). A decode worker steps as long as it holds one
    sequence, and a step of a few sequences costs about what one of many does (the weights
    are read once a step): its plain busy fraction is ~1 at any batch (0.98 with 2 sequences
    and with 12 in ``bench compare``). Off by default (the plain busy fraction, DESIGN.md §5):
    with 0.25 s the coordinator moved prefill layers onto decode workers that did not pay
    (docs/coordinator.md, ``full_step_s``)."""
    busy = report.busy_fraction
    if full_step_s > 0:
        busy *= min(1.0, report.step_time_s / full_step_s)
    return max(busy, report.num_queued_prefill_tokens / prefill_capacity_tokens)


def utilisation_memory(report: LoadReport, waiting_for_room: int = 0) -> float:
    """KV blocks used over the pool; a worker without a free block (or any) is full, and so
    is one that requests wait for room on (``waiting_for_room``, the router's count: it holds
    a request until some pool has room for its prompt and ``max_tokens``, so a pool that is
    the bound keeps a few blocks free that no waiting request fits in)."""
    if report.num_blocks_free == 0 or waiting_for_room > 0:
        return 1.0
    return report.num_blocks_used / report.num_blocks


def utilisation(
    report: LoadReport, prefill_capacity_tokens: int, waiting_for_room: int = 0
) -> float:
    """DESIGN.md §5: ``U = max(U_compute, U_memory)``. ``prefill_capacity_tokens``: queued
    prompt tokens that count as a fully busy worker (``U_compute = 1``)."""
    return max(
        utilisation_compute(report, prefill_capacity_tokens),
        utilisation_memory(report, waiting_for_room),
    )


# A step that begins within this of the last one's end continues the same work (the engine
# loop starts the next step at once; a worker that waited for work starts later).
BACK_TO_BACK_S = 0.05


class LoadMeter:
    """Mean step time and busy fraction over the last ``window_s`` (DESIGN.md §5).

    ``record`` adds a step once it ended (the event loop's thread); ``begin``/``end`` mark the
    step in flight (the stepping thread), so a step longer than the window (a long prefill)
    counts as busy while it runs instead of as idle until it ends. With no step ended in the
    window, the step in flight is as long as it has run so far, or as the last step if it
    began right as that one ended (``BACK_TO_BACK_S``): a long prompt's next chunk, which the
    coordinator's time estimate must not read as a short step just begun."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self._window_s = window_s
        self._clock = clock
        self._steps: deque[tuple[float, float]] = deque()
        self._in_flight: float | None = None  # start of the step running now
        self._last: tuple[float, float] | None = None  # the last step recorded

    def begin(self, start: float) -> None:
        self._in_flight = start

    def end(self) -> None:
        self._in_flight = None

    def record(self, start: float, end: float) -> None:
        self._steps.append((start, end))
        self._last = (start, end)

    def snapshot(self) -> tuple[float, float]:
        """(mean step seconds, busy fraction in [0, 1]) over the window ending now."""
        now = self._clock()
        begin = now - self._window_s
        while self._steps and self._steps[0][1] <= begin:
            self._steps.popleft()
        in_flight = self._in_flight
        running = 0.0 if in_flight is None else max(0.0, now - max(in_flight, begin))
        if not self._steps:  # only a step in flight: as long as it ran, or as the last one
            if in_flight is None:
                return 0.0, 0.0
            step = now - in_flight
            last = self._last
            if last is not None and abs(in_flight - last[1]) <= BACK_TO_BACK_S:
                step = max(step, last[1] - last[0])
            return step, min(1.0, running / self._window_s)
        busy = sum(end - max(start, begin) for start, end in self._steps) + running
        mean = sum(end - start for start, end in self._steps) / len(self._steps)
        return mean, min(1.0, busy / self._window_s)
