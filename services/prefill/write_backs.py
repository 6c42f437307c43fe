"""The prefill worker's store write-backs, deferred until it has nothing to compute.

A write-back (store_prefix.py) reads a prompt's new full blocks of every layer back from the
worker's prefix cache and sends them to a KV store node, which copies and checksums them. None
of that is on the TTFT path, but all of it is CPU: for a 2,000-token prompt of smollm2 (~90 MB)
a few ms on the worker to gather it into a reused buffer and ~50 ms on the node besides
receiving it. On a machine whose cores the workers are pinned to that CPU is taken from the
prompts queued behind: measured (docs/benchmarks.md, session 9), banaserve's TTFT p50 at
rate × 2 was 1.3–2.0× that of a run without write-backs (long-context, mixed, bursty).
Deferring them helped `mixed` (TTFT p50 ÷ static PD 1.18 against 1.46 at once), not bursts.

So a write-back waits here until the worker has no request queued or computing (``busy``
false), or until the oldest has waited ``max_delay_s`` (a worker that is never idle still
shares its prefixes, late), and they run one at a time. What waits is bounded: past
``max_bytes`` of pending KV the oldest is dropped (a store is a cache: a dropped write-back
costs a later hit, never an output). ``max_delay_s`` 0: each one as soon as those before it
are done, busy or not.

A pending write-back holds no KV, only the prompt: its blocks stay in the engine's prefix cache
until evicted, and one evicted by the time it runs is not written (``num_evicted``). Holding a
copy of every prompt's KV until then made the worker fault in ~500 MB of fresh pages every
10 s at saturation and cut its throughput (session 9, benchmarks.md): under load the cache,
not a second copy, decides what gets shared.

Which blocks are written is the worker's write policy (``--store-write-policy``,
``blocks_to_write``): by default only the *reused* ones - the prompt's blocks from the first that
the worker's own prefix cache held or the store's lookup had seen asked for before (its seen
marks, services/kvstore/metadata.py). Most prompts share nothing (every prompt of the
long-context, bursty and mixed benchmarks): writing them all cost the store node ~10 % of a core
on the cores the workers run on, and filled its LRU pool with blocks nobody asks for again,
evicting the shared ones. A prefix asked for a second time, on any worker, is written then; the
third ask fetches it. ``all``: every new full block at its first sight (Mooncake-style).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Defaults (prefill ``--store-write-back-delay`` / ``--store-write-back-max-mib``): a burst on
# this project's 2-core figures lasts seconds; 512 MiB holds ~5 long prompts of a small model.
DEFAULT_MAX_DELAY_S = 5.0
DEFAULT_MAX_BYTES = 512 << 20


class WritePolicy(enum.Enum):
    """Which new full blocks of a prompt a prefill worker writes to the store."""

    REUSED = "reused"  # those held or asked for before (own prefix cache, the store's marks)
    ALL = "all"  # every one, at its first sight


def blocks_to_write(policy: WritePolicy, num_known: int, num_seen: int, num_full: int) -> range:
    """The prompt's blocks to write back: from ``num_known`` (the store had those) to its
    ``num_full`` full blocks (``ALL``) or to the ``num_seen`` reused ones (``REUSED``)."""
    end = num_full if policy is WritePolicy.ALL else min(num_seen, num_full)
    return range(num_known, max(num_known, end))


@dataclass(frozen=True)
class WriteBackStats:
    num_done: int = 0
    num_dropped: int = 0  # over max_bytes, or pending when the worker stopped
    num_evicted: int = 0  # ran, but some blocks had left the prefix cache (not written)
    num_bytes_pending: int = 0  # waiting or being written
    num_pending: int = 0  # waiting
    num_not_reused: int = 0  # nothing to write under the REUSED policy (never queued)


@dataclass
class _Pending:
    run: Callable[[], Coroutine[Any, Any, bool]]  # False: some blocks were evicted first
    num_bytes: int
    queued_at: float


class WriteBacks:
    def __init__(
        self,
        busy: Callable[[], bool],
        max_delay_s: float = DEFAULT_MAX_DELAY_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_delay_s < 0 or max_bytes < 0:
            raise ValueError(f"max_delay_s and max_bytes must be >= 0: {max_delay_s}, {max_bytes}")
        self._busy = busy
        self.max_delay_s, self.max_bytes = max_delay_s, max_bytes
        self._clock = clock
        self._queue: collections.deque[_Pending] = collections.deque()
        self._running: _Pending | None = None
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._num_done = self._num_dropped = self._num_evicted = self._num_not_reused = 0

    @property
    def stats(self) -> WriteBackStats:
        return WriteBackStats(
            self._num_done,
            self._num_dropped,
            self._num_evicted,
            self._bytes(),
            len(self._queue),
            self._num_not_reused,
        )

    def not_reused(self) -> None:
        """A prompt with nothing to write under the REUSED policy (counted, never queued)."""
        self._num_not_reused += 1

    def _bytes(self) -> int:
        running = 0 if self._running is None else self._running.num_bytes
        return running + sum(p.num_bytes for p in self._queue)

    def add(self, run: Callable[[], Coroutine[Any, Any, bool]], num_bytes: int) -> None:
        """Queue ``run()`` (a write-back of ``num_bytes`` of KV); event loop only."""
        if num_bytes > self.max_bytes:
            self._num_dropped += 1
            log.info("store write-back of %d bytes dropped: over the %d pending at most",
                     num_bytes, self.max_bytes)  # fmt: skip
            return
        while self._queue and self._bytes() + num_bytes > self.max_bytes:
            self._drop(self._queue.popleft(), "the pending write-backs are over their bound")
        self._queue.append(_Pending(run, num_bytes, self._clock()))
        if self._task is None:
            self._task = asyncio.ensure_future(self._drain())
        self._kick.set()

    def kick(self) -> None:
        """The worker's work changed (a request ended): look again."""
        self._kick.set()

    async def close(self) -> None:
        """Stops; what is still pending is dropped (the store is a cache)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            self._drop(self._queue.popleft(), "the worker is stopping")

    def _drop(self, pending: _Pending, why: str) -> None:
        self._num_dropped += 1
        log.info("store write-back of %d bytes dropped: %s", pending.num_bytes, why)

    def _due(self) -> float:
        """Seconds until the oldest may run even on a busy worker (<= 0: now)."""
        if not self._busy():
            return 0.0
        return self._queue[0].queued_at + self.max_delay_s - self._clock()

    async def _drain(self) -> None:
        while True:
            while not self._queue:
                self._kick.clear()
                await self._kick.wait()
            wait = self._due()
            if wait > 0:
                self._kick.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), wait)
                continue
            self._running = self._queue.popleft()
            try:
                # Logs a store failure itself (store_prefix.write_back).
                complete = await self._running.run()
            except Exception:  # a defect: the next write-backs still run
                log.exception("store write-back failed")
            else:
                if complete:
                    self._num_done += 1
                else:
                    self._num_evicted += 1
            finally:
                self._running = None
