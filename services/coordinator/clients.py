"""The coordinator's calls to other services: the router (who the workers are, where they
listen) and each worker's MigrationWorkerService (``ports.WorkerPort`` over gRPC).

``RouterWorkers`` resolves a worker id through the router's ``ListWorkers`` (refreshed when an
id is missing, so a worker that registered since is found) and keeps one channel per worker
address. Channels carry the process's tracing interceptors, so each call joins the migration's
trace (services/coordinator/spans.py). Worker errors come back as the domain errors their status
codes stand for (one table, ``ERRORS``), so a migration's reason names what the worker said.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from services.common import errors
from services.common.config import RpcConfig
from services.common.fencing import epoch_metadata
from services.coordinator.migration import MigrationKind
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
from services.rpc import aio_calls
from services.rpc.channels import open_channel
from services.rpc.convert import (
    DATA_TRANSPORT_FROM_PROTO,
    DATA_TRANSPORT_TO_PROTO,
    duration,
    seconds,
)
from services.rpc.gen.banaserve.v1 import migration_pb2 as mpb
from services.rpc.gen.banaserve.v1 import migration_pb2_grpc, router_pb2, router_pb2_grpc
from services.rpc.tracing import DISABLED, Tracing

C = grpc.StatusCode
ERRORS: dict[grpc.StatusCode, type[errors.BanaServeError]] = {
    C.INVALID_ARGUMENT: errors.InvalidRequestError,
    C.NOT_FOUND: errors.RequestNotFoundError,
    C.ALREADY_EXISTS: errors.AlreadyExistsError,
    C.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    C.FAILED_PRECONDITION: errors.PreconditionError,
    C.UNAVAILABLE: errors.DependencyUnavailableError,
    C.DEADLINE_EXCEEDED: errors.DependencyUnavailableError,
}
ENDED = (mpb.MIGRATION_WORKER_STATE_DONE, mpb.MIGRATION_WORKER_STATE_ABORTED)
REVERTED = (mpb.MIGRATION_WORKER_STATE_REVERTING, mpb.MIGRATION_WORKER_STATE_DONE)


def _domain(exc: grpc.aio.AioRpcError) -> errors.BanaServeError:
    cls = ERRORS.get(exc.code(), errors.BanaServeError)
    return cls(f"{exc.code().name}: {exc.details() or ''}")


class GrpcWorkerPort:
    """``ports.WorkerPort`` over one worker's MigrationWorkerService."""

    def __init__(self, workers: RouterWorkers, worker_id: str, address: str) -> None:
        self._workers = workers
        self.worker_id = worker_id
        self.address = address
        self._stub = migration_pb2_grpc.MigrationWorkerServiceStub(workers.channel(address))

    async def _call(self, method: str, request: object) -> object:
        metadata = epoch_metadata(self._workers.epoch())
        try:
            return await aio_calls.unary(getattr(self._stub, method)(request, metadata=metadata))
        except grpc.aio.AioRpcError as exc:
            raise _domain(exc) from None

    async def describe(self) -> WorkerModel:
        reply = await self._call("List", mpb.MigrationWorkerServiceListRequest())
        return WorkerModel(self.worker_id, reply.num_layers, reply.fingerprint)

    async def _peers(self, plan: LayerPlan) -> tuple[mpb.MigrationPeer, mpb.MigrationPeer]:
        donor, helper = await asyncio.gather(
            self._workers.address(plan.donor), self._workers.address(plan.helper)
        )
        return (
            mpb.MigrationPeer(worker_id=plan.donor, address=donor),
            mpb.MigrationPeer(worker_id=plan.helper, address=helper),
        )

    async def _prepare(self, plan: LayerPlan, role: int, **fields: object) -> object:
        donor, helper = await self._peers(plan)
        request = mpb.MigrationWorkerServicePrepareRequest(
            migration_id=plan.migration_id,
            role=role,
            layers=mpb.LayerRange(start=plan.start_layer, end=plan.end_layer),
            donor=donor,
            helper=helper,
            lease=duration(plan.lease_s),
            **fields,
        )
        if plan.kind is MigrationKind.ATTENTION:
            request.attention.CopyFrom(
                mpb.AttentionSelection(
                    request_ids=list(plan.request_ids),
                    max_sequences=plan.max_sequences,
                    max_blocks_per_sequence=plan.max_blocks_per_sequence,
                    refill=plan.refill,
                )
            )
        return await self._call("Prepare", request)

    async def prepare_donor(self, plan: LayerPlan) -> DonorPrepared:
        reply = await self._prepare(plan, mpb.MIGRATION_ROLE_DONOR)
        return DonorPrepared(reply.fingerprint, {d.layer: d.digest for d in reply.layer_digests})

    async def prepare_helper(self, plan: LayerPlan, donor: DonorPrepared) -> HelperPrepared:
        digests = [mpb.LayerDigest(layer=i, digest=d) for i, d in sorted(donor.digests.items())]
        reply = await self._prepare(
            plan, mpb.MIGRATION_ROLE_HELPER, fingerprint=donor.fingerprint, layer_digests=digests
        )
        peer = reply.migration.helper
        return HelperPrepared(
            peer.data_address,
            DATA_TRANSPORT_FROM_PROTO.get(peer.data_transport, ""),
            tuple(reply.weights_needed),
        )

    async def copy(self, plan: LayerPlan, helper: HelperPrepared) -> Copied:
        _, peer = await self._peers(plan)
        peer.data_address = helper.data_address
        peer.data_transport = DATA_TRANSPORT_TO_PROTO.get(helper.data_transport, 0)
        request = mpb.MigrationWorkerServiceCopyKVRequest(
            migration_id=plan.migration_id, helper=peer
        )
        reply = await self._call("CopyKV", request)
        return Copied(reply.bytes_moved, reply.num_sequences, seconds(reply.duration))

    async def copy_weights(self, plan: LayerPlan, helper: HelperPrepared) -> WeightsCopied:
        _, peer = await self._peers(plan)
        peer.data_address = helper.data_address
        peer.data_transport = DATA_TRANSPORT_TO_PROTO.get(helper.data_transport, 0)
        request = mpb.MigrationWorkerServiceCopyWeightsRequest(
            migration_id=plan.migration_id, helper=peer, layers=list(helper.weights_needed)
        )
        reply = await self._call("CopyWeights", request)
        return WeightsCopied(reply.bytes_moved, seconds(reply.duration))

    async def switch(self, plan: LayerPlan) -> Switched:
        request = mpb.MigrationWorkerServiceSwitchRequest(
            migration_id=plan.migration_id, num_micro_batches=plan.num_micro_batches
        )
        reply = await self._call("Switch", request)
        return Switched(
            reply.bytes_moved,
            reply.num_sequences,
            seconds(reply.pause),
            reply.num_requeued,
            reply.migration.num_blocks,
        )

    async def activate(self, plan: LayerPlan) -> None:
        request = mpb.MigrationWorkerServiceActivateRequest(
            migration_id=plan.migration_id, drop_weights=plan.drop_weights
        )
        await self._call("Activate", request)

    async def revert(self, plan: LayerPlan) -> Reverted:
        request = mpb.MigrationWorkerServiceRevertRequest(migration_id=plan.migration_id)
        try:
            reply = await self._call("Revert", request)
        except errors.InvalidRequestError:
            # A restarted coordinator repeats a revert the donor may have finished: the worker
            # refuses a second one, its view says it is done.
            if await self._state(plan.migration_id) in REVERTED:
                return Reverted(0, 0, 0.0)
            raise
        return Reverted(
            reply.bytes_moved,
            reply.num_sequences,
            seconds(reply.pause),
            reply.num_requeued,
            reply.migration.bytes_moved,
            reply.migration.num_sequences_moved,
        )

    async def _state(self, migration_id: str) -> int:
        reply = await self._call("List", mpb.MigrationWorkerServiceListRequest())
        views = [v for v in reply.migrations if v.migration_id == migration_id]
        return views[0].state if views else mpb.MIGRATION_WORKER_STATE_UNSPECIFIED

    async def release(self, plan: LayerPlan) -> None:
        request = mpb.MigrationWorkerServiceReleaseRequest(migration_id=plan.migration_id)
        await self._call("Release", request)

    async def abort(self, migration_id: str, reason: str) -> int:
        request = mpb.MigrationWorkerServiceAbortRequest(migration_id=migration_id, reason=reason)
        reply = await self._call("Abort", request)
        return reply.migration.num_requeued_at_end if reply.found else 0

    async def renew(self, migration_id: str, lease_s: float) -> Renewed:
        request = mpb.MigrationWorkerServiceRenewLeaseRequest(
            migration_id=migration_id, lease=duration(lease_s)
        )
        try:
            reply = await self._call("RenewLease", request)
        except errors.RequestNotFoundError:
            raise LeaseLostError(lease_lost(self.worker_id)) from None
        if reply.migration.state in ENDED:
            state = mpb.MigrationWorkerState.Name(reply.migration.state).rsplit("_", 1)[-1]
            why = reply.migration.reason or "no reason given"
            raise LeaseLostError(f"{self.worker_id} ended the migration ({state}): {why}")
        view = reply.migration
        return Renewed(
            reply.draining,
            view.state == mpb.MIGRATION_WORKER_STATE_ACTIVE,
            view.bytes_moved,
            view.num_sequences_moved,
        )


class RouterWorkers:
    """``ports.Workers`` through the router's ``ListWorkers``."""

    def __init__(
        self,
        router: str,
        config: RpcConfig,
        tracing: Tracing = DISABLED,
        epoch: Callable[[], int] = lambda: 0,
    ) -> None:
        """``epoch``: this coordinator's fencing token now (``Ownership.epoch``), sent with
        each call to a worker (services/common/fencing.py); 0 sends none."""
        self.epoch = epoch
        self._config = config
        self._tracing = tracing
        self._router_channel = open_channel(router, config, tracing) if router else None
        self._addresses: dict[str, str] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = open_channel(address, self._config, self._tracing)
        return self._channels[address]

    async def address(self, worker_id: str) -> str:
        if worker_id not in self._addresses:
            await self._refresh()
        address = self._addresses.get(worker_id)
        if address is None:
            # The ids the router knows: a worker registers as ROLE-HOST-PORT unless given
            # --worker-id, which `banaserve up` gives (decode-0, ...; docs/coordinator.md).
            known = ", ".join(sorted(self._addresses)) or "none"
            raise WorkerNotFoundError(
                f"no worker {worker_id!r} is registered with the router (registered: {known})"
            )
        return address

    async def port(self, worker_id: str) -> GrpcWorkerPort:
        return GrpcWorkerPort(self, worker_id, await self.address(worker_id))

    async def _refresh(self) -> None:
        if self._router_channel is None:
            return  # no router: no worker is known
        stub = router_pb2_grpc.RouterServiceStub(self._router_channel)
        try:
            reply = await aio_calls.unary(
                stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5.0)
            )
        except grpc.aio.AioRpcError as exc:
            raise errors.DependencyUnavailableError(f"router: {exc.details()}") from None
        self._addresses = {w.info.worker_id: w.info.address for w in reply.workers}

    async def announce(self, timeout_s: float = 2.0) -> int:
        """Tells every worker the router lists this coordinator's epoch (a ``List`` carrying
        it, which the worker remembers: services/common/fencing.py), so that one it has not
        called yet refuses an older coordinator too. Returns how many workers answered; one
        that did not (or a router that did not) is told at the next announcement."""
        if not self.epoch():
            return 0
        try:
            await self._refresh()
        except errors.DependencyUnavailableError:
            return 0
        ports = [GrpcWorkerPort(self, w, a) for w, a in self._addresses.items()]
        told = await asyncio.gather(
            *(asyncio.wait_for(p.describe(), timeout_s) for p in ports), return_exceptions=True
        )
        return sum(not isinstance(t, BaseException) for t in told)

    async def close(self) -> None:
        channels = [*self._channels.values()]
        if self._router_channel is not None:
            channels.append(self._router_channel)
        await asyncio.gather(*(c.close() for c in channels))
