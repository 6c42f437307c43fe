"""The requests the router holds for want of room, in line: first come, first served.

A request that finds no worker with room now waits (``Router.route`` raises NoRoomNowError and
its caller tries again every ``admission_poll_s``); while it waits, the blocks it needs are held
for it on every worker whose pool could hold it, so that later, smaller requests do not pass
it for ever. Each request's place in line is ``(since, request_id)``: when it first found no
room, then its id.

Every routing attempt asks how many blocks the requests ahead of it hold on each worker. Summed
over the whole line at each attempt, that cost O(waiting) per attempt, and every waiter is tried
again every 50 ms: O(waiting²) work per poll. 3,000 requests arriving at once on two workers
had not been routed after 120 s of the simulator's wall time (probe, session 44). Here the line
is kept per set of workers the waiters could use (in practice one or two sets: every decode
worker large enough), each with the running total of its blocks in line order, so an attempt
costs a binary search per set; a set's totals are rebuilt only when a waiter leaves it or joins
it anywhere but at the end (a request first waiting joins at the end: its ``since`` is now).
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from typing import NamedTuple


class Waiter(NamedTuple):
    """A request the router holds for want of room."""

    last: float  # when it last found no room
    since: float  # when it first did: its place in the line
    worker_ids: tuple[str, ...]  # the workers whose pools hold it in total
    num_blocks: int  # what it needs on one of them


class _Line:
    """The waiters of one set of workers, ordered by ``(since, request_id)``, with the running
    total of their blocks (``totals[i]``: the blocks of the first ``i``)."""

    def __init__(self) -> None:
        self.members: dict[str, tuple[float, int]] = {}  # request id -> (since, blocks)
        self._keys: list[tuple[float, str]] = []
        self._totals: list[int] = [0]
        self._stale = False

    def add(self, request_id: str, since: float, num_blocks: int) -> None:
        self.members[request_id] = (since, num_blocks)
        key = (since, request_id)
        if self._stale or (self._keys and key < self._keys[-1]):
            self._stale = True
            return
        self._keys.append(key)
        self._totals.append(self._totals[-1] + num_blocks)

    def remove(self, request_id: str) -> None:
        del self.members[request_id]
        self._stale = True

    def ahead_of(self, key: tuple[float, str]) -> int:
        """The blocks of the waiters strictly ahead of ``key`` in line."""
        if self._stale:
            self._rebuild()
        return self._totals[bisect.bisect_left(self._keys, key)]

    def _rebuild(self) -> None:
        ordered = sorted((since, rid, n) for rid, (since, n) in self.members.items())
        self._keys = [(since, rid) for since, rid, _ in ordered]
        self._totals = [0, *itertools.accumulate(n for _, _, n in ordered)]
        self._stale = False


class WaitingRoom:
    """Who waits for room, for which workers, and since when (``Router``'s, one event loop).

    ``wait`` records a failed attempt; ``leave`` a request routed or settled; ``forget``
    drops the waiters not tried for ``ttl_s`` (their callers gave up); ``held_ahead_of`` is
    what a routing attempt must leave free; ``count`` what a worker's memory is waited for by.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._waiters: OrderedDict[str, Waiter] = OrderedDict()  # least recently tried first
        self._lines: dict[tuple[str, ...], _Line] = {}

    def __len__(self) -> int:
        return len(self._waiters)

    def get(self, request_id: str) -> Waiter | None:
        return self._waiters.get(request_id)

    def wait(
        self, request_id: str, now: float, worker_ids: tuple[str, ...], num_blocks: int
    ) -> None:
        """``request_id`` found no room at ``now``: it keeps its place if it was waiting."""
        old = self._waiters.pop(request_id, None)
        since = old.since if old is not None else now
        self._waiters[request_id] = Waiter(now, since, worker_ids, num_blocks)
        if old is not None and (old.worker_ids, old.num_blocks) == (worker_ids, num_blocks):
            return
        if old is not None:
            self._leave_line(request_id, old.worker_ids)
        self._lines.setdefault(worker_ids, _Line()).add(request_id, since, num_blocks)

    def leave(self, request_id: str) -> None:
        old = self._waiters.pop(request_id, None)
        if old is not None:
            self._leave_line(request_id, old.worker_ids)

    def forget(self, now: float) -> None:
        while self._waiters and now - next(iter(self._waiters.values())).last > self.ttl_s:
            request_id, old = self._waiters.popitem(last=False)
            self._leave_line(request_id, old.worker_ids)

    def held_ahead_of(self, request_id: str, now: float) -> dict[str, int]:
        """Blocks per worker held for the requests ahead of ``request_id`` in line (of every
        waiter, if it is not waiting: it would join at ``now``)."""
        mine = self._waiters.get(request_id)
        key = (mine.since if mine is not None else now, request_id)
        held: dict[str, int] = {}
        for worker_ids, line in self._lines.items():
            blocks = line.ahead_of(key)
            if blocks:
                for worker_id in worker_ids:
                    held[worker_id] = held.get(worker_id, 0) + blocks
        return held

    def count(self, worker_id: str) -> int:
        """Waiters whose request this worker could hold once its running requests end."""
        return sum(len(line.members) for ids, line in self._lines.items() if worker_id in ids)

    def _leave_line(self, request_id: str, worker_ids: tuple[str, ...]) -> None:
        line = self._lines[worker_ids]
        line.remove(request_id)
        if not line.members:
            del self._lines[worker_ids]
