"""What the coordinator needs of the workers: ``Workers`` finds them, ``WorkerPort`` drives one.

Who calls what, and when (one layer migration of donor A's layers ``[k, L)`` to helper B; every
call comes from the coordinator's event loop, one step at a time per migration):

1. StartMigration: ``Workers.port`` for A and B, ``describe`` on both (layer counts, models);
2. COPYING: ``A.prepare_donor`` (A records the migration under a lease, answers its layer
   digests), ``B.prepare_helper`` with them (B hosts the range and answers its data-plane
   address, naming the layers whose weights it lacks or holds differently), ``A.copy_weights``
   of those if any (over the data plane; B checks each layer's digest), then ``A.copy`` a few
   times (the KV of A's in-flight sequences that B lacks: everything, then
   the deltas, while A keeps serving);
3. SWITCHING: ``A.switch`` (the last delta; A's steps use B from the next step on);
4. ACTIVE: ``A.activate`` (A frees the moved layers when asked to);
5. REVERTING: ``A.revert`` (KV back, A takes the layers), then ``release`` on A and on B;
6. any time: ``abort`` on A then B (each undoes what it holds for the migration);
7. while the migration lives: ``renew`` on each worker that holds something for it, every
   ``CoordinatorConfig.renew_interval_s``. A worker whose lease runs out undoes the migration
   on its own, so no worker waits for a dead coordinator. ``renew`` answers whether the
   worker is stopping (its drain): the coordinator then reverts the migration (ACTIVE) or
   aborts it (before), so the worker can go without its peer falling back. It also answers
   what the worker has moved so far, which an attention donor's refills add to while ACTIVE.

Every call is keyed by the migration id. A restarted coordinator repeats only ``revert``,
``release`` and ``abort`` (core.recover), which a worker that already did them answers
harmlessly. Failures are raised as ``BanaServeError``s (a worker's refusal keeps its
meaning: ``InvalidRequestError``, ``ResourceExhaustedError``...); ``LeaseLostError`` from
``renew`` says the worker no longer holds the migration at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from services.common.errors import BanaServeError, RequestNotFoundError
from services.coordinator.migration import MigrationKind


class LeaseLostError(BanaServeError):
    """The worker holds nothing for this migration (its lease ran out, it restarted, or it ended
    the migration itself); the message says which worker and, when it knows, why."""


def lease_lost(worker_id: str) -> str:
    """Why, when the worker keeps no record of the migration at all."""
    return f"{worker_id} no longer holds the migration (its lease ran out, or it restarted)"


class WorkerNotFoundError(RequestNotFoundError):
    """No worker with that id is known to the router."""


@dataclass(frozen=True)
class WorkerModel:
    """What a worker runs, as far as a migration cares."""

    worker_id: str
    num_layers: int
    fingerprint: str


@dataclass(frozen=True)
class LayerPlan:
    """Every step call of one layer migration carries this."""

    migration_id: str
    donor: str
    helper: str
    start_layer: int
    end_layer: int
    lease_s: float
    num_micro_batches: int = 2
    drop_weights: bool = False
    # kind ATTENTION: whole KV blocks of the donor's sequences move, every layer (start 0, end L)
    kind: MigrationKind = MigrationKind.LAYERS
    request_ids: tuple[str, ...] = ()
    max_sequences: int = 0
    max_blocks_per_sequence: int = 0
    refill: bool = False


@dataclass(frozen=True)
class DonorPrepared:
    fingerprint: str
    digests: dict[int, str]  # layer -> weight digest, for the layers the donor holds


@dataclass(frozen=True)
class HelperPrepared:
    data_address: str  # where the helper takes hidden states and KV
    data_transport: str = ""
    # Layers whose weights the helper lacks or holds differently: the donor ships them.
    weights_needed: tuple[int, ...] = ()


@dataclass(frozen=True)
class WeightsCopied:
    num_bytes: int  # weight bytes shipped to the helper
    duration_s: float  # how long shipping them took on the donor


@dataclass(frozen=True)
class Copied:
    num_kv_bytes: int
    num_sequences: int
    duration_s: float = 0.0  # this copy stage, on the donor


@dataclass(frozen=True)
class Switched:
    num_kv_bytes: int  # the last delta
    num_sequences: int
    pause_s: float  # how long the donor's steps waited
    num_requeued: int = 0  # sequences sent back to recompute
    num_blocks: int = 0  # attention migrations: KV blocks now attended on the helper


@dataclass(frozen=True)
class Reverted:
    num_kv_bytes: int
    num_sequences: int
    pause_s: float
    num_requeued: int = 0
    # The donor's totals for the migration after it (its view; 0: not known), which count what
    # an attention donor's refills moved while ACTIVE.
    donor_kv_bytes: int = 0
    donor_sequences: int = 0


@dataclass(frozen=True)
class Renewed:
    """A worker's answer to ``renew``."""

    draining: bool = False  # it is stopping (module docstring, 7)
    active: bool = False  # it holds the migration ACTIVE
    # What it has moved for the migration so far, both ways, and for how many distinct
    # sequences (an attention donor's refills move more while ACTIVE: the record follows).
    num_kv_bytes: int = 0
    num_sequences: int = 0


class WorkerPort(Protocol):
    """The MigrationWorker calls on one worker (order and meaning: module docstring)."""

    async def describe(self) -> WorkerModel: ...

    async def prepare_donor(self, plan: LayerPlan) -> DonorPrepared: ...

    async def prepare_helper(self, plan: LayerPlan, donor: DonorPrepared) -> HelperPrepared: ...

    async def copy_weights(self, plan: LayerPlan, helper: HelperPrepared) -> WeightsCopied: ...

    async def copy(self, plan: LayerPlan, helper: HelperPrepared) -> Copied: ...

    async def switch(self, plan: LayerPlan) -> Switched: ...

    async def activate(self, plan: LayerPlan) -> None: ...

    async def revert(self, plan: LayerPlan) -> Reverted: ...

    async def release(self, plan: LayerPlan) -> None: ...

    async def abort(self, migration_id: str, reason: str) -> int:
        """Sequences the worker's end of the migration sent back to recompute (a donor's
        located or hosted ones; the same number however often it is asked)."""
        ...

    async def renew(self, migration_id: str, lease_s: float) -> Renewed: ...


class Workers(Protocol):
    """Finds workers by id (the router's ``ListWorkers`` in a cluster)."""

    async def port(self, worker_id: str) -> WorkerPort:
        """Raises ``WorkerNotFoundError`` for an id no one knows."""
        ...
