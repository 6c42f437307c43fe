"""How one migration's states are driven through its two workers; ``core.Coordinator`` decides
when (start, revert, abort, recovery) and runs each as a task.

1. ``forward`` (from PLANNED): COPYING (donor A prepares and answers its layer digests, helper
   B prepares with them and hosts the range, naming the layers whose weights it lacks; A ships
   those if any, then copies the KV up to ``copy_rounds`` times, stopping after a round that
   moved little (``copy_converged_bytes``); weights, KV copy and switch timed
   apart), SWITCHING (A switches) and ACTIVE (A activates), saving each state before its work,
   so the store always names the state whose work may be half done;
2. ``revert`` (from REVERTING): A's revert, A's and B's release, DONE;
3. ``abort``: A then B undo what they hold (A first: it must stop sending steps to B before B
   drops the layers), each call bounded, failures left to the worker's lease; then ABORTED
   with a reason. A failed or timed-out step of 1 or 2 aborts the same way, its error as the
   reason.

Every worker call is bounded by ``step_timeout_s`` and traced as a child of the migration's
state span (spans.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from services.common.limits import clip_reason
from services.coordinator.config import CoordinatorConfig
from services.coordinator.leases import Leases
from services.coordinator.migration import Migration, MigrationKind, MigrationState
from services.coordinator.ports import LayerPlan, WorkerPort, Workers
from services.coordinator.spans import MigrationSpans

log = logging.getLogger(__name__)
T = TypeVar("T")
S = MigrationState


class MigrationStore(Protocol):
    """Where migrations live across coordinator restarts (store.py: Redis)."""

    async def next_id(self, after: int = 0) -> str:
        """A new id ``m-N``, with N above ``after`` and every N handed out before."""
        ...

    async def save(self, m: Migration) -> None: ...

    async def load_all(self) -> list[Migration]: ...

    async def delete(self, migration_ids: list[str]) -> None:
        """Forget ended migrations (``CoordinatorConfig.keep_ended``)."""
        ...


class Role(enum.Enum):
    DONOR = "donor"
    HELPER = "helper"


class StepError(Exception):
    """A worker call failed; carries which one, for the migration's reason."""

    def __init__(self, step: str, worker: str, cause: BaseException) -> None:
        what = "timed out" if isinstance(cause, TimeoutError) else f"{cause}"
        super().__init__(f"{step} on {worker} failed: {type(cause).__name__}: {what}")


class MigrationDriver:
    def __init__(
        self,
        store: MigrationStore,
        workers: Workers,
        config: CoordinatorConfig,
        clock: Callable[[], float],
        spans: MigrationSpans,
        leases: Leases,
    ) -> None:
        self.config = config
        self.clock = clock
        self._store = store
        self._workers = workers
        self._spans = spans
        self._leases = leases

    async def forward(self, m: Migration) -> None:
        plan = self._plan(m)
        try:
            donor, helper = await self._port(m.donor), await self._port(m.helper)
            await self.enter(m, S.COPYING)
            await self._copy(m, plan, donor, helper)
            await self.enter(m, S.SWITCHING)
            switched = await self._call(m, "switch", Role.DONOR, donor.switch, plan)
            m.num_kv_bytes += switched.num_kv_bytes
            m.num_switch_kv_bytes = switched.num_kv_bytes
            m.num_sequences, m.switch_pause_s = switched.num_sequences, switched.pause_s
            m.num_requeued += switched.num_requeued
            if m.kind is MigrationKind.ATTENTION:
                m.num_blocks = switched.num_blocks
                self._spans.annotate(m, num_blocks=switched.num_blocks)
            self._spans.annotate(
                m,
                **{"bytes.kv": switched.num_kv_bytes},
                num_sequences=switched.num_sequences,
                num_requeued=switched.num_requeued,
                pause_s=switched.pause_s,
            )
            await self.enter(m, S.ACTIVE)
            await self._call(m, "activate", Role.DONOR, donor.activate, plan)
            self._spans.annotate(m, weights_dropped=m.drop_weights)
        except Exception as exc:  # a failed step, a lost worker, or a bug: undo, never hang
            await self.abort(m, _reason(exc))

    async def _copy(
        self, m: Migration, plan: LayerPlan, donor: WorkerPort, helper: WorkerPort
    ) -> None:
        """Both sides prepared, then up to ``copy_rounds`` copies: everything, then the deltas,
        until one moves at most ``copy_converged_bytes`` (a layer migration's)."""
        prepared = await self._call(m, "prepare", Role.DONOR, donor.prepare_donor, plan)
        self._leases.hold(m.migration_id, m.donor)
        hosted = await self._call(m, "prepare", Role.HELPER, helper.prepare_helper, plan, prepared)
        self._leases.hold(m.migration_id, m.helper)
        m.weights_skipped = not hosted.weights_needed
        m.helper_data_address = hosted.data_address
        self._spans.annotate(
            m, weights_skipped=m.weights_skipped, helper_data_address=hosted.data_address
        )
        if hosted.weights_needed:  # the helper lacks them: the donor ships them first
            shipped = await self._call(
                m, "copy_weights", Role.DONOR, donor.copy_weights, plan, hosted
            )
            m.num_weight_bytes, m.weights_s = shipped.num_bytes, shipped.duration_s
            self._spans.annotate(
                m,
                **{"bytes.weights": shipped.num_bytes, "weights_s": shipped.duration_s},
                weights_shipped=list(hosted.weights_needed),
            )
        await self.save(m)
        for round_ in range(self.config.copy_rounds):
            copied = await self._call(m, "copy", Role.DONOR, donor.copy, plan, hosted)
            m.num_kv_bytes += copied.num_kv_bytes
            m.num_copy_kv_bytes += copied.num_kv_bytes
            m.kv_copy_s += copied.duration_s
            m.num_sequences = max(m.num_sequences, copied.num_sequences)
            self._spans.annotate(
                m,
                **{
                    f"copy.{round_}.bytes.kv": copied.num_kv_bytes,
                    f"copy.{round_}.num_sequences": copied.num_sequences,
                    "bytes.kv": m.num_kv_bytes,
                },
            )
            converged = copied.num_kv_bytes <= self.config.copy_converged_bytes
            if m.kind is MigrationKind.LAYERS and converged:
                break  # the switch copies once more before its pause
            # (an attention migration's rounds choose sequences as they grow: each may find
            # more to copy, and its switch copies nothing itself)
        await self.save(m)

    @staticmethod
    def follow(m: Migration, donor_kv_bytes: int, donor_sequences: int) -> None:
        """A refilling attention donor moves more sequences while ACTIVE, on its own: what it
        says it has moved before its revert (its staged copies, then the refills) and for how
        many sequences joins the record. Callers pass an ACTIVE donor's word only (or its
        revert's, less the revert): before, a copy may be in flight."""
        if m.kind is not MigrationKind.ATTENTION:
            return
        refilled = donor_kv_bytes - m.num_copy_kv_bytes
        if refilled > m.num_refill_kv_bytes:
            m.num_kv_bytes += refilled - m.num_refill_kv_bytes
            m.num_refill_kv_bytes = refilled
        m.num_sequences = max(m.num_sequences, donor_sequences)

    async def revert(self, m: Migration) -> None:
        plan = self._plan(m)
        try:
            donor, helper = await self._port(m.donor), await self._port(m.helper)
            reverted = await self._call(m, "revert", Role.DONOR, donor.revert, plan)
            if reverted.donor_kv_bytes:  # the refills since the last renewal, then the revert
                moved = reverted.donor_kv_bytes - reverted.num_kv_bytes
                self.follow(m, moved, reverted.donor_sequences)
            m.num_kv_bytes += reverted.num_kv_bytes
            m.num_requeued += reverted.num_requeued
            self._spans.annotate(
                m,
                **{"bytes.kv": reverted.num_kv_bytes},
                num_sequences=reverted.num_sequences,
                num_requeued=reverted.num_requeued,
                pause_s=reverted.pause_s,
            )
            # Before the releases: a renewal that reached a released worker would find the
            # migration over and abort one that reverted.
            self._leases.drop(m.migration_id)
            await self._call(m, "release", Role.DONOR, donor.release, plan)
            await self._call(m, "release", Role.HELPER, helper.release, plan)
            await self.enter(m, S.DONE)
        except Exception as exc:
            await self.abort(m, _reason(exc))

    async def abort(self, m: Migration, reason: str) -> None:
        """Donor first, then helper; each bounded, failures left to the worker's lease."""
        reason = clip_reason(reason)  # an error's text can be long; the record is listed
        for worker in (m.donor, m.helper):
            try:
                port = await self._port(worker)
                with self._spans.call(m, "abort", worker, self._role(m, worker).value):
                    requeued = await asyncio.wait_for(
                        port.abort(m.migration_id, reason), self.config.abort_timeout_s
                    )
                if worker == m.donor and requeued > m.num_requeued_at_end:  # once, if repeated
                    m.num_requeued += requeued - m.num_requeued_at_end
                    m.num_requeued_at_end = requeued
            except Exception as exc:
                log.warning(
                    "%s: abort on %s failed (%s); its lease undoes it", m.migration_id, worker, exc
                )
        self._leases.drop(m.migration_id)
        m.reason = reason
        await self.enter(m, S.ABORTED)

    async def _call(
        self, m: Migration, step: str, role: Role, fn: Callable[..., Awaitable[T]], *args: object
    ) -> T:
        worker = m.donor if role is Role.DONOR else m.helper
        t0 = self.clock()
        try:
            with self._spans.call(m, step, worker, role.value):
                result = await asyncio.wait_for(fn(*args), self.config.step_timeout_s)
        except Exception as exc:
            raise StepError(step, worker, exc) from exc
        # A migration's time to ACTIVE is the sum of these (each visit of a worker's engine
        # thread waits for the step in flight): one line each, as in its trace.
        took = self.clock() - t0
        log.info("%s: %s on %s (%s) took %.3f s", m.migration_id, step, worker, role.value, took)
        return result

    async def _port(self, worker: str) -> WorkerPort:
        return await self._workers.port(worker)

    def _plan(self, m: Migration) -> LayerPlan:
        return LayerPlan(
            m.migration_id, m.donor, m.helper, m.start_layer, m.end_layer, self.config.lease_s,
            m.num_micro_batches, m.drop_weights, m.kind, m.request_ids, m.max_sequences,
            m.max_blocks_per_sequence, m.refill,
        )  # fmt: skip

    @staticmethod
    def _role(m: Migration, worker: str) -> Role:
        return Role.DONOR if worker == m.donor else Role.HELPER

    async def enter(self, m: Migration, state: MigrationState) -> None:
        left, now = m.state, self.clock()
        m.enter(state, now)
        self._spans.enter(m, left, now)
        await self.save(m)

    async def save(self, m: Migration) -> None:
        # Shielded: a cancelled step must not leave Redis behind the state already entered.
        await asyncio.shield(self._store.save(m))


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, StepError) else f"{type(exc).__name__}: {exc}"
