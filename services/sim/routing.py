"""The router as the simulator runs it: the real ``Router``, with snapshots kept between changes.

``WorkerRegistry.healthy()`` builds a fresh ``WorkerInfo`` of every worker on every route: at
128 workers and 10,000 requests that is 1.3 M snapshots, most of the simulator's time, for
snapshots that only change when their worker reports or is assigned work. ``CachedRegistry``
is the real registry (same reports, estimates, expiry and snapshots: ``_snapshot`` is its
own) that keeps each worker's last snapshot until that worker changes, so a route costs two
snapshots instead of N. Two differences, neither read by any routing policy:
``seconds_since_seen`` is as of the worker's last change, and silent workers are swept at most
every ``sweep_s`` (simulated workers never fall silent).
"""

from __future__ import annotations

from services.common.load import LoadReport
from services.router.core import Router
from services.router.registry import WorkerInfo, WorkerRegistry, WorkerStatus


class CachedRegistry(WorkerRegistry):
    def __init__(self, base: WorkerRegistry, sweep_s: float) -> None:
        self.__dict__.update(base.__dict__)  # same config, clock and (empty) workers
        self._sweep_s = sweep_s
        self._last_sweep = -float("inf")
        self._cache: dict[str, WorkerInfo] = {}
        self._healthy_cache: list[WorkerInfo] | None = None

    def _changed(self, worker_id: str) -> None:
        self._cache.pop(worker_id, None)
        self._healthy_cache = None

    def register(self, worker_id, address, role, capacity):  # noqa: ANN001, ANN201
        self._changed(worker_id)
        return super().register(worker_id, address, role, capacity)

    def report(self, worker_id, load, timestamp):  # noqa: ANN001, ANN201
        self._changed(worker_id)
        return super().report(worker_id, load, timestamp)

    def assign(self, worker_id, request_id, num_tokens, num_blocks):  # noqa: ANN001, ANN201
        self._changed(worker_id)
        return super().assign(worker_id, request_id, num_tokens, num_blocks)

    def _forget(self, worker, request_id):  # noqa: ANN001, ANN202
        forgot = super()._forget(worker, request_id)
        if forgot:
            self._changed(worker.worker_id)
        return forgot

    def mark_full(self, worker_id):  # noqa: ANN001, ANN201
        self._changed(worker_id)
        return super().mark_full(worker_id)

    def _remove(self, worker, reason):  # noqa: ANN001, ANN201
        self._changed(worker.worker_id)
        return super()._remove(worker, reason)

    def _expire(self, now: float) -> list[str]:
        if now - self._last_sweep < self._sweep_s:
            return []
        self._last_sweep = now
        return super()._expire(now)

    def healthy(self) -> list[WorkerInfo]:
        now = self._clock()
        self._expire(now)
        if self._healthy_cache is None:
            live = sorted(
                (w for w in self._workers.values() if w.status is WorkerStatus.HEALTHY),
                key=lambda w: w.worker_id,
            )
            self._healthy_cache = [self._cached(w, now) for w in live]
        return self._healthy_cache

    def last_reports(self) -> list[tuple[str, float, LoadReport]]:
        """(worker id, receipt time, report) of each HEALTHY worker that has reported: what
        ``ListWorkers`` answers the coordinator's feed, without a snapshot of every worker."""
        return [
            (w.worker_id, w.last_seen, w.last_report)
            for w in self._workers.values()
            if w.status is WorkerStatus.HEALTHY and w.last_report is not None
        ]

    def _cached(self, worker, now: float) -> WorkerInfo:  # noqa: ANN001
        info = self._cache.get(worker.worker_id)
        if info is None:
            info = self._cache[worker.worker_id] = self._snapshot(worker, now)
        return info


def sim_router(router: Router, sweep_s: float) -> Router:
    """``router`` with its registry replaced by a ``CachedRegistry`` over the same state."""
    router._registry = CachedRegistry(router._registry, sweep_s)
    return router
