"""The coordinator's logic: runs each migration as the state machine of ``migration.py``.

Lifecycle of one layer migration (donor A's layers ``[k, L)`` to helper B; the worker calls are
``ports.py``'s, in its order):

1. ``start_layers`` checks the request before any work (ids, range, both workers known and
   free, same number of layers), saves the migration as PLANNED, opens its trace and starts
   its driver task; the caller gets the PLANNED record at once;
2. the driver enters COPYING (A prepares and answers its layer digests, B prepares with them
   and hosts the range only if its weights are identical, A copies the KV ``copy_rounds``
   times), SWITCHING (A switches) and ACTIVE (A activates), saving each state before its work,
   so Redis always names the state whose work may be half done;
3. ``revert`` (ACTIVE only) enters REVERTING and runs A's revert, A's and B's release, DONE;
4. ``abort`` (any live state) cancels the step in flight, has A then B undo what they hold
   (A first: it must stop sending steps to B before B drops the layers), then ABORTED with a
   reason. A failed or timed-out step aborts the same way, its error as the reason;
5. ``renew_leases`` (every ``renew_interval_s``, from ``__main__``) renews the lease of each
   worker holding something for a live migration; a worker that lost it, or that no renewal
   reached for a whole lease, aborts the migration;
6. ``recover`` (at start) loads every migration from the store: one that was PLANNED, COPYING
   or SWITCHING is aborted (its half-done step is undone), an ACTIVE one is kept (its leases
   renewed again), a REVERTING one is reverted again (revert, release and abort are the only
   steps ever repeated; a worker answers a repeat harmlessly).

Nothing here imports grpc: workers are ``ports.Workers``, the store a ``MigrationStore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from opentelemetry import trace

from services.common.errors import (
    ConfigError,
    InvalidRequestError,
    PreconditionError,
    RequestNotFoundError,
)
from services.coordinator.leases import Leases
from services.coordinator.migration import (
    Migration,
    MigrationKind,
    MigrationState,
    check_layer_request,
)
from services.coordinator.ports import LayerPlan, WorkerModel, WorkerPort, Workers
from services.coordinator.spans import MigrationSpans

log = logging.getLogger(__name__)
T = TypeVar("T")
S = MigrationState


@dataclass(frozen=True)
class CoordinatorConfig:
    # What a migration holds on a worker is undone by the worker this long after the last
    # renewal; the coordinator renews every renew_interval_s.
    lease_s: float = 10.0
    renew_interval_s: float = 2.0
    # One worker call (prepare, copy, switch...) at most; past it the migration aborts.
    step_timeout_s: float = 120.0
    # One worker's abort call at most (its lease undoes the rest).
    abort_timeout_s: float = 10.0
    # KV copies before the switch: the first moves everything, each next one the delta
    # written meanwhile, so the switch's own delta (the pause) is small.
    copy_rounds: int = 2

    def __post_init__(self) -> None:
        for name in ("lease_s", "renew_interval_s", "step_timeout_s", "abort_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be finite and > 0, got {value}")
        if self.copy_rounds < 1:
            raise ConfigError(f"copy_rounds must be >= 1, got {self.copy_rounds}")
        if self.renew_interval_s >= self.lease_s:
            raise ConfigError(
                f"renew interval ({self.renew_interval_s} s) must be shorter than the lease "
                f"({self.lease_s} s)"
            )


class MigrationStore(Protocol):
    """Where migrations live across coordinator restarts (store.py: Redis)."""

    async def next_id(self) -> str: ...

    async def save(self, m: Migration) -> None: ...

    async def load_all(self) -> list[Migration]: ...


class MigrationNotFoundError(RequestNotFoundError):
    """No migration with that id."""


class Role(enum.Enum):
    DONOR = "donor"
    HELPER = "helper"


class WeightsNeededError(Exception):
    """The helper lacks identical weights for some layers; workers cannot ship weights yet."""

    def __init__(self, helper: str, layers: tuple[int, ...]) -> None:
        super().__init__(
            f"{helper} lacks identical weights for layers {list(layers)} "
            "(weight transfer is not implemented by the workers yet)"
        )


class StepError(Exception):
    """A worker call failed; carries which one, for the migration's reason."""

    def __init__(self, step: str, worker: str, cause: BaseException) -> None:
        what = "timed out" if isinstance(cause, TimeoutError) else f"{cause}"
        super().__init__(f"{step} on {worker} failed: {type(cause).__name__}: {what}")


class Coordinator:
    def __init__(
        self,
        store: MigrationStore,
        workers: Workers,
        config: CoordinatorConfig = CoordinatorConfig(),
        clock: Callable[[], float] = time.time,
        tracer: trace.Tracer | None = None,
    ) -> None:
        """``clock``: wall-clock seconds by default, since the records outlive the process."""
        self.config = config
        self._store = store
        self._workers = workers
        self._clock = clock
        self._spans = MigrationSpans(tracer or trace.get_tracer(__name__))
        self._migrations: dict[str, Migration] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._leases = Leases(workers, config.lease_s, config.renew_interval_s, clock)
        self._background: set[asyncio.Task[None]] = set()

    # -- queries --------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def list(self, live_only: bool = False) -> list[Migration]:
        return [m for m in self._migrations.values() if m.live or not live_only]

    def describe(self, migration_id: str) -> Migration:
        m = self._migrations.get(migration_id)
        if m is None:
            raise MigrationNotFoundError(f"no migration {migration_id!r}")
        return m

    async def wait(self, migration_id: str) -> Migration:
        """Until the migration's current work is over (ACTIVE, DONE or ABORTED)."""
        m = self.describe(migration_id)
        while (task := self._tasks.get(migration_id)) is not None and not task.done():
            await asyncio.wait({task})
        return m

    # -- commands -------------------------------------------------------------------------

    async def start_layers(
        self,
        donor: str,
        helper: str,
        start_layer: int,
        end_layer: int | None = None,
        num_micro_batches: int = 2,
        drop_weights: bool = False,
    ) -> Migration:
        check_layer_request(donor, helper, start_layer, end_layer, num_micro_batches)
        self._check_free(donor, helper)
        models = await asyncio.gather(*[self._describe(w) for w in (donor, helper)])
        num_layers = models[0].num_layers
        end = num_layers if end_layer is None else end_layer
        if end != num_layers or start_layer >= end:
            raise InvalidRequestError(
                f"layers [{start_layer}, {end}): only [k, {num_layers}) with 1 <= k < "
                f"{num_layers} move ({donor} has {num_layers} layers)"
            )
        if models[1].num_layers != num_layers:
            raise PreconditionError(
                f"{donor} has {num_layers} layers and {helper} {models[1].num_layers}: "
                "different models"
            )
        self._check_free(donor, helper)  # again: the describes above let others run
        m = Migration(
            await self._store.next_id(), MigrationKind.LAYERS, donor, helper, start_layer, end,
            created_at=self._clock(), num_micro_batches=num_micro_batches,
            drop_weights=drop_weights,
        )  # fmt: skip
        self._migrations[m.migration_id] = m
        self._spans.begin(m)
        await self._save(m)
        self._spawn(m, self._drive(m))
        return m

    async def revert(self, migration_id: str) -> Migration:
        m = self.describe(migration_id)
        async with self._lock(m):
            if m.state is S.ACTIVE:
                await self.wait(migration_id)  # ACTIVE is entered before the donor activates
            if m.state is not S.ACTIVE:
                raise PreconditionError(
                    f"{migration_id} is {m.state.name}; only an ACTIVE migration reverts"
                )
            await self._enter(m, S.REVERTING)
            self._spawn(m, self._drive_revert(m))
        return m

    async def abort(self, migration_id: str, reason: str = "") -> Migration:
        m = self.describe(migration_id)
        async with self._lock(m):
            if m.live:
                await self._cancel(m)
            if not m.live:
                raise PreconditionError(f"{migration_id} is already {m.state.name}")
            await self._abort(m, reason or "aborted on request")
        return m

    async def renew_leases(self) -> None:
        """Renews every held lease once; aborts the migrations a worker lost (module doc, 5)."""
        live = [
            m for m in self._migrations.values() if m.live and self._leases.holders(m.migration_id)
        ]
        results = await asyncio.gather(*[self._leases.renew(m.migration_id) for m in live])
        for m, reason in zip(live, results, strict=True):
            if reason and m.live:
                self._in_background(self._abort_quietly(m.migration_id, reason))

    async def recover(self) -> None:
        """Loads the store and picks every live migration up again (module doc, 6)."""
        for m in await self._store.load_all():
            self._migrations[m.migration_id] = m
            if not m.live:
                continue
            self._spans.resume(m)
            if m.state in (S.PLANNED, S.COPYING, S.SWITCHING):
                why = f"the coordinator restarted while the migration was {m.state.name}"
                self._in_background(self._abort_quietly(m.migration_id, why))
                continue
            self._leases.hold(m.migration_id, m.donor, m.helper)
            if m.state is S.REVERTING:
                self._spawn(m, self._drive_revert(m))

    async def close(self) -> None:
        """Stops every task without touching the workers: a restarted coordinator resumes."""
        tasks = [*self._tasks.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        now = self._clock()
        for m in self._migrations.values():
            if m.live:
                self._spans.suspend(m, now)

    # -- the driver -----------------------------------------------------------------------

    async def _drive(self, m: Migration) -> None:
        plan = self._plan(m)
        try:
            donor, helper = await self._port(m.donor), await self._port(m.helper)
            await self._enter(m, S.COPYING)
            await self._copy(m, plan, donor, helper)
            await self._enter(m, S.SWITCHING)
            switched = await self._call(m, "switch", Role.DONOR, donor.switch, plan)
            m.num_kv_bytes += switched.num_kv_bytes
            m.num_sequences, m.switch_pause_s = switched.num_sequences, switched.pause_s
            m.num_requeued += switched.num_requeued
            self._spans.annotate(
                m,
                **{"bytes.kv": switched.num_kv_bytes},
                num_sequences=switched.num_sequences,
                num_requeued=switched.num_requeued,
                pause_s=switched.pause_s,
            )
            await self._enter(m, S.ACTIVE)
            await self._call(m, "activate", Role.DONOR, donor.activate, plan)
            self._spans.annotate(m, weights_dropped=m.drop_weights)
        except Exception as exc:  # a failed step, a lost worker, or a bug: undo, never hang
            await self._abort(m, _reason(exc))

    async def _copy(
        self, m: Migration, plan: LayerPlan, donor: WorkerPort, helper: WorkerPort
    ) -> None:
        """Both sides prepared, then ``copy_rounds`` copies: everything, then the deltas."""
        prepared = await self._call(m, "prepare", Role.DONOR, donor.prepare_donor, plan)
        self._leases.hold(m.migration_id, m.donor)
        hosted = await self._call(m, "prepare", Role.HELPER, helper.prepare_helper, plan, prepared)
        self._leases.hold(m.migration_id, m.helper)
        if hosted.weights_needed:
            raise WeightsNeededError(m.helper, hosted.weights_needed)
        m.weights_skipped = True
        m.helper_data_address = hosted.data_address
        self._spans.annotate(m, weights_skipped=True, helper_data_address=hosted.data_address)
        await self._save(m)
        for round_ in range(self.config.copy_rounds):
            copied = await self._call(m, "copy", Role.DONOR, donor.copy, plan, hosted)
            m.num_kv_bytes += copied.num_kv_bytes
            m.num_sequences = max(m.num_sequences, copied.num_sequences)
            self._spans.annotate(
                m,
                **{
                    f"copy.{round_}.bytes.kv": copied.num_kv_bytes,
                    f"copy.{round_}.num_sequences": copied.num_sequences,
                    "bytes.kv": m.num_kv_bytes,
                },
            )
        await self._save(m)

    async def _drive_revert(self, m: Migration) -> None:
        plan = self._plan(m)
        try:
            donor, helper = await self._port(m.donor), await self._port(m.helper)
            reverted = await self._call(m, "revert", Role.DONOR, donor.revert, plan)
            m.num_kv_bytes += reverted.num_kv_bytes
            m.num_requeued += reverted.num_requeued
            self._spans.annotate(
                m,
                **{"bytes.kv": reverted.num_kv_bytes},
                num_sequences=reverted.num_sequences,
                num_requeued=reverted.num_requeued,
                pause_s=reverted.pause_s,
            )
            await self._call(m, "release", Role.DONOR, donor.release, plan)
            await self._call(m, "release", Role.HELPER, helper.release, plan)
            self._leases.drop(m.migration_id)
            await self._enter(m, S.DONE)
        except Exception as exc:
            await self._abort(m, _reason(exc))

    async def _abort(self, m: Migration, reason: str) -> None:
        """Donor first, then helper; each bounded, failures left to the worker's lease."""
        for worker in (m.donor, m.helper):
            try:
                port = await self._port(worker)
                with self._spans.call(m, "abort", worker, self._role(m, worker).value):
                    await asyncio.wait_for(
                        port.abort(m.migration_id, reason), self.config.abort_timeout_s
                    )
            except Exception as exc:
                log.warning(
                    "%s: abort on %s failed (%s); its lease undoes it", m.migration_id, worker, exc
                )
        self._leases.drop(m.migration_id)
        m.reason = reason
        await self._enter(m, S.ABORTED)

    # -- helpers --------------------------------------------------------------------------

    async def _call(
        self, m: Migration, step: str, role: Role, fn: Callable[..., Awaitable[T]], *args: object
    ) -> T:
        worker = m.donor if role is Role.DONOR else m.helper
        try:
            with self._spans.call(m, step, worker, role.value):
                return await asyncio.wait_for(fn(*args), self.config.step_timeout_s)
        except Exception as exc:
            raise StepError(step, worker, exc) from exc

    async def _abort_quietly(self, migration_id: str, reason: str) -> None:
        with contextlib.suppress(PreconditionError):  # it ended meanwhile
            await self.abort(migration_id, reason)

    async def _describe(self, worker: str) -> WorkerModel:
        port = await self._workers.port(worker)
        return await asyncio.wait_for(port.describe(), self.config.step_timeout_s)

    async def _port(self, worker: str) -> WorkerPort:
        return await self._workers.port(worker)

    def _check_free(self, *workers: str) -> None:
        for m in self._migrations.values():
            busy = [w for w in workers if m.live and m.involves(w)]
            if busy:
                raise PreconditionError(
                    f"{busy[0]} already takes part in {m.migration_id} ({m.state.name})"
                )

    def _plan(self, m: Migration) -> LayerPlan:
        return LayerPlan(
            m.migration_id, m.donor, m.helper, m.start_layer, m.end_layer, self.config.lease_s,
            m.num_micro_batches, m.drop_weights,
        )  # fmt: skip

    @staticmethod
    def _role(m: Migration, worker: str) -> Role:
        return Role.DONOR if worker == m.donor else Role.HELPER

    async def _enter(self, m: Migration, state: MigrationState) -> None:
        left, now = m.state, self._clock()
        m.enter(state, now)
        self._spans.enter(m, left, now)
        await self._save(m)

    async def _save(self, m: Migration) -> None:
        # Shielded: a cancelled step must not leave Redis behind the state already entered.
        await asyncio.shield(self._store.save(m))

    async def _cancel(self, m: Migration) -> None:
        task = self._tasks.get(m.migration_id)
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _lock(self, m: Migration) -> asyncio.Lock:
        return self._locks.setdefault(m.migration_id, asyncio.Lock())

    def _spawn(self, m: Migration, work: Awaitable[None]) -> None:
        self._tasks[m.migration_id] = asyncio.ensure_future(work)

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _reason(exc: BaseException) -> str:
    return (
        str(exc)
        if isinstance(exc, (StepError, WeightsNeededError))
        else f"{type(exc).__name__}: {exc}"
    )
