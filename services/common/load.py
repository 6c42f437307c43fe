"""A worker's load over a sliding window (DESIGN.md §5), for its reports to the router."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadSnapshot:
    """What a load report carries (router.proto ``LoadReport``), over the last window."""

    num_queued_prefill_tokens: int
    num_running_seqs: int
    num_waiting_seqs: int
    num_blocks_used: int
    num_blocks_free: int
    step_time_s: float
    busy_fraction: float
    window_s: float


class LoadMeter:
    """Mean step time and busy fraction over the last ``window_s`` (DESIGN.md §5)."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self._window_s = window_s
        self._clock = clock
        self._steps: deque[tuple[float, float]] = deque()

    def record(self, start: float, end: float) -> None:
        self._steps.append((start, end))

    def snapshot(self) -> tuple[float, float]:
        """(mean step seconds, busy fraction in [0, 1]) over the window ending now."""
        now = self._clock()
        begin = now - self._window_s
        while self._steps and self._steps[0][1] <= begin:
            self._steps.popleft()
        if not self._steps:
            return 0.0, 0.0
        busy = sum(end - max(start, begin) for start, end in self._steps)
        mean = sum(end - start for start, end in self._steps) / len(self._steps)
        return mean, min(1.0, busy / self._window_s)
