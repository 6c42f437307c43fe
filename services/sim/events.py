"""The discrete-event loop: simulated time and the callbacks due at each instant.

A heap of ``(time, sequence number, callback)``: events run in time order, and events due at
the same instant in the order they were scheduled, so a run is a pure function of its inputs.
A small loop rather than simpy: the simulator's actors are callbacks on a few kinds of event
(arrival, step end, transfer end, report, decision), not long-lived processes, and a
128-worker run schedules millions of them — a bare heap costs a push and a pop each, where a
simpy ``Timeout`` and its generator resumption cost several times that (docs/simulator.md).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.num_events = 0

    def clock(self) -> float:
        """The loop's time, for code that takes an injected clock (router, load meter)."""
        return self.now

    def at(self, when: float, callback: Callable[[], None]) -> None:
        if when < self.now:
            raise ValueError(f"event at {when} is in the past (now {self.now})")
        heapq.heappush(self._heap, (when, next(self._seq), callback))

    def after(self, delay: float, callback: Callable[[], None]) -> None:
        self.at(self.now + delay, callback)

    def run(self, until: float = float("inf"), stop: Callable[[], bool] | None = None) -> None:
        """Run events due up to ``until`` (then time stands at ``until`` if finite), or until
        ``stop()`` holds after an event."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            self.now, _, callback = heapq.heappop(heap)
            callback()
            self.num_events += 1
            if stop is not None and stop():
                return
        if until != float("inf"):
            self.now = max(self.now, until)

    @property
    def pending(self) -> int:
        return len(self._heap)
