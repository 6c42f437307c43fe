"""The coordinator's logic: runs each migration as the state machine of ``migration.py``; this
module keeps the table of migrations and decides when each state's work runs (driver.py does it).

Lifecycle of one layer migration (donor A's layers ``[k, L)`` to helper B; the worker calls are
``ports.py``'s, in its order):

1. ``start_layers`` checks the request before any work (ids, range, both workers known and
   free, same number of layers), saves the migration as PLANNED, opens its trace and starts
   its driver task; the caller gets the PLANNED record at once;
2. its driver task (driver.py, ``MigrationDriver.forward``) enters COPYING (both workers
   prepare, weights if the helper lacks them, the KV copied up to ``copy_rounds`` times),
   SWITCHING and ACTIVE, saving each state before its work, so Redis always names the state
   whose work may be half done;
3. ``revert`` (ACTIVE only) enters REVERTING and runs the driver's revert: A's revert, A's and
   B's release, DONE;
4. ``abort`` (any live state) cancels the step in flight and runs the driver's abort: A then B
   undo what they hold, then ABORTED with a reason. A failed or timed-out step aborts the same
   way, its error as the reason;
5. ``renew_leases`` (every ``renew_interval_s``, from ``__main__``) renews the lease of each
   worker holding something for a live migration; a worker that lost it, or that no renewal
   reached for a whole lease, aborts the migration. A worker that answers it is stopping (its
   drain, on SIGTERM) has the migration ended at once, cleanly: reverted if ACTIVE, aborted if
   not yet (its drain waits for that, so its peer never falls back because it went);
6. ``drain`` (on SIGTERM, before the server stops): one more renewal, and the migrations of
   workers that are stopping too (a cluster torn down at once: compose's ``down``, a
   ``kubectl delete``) are ended as in 5 before the coordinator goes, within its drain; the
   others are kept, ACTIVE, for the next coordinator (a restart of the coordinator alone
   changes nothing);
7. ``recover`` (at start) loads every migration from the store: one that was PLANNED, COPYING
   or SWITCHING is aborted (its half-done step is undone), an ACTIVE one is kept (its leases
   renewed again), a REVERTING one is reverted again (revert, release and abort are the only
   steps ever repeated; a worker answers a repeat harmlessly).

Nothing here imports grpc: workers are ``ports.Workers``, the store a ``MigrationStore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from opentelemetry import trace

from services.common.errors import (
    BanaServeError,
    DependencyUnavailableError,
    InvalidRequestError,
    PreconditionError,
    RequestNotFoundError,
)
from services.common.limits import clip_reason
from services.coordinator.config import CoordinatorConfig
from services.coordinator.driver import MigrationDriver, MigrationStore
from services.coordinator.leases import Leases
from services.coordinator.migration import (
    Migration,
    MigrationKind,
    MigrationState,
    check_attention_request,
    check_layer_request,
    id_number,
)
from services.coordinator.ports import WorkerModel, Workers
from services.coordinator.spans import MigrationSpans

log = logging.getLogger(__name__)
T = TypeVar("T")
S = MigrationState
DEFAULT_CONFIG = CoordinatorConfig()
# How long a draining coordinator keeps asking its live migrations' workers whether they stop.
DRAIN_SETTLE_S = 1.0


def _add_totals(
    m: Migration,
    now: float,
    num_bytes: dict[tuple[str, str], int],
    seconds: dict[tuple[str, str], float],
) -> None:
    kind = m.kind.value
    for what, n in (("weights", m.num_weight_bytes), ("kv", m.num_kv_bytes)):
        num_bytes[kind, what] = num_bytes.get((kind, what), 0) + n
    for t in m.timings:
        key = (kind, t.state.value)
        seconds[key] = seconds.get(key, 0.0) + t.duration(now)


class MigrationNotFoundError(RequestNotFoundError):
    """No migration with that id."""


class Coordinator:
    def __init__(
        self,
        store: MigrationStore,
        workers: Workers,
        config: CoordinatorConfig = DEFAULT_CONFIG,
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
        # Held from a start's last check that its workers are free to its record in the table:
        # the id comes from Redis (an await), and two starts on one worker must not both pass.
        self._starting = asyncio.Lock()
        self._leases = Leases(workers, config.lease_s, config.renew_interval_s, clock)
        self._driver = MigrationDriver(store, workers, config, clock, self._spans, self._leases)
        self._background: set[asyncio.Task[Any]] = set()
        self._ending: set[str] = set()  # migrations being ended for a stopping worker
        # What the ended migrations ``trim`` forgot moved and spent (``totals``).
        self._forgotten: tuple[dict[tuple[str, str], int], dict[tuple[str, str], float]] = ({}, {})
        self._closing = False
        # Set once ``drain`` begins: the service refuses new commands (servicer.py), which the
        # server's stop would otherwise cancel half-way; its own ends of migrations go on.
        self.draining = False
        # Automatic mode's ``DecisionStats`` (auto.py), once it runs: ListMigrations shows the
        # utilisations its policy saw at its last decision.
        self.auto_stats: Any = None

    # -- queries --------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def list(self, live_only: bool = False) -> list[Migration]:
        return [m for m in self._migrations.values() if m.live or not live_only]

    def totals(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], float]]:
        """Bytes moved by ``(kind, "weights"|"kv")`` and seconds spent by ``(kind, state)``,
        over every migration this process has known: those in the table (a state still open
        counts up to now) and those ``trim`` forgot. The coordinator's counters
        (services/common/metrics.py) read these, so they never go down as the table stays
        bounded (probe, session 44: with ``--keep-ended 1`` the KV bytes went 12,191,744 → 0)."""
        num_bytes, seconds = dict(self._forgotten[0]), dict(self._forgotten[1])
        now = self._clock()
        for m in self._migrations.values():
            _add_totals(m, now, num_bytes, seconds)
        return num_bytes, seconds

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
        automatic: bool = False,
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
        async with self._starting:
            self._check_free(donor, helper)  # again: the describes above let others run
            m = Migration(
                await self._next_id(), MigrationKind.LAYERS, donor, helper, start_layer, end,
                created_at=self._clock(), num_micro_batches=num_micro_batches,
                drop_weights=drop_weights, automatic=automatic,
            )  # fmt: skip
            self._migrations[m.migration_id] = m
        return await self._begin(m)

    async def start_attention(
        self,
        donor: str,
        helper: str,
        request_ids: tuple[str, ...] = (),
        max_sequences: int = 0,
        max_blocks_per_sequence: int = 0,
        refill: bool = False,
        automatic: bool = False,
    ) -> Migration:
        """Whole KV blocks (every layer) of the donor's longest running sequences, or of
        ``request_ids``, move to the helper, which attends over them for the donor; the same
        states, calls and checks as ``start_layers``, with every layer (``[0, L)``). ``refill``:
        while ACTIVE the donor keeps up to ``max_sequences`` located as located ones end."""
        check_attention_request(
            donor, helper, max_sequences, max_blocks_per_sequence, tuple(request_ids), refill
        )
        self._check_free(donor, helper)
        models = await asyncio.gather(*[self._describe(w) for w in (donor, helper)])
        if (models[0].num_layers, models[0].fingerprint) != (
            models[1].num_layers,
            models[1].fingerprint,
        ):
            raise PreconditionError(
                f"{donor} and {helper} run different models: KV of one never mixes with the other"
            )
        async with self._starting:
            self._check_free(donor, helper)  # again: the describes above let others run
            m = Migration(
                await self._next_id(), MigrationKind.ATTENTION, donor, helper, 0,
                models[0].num_layers, created_at=self._clock(), num_micro_batches=1,
                request_ids=tuple(request_ids), max_sequences=max_sequences,
                max_blocks_per_sequence=max_blocks_per_sequence, refill=refill,
                automatic=automatic,
            )  # fmt: skip
            self._migrations[m.migration_id] = m
        return await self._begin(m)

    async def _begin(self, m: Migration) -> Migration:
        """From the registration of ``m`` to its driver task, with no await between: a caller
        cancelled or past its deadline while PLANNED is saved leaves a migration that runs, not
        one that holds both workers with nothing to move it on (session 40's probe). The
        caller gets the PLANNED record once it is saved, or the store's error (the migration
        then ends ABORTED, no worker called)."""
        self._spans.begin(m)
        recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._spawn(m, self._save_then_forward(m, recorded))
        await recorded  # cancelled with its caller: the task goes on
        return m

    async def _save_then_forward(self, m: Migration, recorded: asyncio.Future[None]) -> None:
        try:
            await self._driver.save(m)
        except Exception as exc:  # noqa: BLE001 - the caller's, when it still waits
            if not recorded.done():
                recorded.set_exception(exc)
            m.reason = clip_reason(f"not recorded in the store: {exc}")
            with contextlib.suppress(Exception):  # in memory now; the store is away
                await self._driver.enter(m, S.ABORTED)
            return
        if not recorded.done():
            recorded.set_result(None)
            await asyncio.sleep(0)  # the caller, woken first, answers PLANNED
        await self._driver.forward(m)

    async def revert(self, migration_id: str) -> Migration:
        """Runs to its end whatever becomes of the caller (``_unless_cut``)."""
        return await self._unless_cut(self._revert(self.describe(migration_id)))

    async def _revert(self, m: Migration) -> Migration:
        async with self._lock(m):
            if m.state is S.ACTIVE:
                await self.wait(m.migration_id)  # ACTIVE is entered before the donor activates
            if m.state is not S.ACTIVE:
                raise PreconditionError(
                    f"{m.migration_id} is {m.state.name}; only an ACTIVE migration reverts"
                )
            await self._driver.enter(m, S.REVERTING)
            self._spawn(m, self._driver.revert(m))
        return m

    async def abort(self, migration_id: str, reason: str = "") -> Migration:
        """Runs to its end whatever becomes of the caller (``_unless_cut``): cut after it had
        cancelled the step in flight, it left a COPYING migration nothing moved on (session
        40's probe)."""
        m = self.describe(migration_id)
        task = self._tasks.get(migration_id)
        if m.live and task is not None and not self._lock(m).locked():
            task.cancel()  # now, as the caller asks: its step stops before another begins
        return await self._unless_cut(self._abort(m, reason))

    async def _abort(self, m: Migration, reason: str) -> Migration:
        async with self._lock(m):
            if m.live:
                await self._cancel(m)
            if not m.live:
                raise PreconditionError(f"{m.migration_id} is already {m.state.name}")
            await self._driver.abort(m, reason or "aborted on request")
        await self.trim()
        return m

    async def trim(self) -> None:
        """Forgets the oldest ended migrations past ``config.keep_ended``, here and in the
        store, so that the table (and ListMigrations) stays bounded however long the
        coordinator runs. The newest migration is never among them (``_next_id`` needs it)."""
        ended = sorted((m for m in self._migrations.values() if not m.live), key=lambda m: m.number)
        old = [
            m.migration_id
            for m in ended[: max(0, len(ended) - self.config.keep_ended)]
            if not self._busy(m.migration_id)
        ]
        if not old:
            return
        now = self._clock()
        for migration_id in old:
            _add_totals(self._migrations.pop(migration_id), now, *self._forgotten)
            self._locks.pop(migration_id, None)
            self._tasks.pop(migration_id, None)
        try:
            await self._store.delete(old)
        except (DependencyUnavailableError, PreconditionError) as exc:  # a restart trims again
            log.warning("could not delete %d ended migrations from the store: %s", len(old), exc)

    def _busy(self, migration_id: str) -> bool:
        task = self._tasks.get(migration_id)
        lock = self._locks.get(migration_id)
        return (task is not None and not task.done()) or (lock is not None and lock.locked())

    async def renew_leases(self) -> None:
        """Renews every held lease once; aborts the migrations a worker lost (module doc, 5)."""
        live = [
            m for m in self._migrations.values() if m.live and self._leases.holders(m.migration_id)
        ]
        results = await asyncio.gather(*[self._leases.renew(m.migration_id) for m in live])
        for m, renewal in zip(live, results, strict=True):
            if not m.live:
                continue
            if renewal.lost:
                self._in_background(self._abort_quietly(m.migration_id, renewal.lost))
            elif renewal.stopping and m.migration_id not in self._ending:
                self._ending.add(m.migration_id)  # at once: ``drain`` waits for it
                self._in_background(self._end_for_stop(m, renewal.stopping[0]))
            donor = renewal.answers.get(m.donor)
            if donor is not None and donor.active:
                self._driver.follow(m, donor.num_kv_bytes, donor.num_sequences)

    async def _end_for_stop(self, m: Migration, worker: str) -> None:
        """``worker`` is stopping: revert ``m`` if ACTIVE, abort it if not there yet (a
        REVERTING one is already on its way out)."""
        try:
            if m.state is S.ACTIVE:
                log.info("%s: %s is stopping: reverting", m.migration_id, worker)
                with contextlib.suppress(PreconditionError):  # it ended meanwhile
                    await self.revert(m.migration_id)
                    self._spans.annotate(m, reverted_for=f"{worker} is stopping")
            elif m.state in (S.PLANNED, S.COPYING, S.SWITCHING):
                await self._abort_quietly(m.migration_id, f"{worker} is stopping")
        except BanaServeError as exc:  # the store: the next renewal tries again
            log.warning("%s: not ended for stopping %s: %s", m.migration_id, worker, exc)
        finally:
            self._ending.discard(m.migration_id)

    async def drain(
        self, timeout_s: float, poll_s: float = 0.05, settle_s: float = DRAIN_SETTLE_S
    ) -> None:
        """Before the coordinator stops (module doc, 6): within ``timeout_s``, ends the
        migrations of workers that answer they are stopping, and waits for those ending.

        While migrations are live it asks again every ``poll_s`` for ``settle_s``: workers sent
        SIGTERM with it (compose's ``down``, ``kubectl delete``) may handle theirs a moment
        after its first renewal reached them, and would answer that one as running (session
        38: the coordinator then stopped at once, and the leases ended the migration)."""
        self.draining = True
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            try:
                await asyncio.wait_for(self.renew_leases(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return
            now = time.monotonic()
            live = [m for m in self._migrations.values() if m.live]
            ending = any(m.migration_id in self._ending or m.state is S.REVERTING for m in live)
            if now >= deadline or not (ending or (live and now - start < settle_s)):
                return
            await asyncio.sleep(poll_s)

    async def recover(self) -> None:
        """Loads the store and picks every live migration up again (module doc, 7)."""
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
                self._spawn(m, self._driver.revert(m))
        await self.trim()

    async def close(self) -> None:
        """Stops every task without touching the workers: a restarted coordinator resumes."""
        self._closing = True
        tasks = [*self._tasks.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        now = self._clock()
        for m in self._migrations.values():
            if m.live:
                self._spans.suspend(m, now)

    # -- helpers --------------------------------------------------------------------------

    async def _next_id(self) -> str:
        """The store's next id; if it is one this coordinator holds already, Redis came back
        empty: every record held is written back and ids go on above the highest."""
        migration_id = await self._store.next_id()
        held = max((m.number for m in self._migrations.values()), default=0)
        if id_number(migration_id) > held:
            return migration_id
        log.warning(
            "the store's ids start over at %s: writing back %d migrations",
            migration_id,
            len(self._migrations),
        )
        for m in list(self._migrations.values()):
            await self._driver.save(m)
        return await self._store.next_id(after=held)

    async def _abort_quietly(self, migration_id: str, reason: str) -> None:
        with contextlib.suppress(PreconditionError):  # it ended meanwhile
            await self.abort(migration_id, reason)

    async def _describe(self, worker: str) -> WorkerModel:
        """The worker's model; an error names the worker and what was asked (a start against a
        frozen worker read ``UNAVAILABLE: UNAVAILABLE: Stream removed (ping timeout)``)."""
        port = await self._workers.port(worker)
        timeout_s = self.config.step_timeout_s
        try:
            return await asyncio.wait_for(port.describe(), timeout_s)
        except TimeoutError:
            raise DependencyUnavailableError(
                f"{worker} did not answer within {timeout_s:g}s when asked for its model"
            ) from None
        except BanaServeError as e:  # its status is the error's: not again in its text
            detail = re.sub(r"^[A-Z_]+: ", "", str(e))
            raise type(e)(f"cannot read {worker}'s model: {detail}") from None

    def _check_free(self, *workers: str) -> None:
        for m in self._migrations.values():
            busy = [w for w in workers if m.live and m.involves(w)]
            if busy:
                raise PreconditionError(
                    f"{busy[0]} already takes part in {m.migration_id} ({m.state.name})"
                )

    async def _cancel(self, m: Migration) -> None:
        task = self._tasks.get(m.migration_id)
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _lock(self, m: Migration) -> asyncio.Lock:
        return self._locks.setdefault(m.migration_id, asyncio.Lock())

    def _spawn(self, m: Migration, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks[m.migration_id] = task
        task.add_done_callback(lambda _: self._ended(m))

    def _ended(self, m: Migration) -> None:
        if not m.live and not self._closing:
            self._in_background(self.trim())

    def _in_background(self, work: Awaitable[T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _unless_cut(self, work: Awaitable[Migration]) -> Migration:
        """``work``'s result; a caller cancelled (its deadline, its client gone) stops waiting
        for it but does not stop it: a command on a migration is done whole or not begun.
        (``close`` cancels it with the rest.)"""
        task = self._in_background(work)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # (its caller's)
        return await asyncio.shield(task)
