"""Routing policies: which prefill worker gets a request, and which decode worker keeps it.

Who calls what: ``Router.route`` calls ``PrefillPolicy.choose`` once per request, with a
non-empty list of HEALTHY candidate snapshots sorted by worker id, and uses the worker it
returns. A policy may keep its own state (a cursor, an affinity map), which only ``choose``
changes; it never changes worker state: the router records the assignment in the registry.

- ``LoadPolicy`` (default) looks at load alone (queued prompt tokens, then U), never at where
  a prefix is cached.
- ``RoundRobinPolicy`` ignores load too; a fixed-order baseline.
- ``PrefixAffinityPolicy`` is the cache-aware baseline that load-aware routing is measured
  against: it follows cached prefixes even onto a hot worker.

The decode worker is the same for every policy (``most_free_blocks``): decode is bound by KV
memory, so the worker with the most free blocks takes it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.hashing import BlockHash
from services.router.registry import WorkerInfo


@dataclass(frozen=True)
class RequestView:
    """What a policy may know about a request."""

    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    # Hashes of the prompt's full blocks, for the cluster's fingerprint and block size.
    block_hashes: tuple[BlockHash, ...]
    # KV blocks the request needs on its decode worker: prompt + max_tokens tokens.
    num_kv_blocks: int


class PrefillPolicy(Protocol):
    def choose(self, workers: Sequence[WorkerInfo], request: RequestView) -> WorkerInfo:
        """Pick one of ``workers`` (non-empty, sorted by id) to prefill ``request``."""
        ...


def least_loaded(workers: Sequence[WorkerInfo]) -> WorkerInfo:
    """The shortest queue of prompt tokens (reported + routed since and not yet counted),
    then the lowest U, then the lowest id (deterministic; a burst alternates via the tokens
    routed to each).

    The queue comes first because it is what a new prompt waits behind; U's compute part is
    mostly the busy fraction over the last second, which says how busy a worker was, not how
    long a prompt would wait there: a mixed worker decoding reads 1.0 and starts a new prompt
    within a step, while one that was idle half the last second reads 0.5 with seconds of
    prompts queued. Ranked on U first, a burst went wholly to the worker that had been idle
    (``bench compare``, colocated: six requests in 170 ms to one worker, ten in a row). U
    breaks ties (an empty queue on both: the less busy, or the one with more free KV), and
    requests that cannot fit a worker's KV never reach a policy (``Router.route``)."""
    return min(workers, key=lambda w: (w.num_queued_tokens, w.utilisation, w.worker_id))


def most_free_blocks(workers: Sequence[WorkerInfo]) -> WorkerInfo:
    return min(workers, key=lambda w: (-w.num_free_blocks, w.worker_id))


class LoadPolicy:
    """The least loaded worker (``least_loaded``: queued prompt work, then U = max(U_compute,
    U_memory), DESIGN.md §5)."""

    def choose(self, workers: Sequence[WorkerInfo], request: RequestView) -> WorkerInfo:
        return least_loaded(workers)


class RoundRobinPolicy:
    """The next worker after the last one chosen, in id order, wrapping around.

    Keyed by id rather than by position so that a worker joining or leaving does not make
    the cycle skip or repeat anyone else.
    """

    def __init__(self) -> None:
        self._last_id: str | None = None

    def choose(self, workers: Sequence[WorkerInfo], request: RequestView) -> WorkerInfo:
        after = [w for w in workers if self._last_id is None or w.worker_id > self._last_id]
        chosen = after[0] if after else workers[0]
        self._last_id = chosen.worker_id
        return chosen


class PrefixAffinityPolicy:
    """The worker that most recently took the longest prefix of the request's blocks.

    The map block hash → worker id is a bounded LRU. Block hashes are chained, so a hit on
    block i means that worker saw the whole prefix up to i. Without a hit among the
    candidates, falls back to the least-loaded worker. Every routed request's blocks are
    then attributed to the chosen worker, since that is where its KV will be cached.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._owner: OrderedDict[BlockHash, str] = OrderedDict()

    def choose(self, workers: Sequence[WorkerInfo], request: RequestView) -> WorkerInfo:
        chosen = self._longest_prefix_holder(workers, request) or least_loaded(workers)
        self._remember(request.block_hashes, chosen.worker_id)
        return chosen

    def _longest_prefix_holder(
        self, workers: Sequence[WorkerInfo], request: RequestView
    ) -> WorkerInfo | None:
        by_id = {w.worker_id: w for w in workers}
        for block_hash in reversed(request.block_hashes):
            owner = self._owner.get(block_hash)
            # An owner that is not a candidate (removed, wrong role) holds nothing usable.
            if owner is not None and owner in by_id:
                return by_id[owner]
        return None

    def _remember(self, block_hashes: Sequence[BlockHash], worker_id: str) -> None:
        for block_hash in block_hashes:
            self._owner[block_hash] = worker_id
            self._owner.move_to_end(block_hash)
        while len(self._owner) > self._capacity:
            self._owner.popitem(last=False)

    def __len__(self) -> int:
        return len(self._owner)
