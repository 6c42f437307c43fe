"""Which workers hold something for each live migration, and their lease renewals.

A worker becomes a holder when its prepare call returns (or, after a restart, for every
migration found ACTIVE or REVERTING) and stops being one when the migration ends. ``renew``
renews a migration's leases on all its holders at once and says why the migration must abort:
a worker that no longer holds it (``LeaseLostError``), or one that no renewal reached for a
whole lease (by then the worker has undone it on its own); which holders said they are
stopping (the coordinator then ends the migration at once: core.renew_leases); and what each
answered it has moved (an attention donor's refills: ``MigrationDriver.follow``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from services.coordinator.ports import LeaseLostError, Renewed, Workers


@dataclass(frozen=True)
class Renewal:
    lost: str = ""  # why the migration must abort; "": renewed where it could be
    stopping: tuple[str, ...] = ()  # the holders that answered they are stopping
    answers: dict[str, Renewed] = field(default_factory=dict)  # each holder that answered


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

    async def renew(self, migration_id: str) -> Renewal:
        """Renews the migration's leases once."""
        held = self._held.get(migration_id, {})
        workers = list(held)
        results = await asyncio.gather(
            *[self._renew_one(migration_id, w) for w in workers], return_exceptions=True
        )
        now = self._clock()
        stopping: list[str] = []
        answers: dict[str, Renewed] = {}
        for worker, result in zip(workers, results, strict=True):
            if worker not in held:  # dropped while the renewal was in flight
                continue
            if isinstance(result, LeaseLostError):  # its message says why, naming the worker
                return Renewal(str(result))
            if not isinstance(result, BaseException):
                held[worker] = now
                answers[worker] = result
                if result.draining:
                    stopping.append(worker)
            elif now - held[worker] >= self.lease_s:
                since = now - held[worker]
                return Renewal(f"no lease renewal reached {worker} for {since:.1f} s ({result})")
        return Renewal(stopping=tuple(stopping), answers=answers)

    async def _renew_one(self, migration_id: str, worker: str) -> Renewed:
        port = await self._workers.port(worker)
        return await asyncio.wait_for(port.renew(migration_id, self.lease_s), self._call_timeout_s)
