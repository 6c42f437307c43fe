"""Factories for the coordinator tests: fake workers behind ``ports.Workers``, a fake clock.

``FakeCluster`` holds one ``FakePort`` per worker id. Every call is appended to the cluster's
``calls`` as ``"WORKER step"`` (in the order they start), and each worker keeps the set of
migrations it holds, as a real worker would under a lease: ``prepare_donor`` and
``prepare_helper`` take one, ``release`` and ``abort`` give it back. A helper whose digests
differ needs those layers: ``copy_weights`` ships ``WEIGHT_BYTES`` a layer in ``WEIGHTS_S``.
The first copy moves ``KV_BYTES``, every later one ``DELTA_BYTES``, each in ``COPY_S``. A test can
hold a step at its start (``hold``) and fail one (``fail``); no test waits on time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from services.coordinator.ports import (
    Copied,
    DonorPrepared,
    HelperPrepared,
    LayerPlan,
    LeaseLostError,
    Renewed,
    Reverted,
    Switched,
    WeightsCopied,
    WorkerModel,
    WorkerNotFoundError,
    lease_lost,
)

NUM_LAYERS = 4
KV_BYTES = 64 << 20  # above the default copy_converged_bytes: a second round follows
DELTA_BYTES = 64
WEIGHT_BYTES = 4096
WEIGHTS_S = 0.25
COPY_S = 0.02


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Hold:
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


class FakePort:
    def __init__(self, cluster: FakeCluster, worker_id: str, num_layers: int, digest: bytes):
        self.cluster = cluster
        self.worker_id = worker_id
        self.num_layers = num_layers
        self.digest = digest
        self.held: set[str] = set()
        self.renewals: list[tuple[str, float]] = []
        self.unreachable = False
        self.draining = False  # what ``renew`` answers: the worker is stopping
        # and, per migration id: (ACTIVE here, bytes moved, sequences moved)
        self.moved: dict[str, tuple[bool, int, int]] = {}
        self.requeued_at_end = 0  # what ``abort`` answers: sequences sent back to recompute
        self.num_copies = 0

    async def _step(self, step: str) -> None:
        self.cluster.calls.append(f"{self.worker_id} {step}")
        if self.unreachable:
            raise ConnectionError(f"{self.worker_id} unreachable")
        hold = self.cluster.holds.get((self.worker_id, step))
        if hold is not None:
            hold.entered.set()
            await hold.release.wait()
        if (exc := self.cluster.failures.get((self.worker_id, step))) is not None:
            raise exc

    async def describe(self) -> WorkerModel:
        await self._step("describe")
        return WorkerModel(self.worker_id, self.num_layers, "fp-" + self.digest.hex())

    def _digests(self, plan: LayerPlan) -> dict[int, str]:
        return {i: f"{self.digest.hex()}-{i}" for i in range(plan.start_layer, plan.end_layer)}

    async def prepare_donor(self, plan: LayerPlan) -> DonorPrepared:
        await self._step("prepare donor")
        self.held.add(plan.migration_id)
        return DonorPrepared("fp-" + self.digest.hex(), self._digests(plan))

    async def prepare_helper(self, plan: LayerPlan, donor: DonorPrepared) -> HelperPrepared:
        await self._step(f"prepare helper for {sorted(donor.digests)}")
        mine = self._digests(plan)
        needed = tuple(i for i in sorted(mine) if donor.digests.get(i) != mine[i])
        self.held.add(plan.migration_id)
        return HelperPrepared(f"127.0.0.1:9{self.worker_id[-1]}00", "tcp", needed)

    async def copy_weights(self, plan: LayerPlan, helper: HelperPrepared) -> WeightsCopied:
        layers = list(helper.weights_needed)
        await self._step(f"copy weights of {layers} to {helper.data_address}")
        return WeightsCopied(WEIGHT_BYTES * len(layers), WEIGHTS_S)

    async def copy(self, plan: LayerPlan, helper: HelperPrepared) -> Copied:
        self.num_copies += 1
        await self._step(f"copy to {helper.data_address}")
        return Copied(KV_BYTES if self.num_copies == 1 else DELTA_BYTES, 3, COPY_S)

    async def switch(self, plan: LayerPlan) -> Switched:
        await self._step(f"switch micro-batches={plan.num_micro_batches}")
        return Switched(DELTA_BYTES, 3, 0.004)

    async def activate(self, plan: LayerPlan) -> None:
        await self._step(f"activate drop={plan.drop_weights}")

    async def revert(self, plan: LayerPlan) -> Reverted:
        await self._step("revert")
        back = KV_BYTES + 2 * DELTA_BYTES
        _, moved, sequences = self.moved.get(plan.migration_id, (False, 0, 0))
        return Reverted(back, 3, 0.002, 0, moved + back if moved else 0, sequences)

    async def release(self, plan: LayerPlan) -> None:
        await self._step("release")
        self.held.discard(plan.migration_id)

    async def abort(self, migration_id: str, reason: str) -> int:
        await self._step("abort")
        self.held.discard(migration_id)
        return self.requeued_at_end

    async def renew(self, migration_id: str, lease_s: float) -> Renewed:
        await self._step("renew")
        if migration_id not in self.held:
            raise LeaseLostError(lease_lost(self.worker_id))
        self.renewals.append((migration_id, lease_s))
        return Renewed(self.draining, *self.moved.get(migration_id, (False, 0, 0)))


class FakeCluster:
    """``ports.Workers`` over fake ports: ``decode-0`` and ``prefill-0`` by default."""

    def __init__(self, *worker_ids: str, digest: bytes = b"\x01") -> None:
        self.calls: list[str] = []
        self.servicers: dict[str, object] = {}  # each port's gRPC servicer, when served
        self.holds: dict[tuple[str, str], Hold] = {}
        self.failures: dict[tuple[str, str], BaseException] = {}
        ids = worker_ids or ("decode-0", "prefill-0")
        self.ports = {w: FakePort(self, w, NUM_LAYERS, digest) for w in ids}

    async def port(self, worker_id: str) -> FakePort:
        port = self.ports.get(worker_id)
        if port is None:
            raise WorkerNotFoundError(f"no worker {worker_id!r}")
        return port

    def hold(self, worker_id: str, step: str) -> Hold:
        hold = self.holds[(worker_id, step)] = Hold()
        return hold

    def fail(self, worker_id: str, step: str, exc: BaseException) -> None:
        self.failures[(worker_id, step)] = exc

    def held(self) -> dict[str, set[str]]:
        """What every worker still holds (the leak check: all empty)."""
        return {w: set(p.held) for w, p in self.ports.items()}

    def steps(self) -> list[str]:
        """``calls`` without the describes and renewals, which tests count apart."""
        return [c for c in self.calls if not c.endswith((" describe", " renew"))]
