"""Which workers hold something for each live migration, and their lease renewals.

A worker becomes a holder when its prepare call returns (or, after a restart, for every
migration found ACTIVE or REVERTING) and stops being one when the migration ends. ``renew``
renews a migration's leases on all its holders at once and says why the migration must abort:
a worker that no longer holds it (``LeaseLostError``), or one that no renewal reached for a
whole lease (by then the worker has undone it on its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.coordinator.ports import LeaseLostError, Workers


class Leases:
    def __init__(
        self, workers: Workers, lease_s: float, call_timeout_s: float, clock: Callable[[], float]
    ) -> None:
        self._workers = workers
        self.lease_s = lease_s
        self._call_timeout_s = call_timeout_s
        self._clock = clock
        # migration id -> worker id -> when a renewal (or the prepare) last reached it
        self._held: dict[str, dict[str, float]] = {}

    def hold(self, migration_id: str, *workers: str) -> None:
        now = self._clock()
        held = self._held.setdefault(migration_id, {})
        for worker in workers:
            held[worker] = now

    def drop(self, migration_id: str) -> None:
        self._held.pop(migration_id, {}).clear()  # cleared: a renewal in flight ignores it

    def holders(self, migration_id: str) -> tuple[str, ...]:
        return tuple(self._held.get(migration_id, ()))

    async def renew(self, migration_id: str) -> str:
        """Renews the migration's leases once; why it must abort, or ""."""
        held = self._held.get(migration_id, {})
        workers = list(held)
        results = await asyncio.gather(
            *[self._renew_one(migration_id, w) for w in workers], return_exceptions=True
        )
        now = self._clock()
        for worker, result in zip(workers, results, strict=True):
            if worker not in held:  # dropped while the renewal was in flight
                continue
            if isinstance(result, LeaseLostError):  # its message says why, naming the worker
                return str(result)
            if not isinstance(result, BaseException):
                held[worker] = now
            elif now - held[worker] >= self.lease_s:
                since = now - held[worker]
                return f"no lease renewal reached {worker} for {since:.1f} s ({result})"
        return ""

    async def _renew_one(self, migration_id: str, worker: str) -> None:
        port = await self._workers.port(worker)
        await asyncio.wait_for(port.renew(migration_id, self.lease_s), self._call_timeout_s)
