"""MigrationWorkerService over ``MigrationAgent``: proto <-> domain, nothing else.

Domain errors become status codes in services/rpc/status.py (the agent raises them); ids and
addresses are checked against services/common/limits.py first (INVALID_ARGUMENT). Every call
but ``List`` passes the coordinators' fence first (services/common/fencing.py): one from a
coordinator older than one already seen is FAILED_PRECONDITION before any work. ``List`` is
never refused, but a newer coordinator's epoch on it is remembered (its announcement).
"""

from __future__ import annotations

from typing import Any

from services.common.errors import InvalidRequestError
from services.common.fencing import CoordinatorFence, epoch_from_metadata
from services.common.limits import check_address, check_id, check_reason, required_id
from services.common.migration_states import MigrationState
from services.migration.agent import MigrationAgent
from services.migration.attention_agent import selection_from_proto
from services.migration.records import MigrationRecord, Peer, Role
from services.rpc.convert import (
    DATA_TRANSPORT_FROM_PROTO,
    DATA_TRANSPORT_TO_PROTO,
    duration,
    seconds,
)
from services.rpc.gen.banaserve.v1 import kvstore_pb2, migration_pb2_grpc
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb
from services.rpc.server import Service

ROLE_FROM_PROTO = {pb.MIGRATION_ROLE_DONOR: Role.DONOR, pb.MIGRATION_ROLE_HELPER: Role.HELPER}
ROLE_TO_PROTO = {v: k for k, v in ROLE_FROM_PROTO.items()}
STATE_TO_PROTO = {
    MigrationState.PLANNED: pb.MIGRATION_WORKER_STATE_PLANNED,
    MigrationState.COPYING: pb.MIGRATION_WORKER_STATE_COPYING,
    MigrationState.SWITCHING: pb.MIGRATION_WORKER_STATE_SWITCHING,
    MigrationState.ACTIVE: pb.MIGRATION_WORKER_STATE_ACTIVE,
    MigrationState.REVERTING: pb.MIGRATION_WORKER_STATE_REVERTING,
    MigrationState.DONE: pb.MIGRATION_WORKER_STATE_DONE,
    MigrationState.ABORTED: pb.MIGRATION_WORKER_STATE_ABORTED,
}


def peer_from_proto(msg: pb.MigrationPeer, what: str) -> Peer:
    check_id(msg.worker_id, f"{what}.worker_id")
    check_address(msg.address, f"{what}.address")
    check_address(msg.data_address, f"{what}.data_address")
    transport = DATA_TRANSPORT_FROM_PROTO.get(msg.data_transport, "")
    return Peer(msg.worker_id, msg.address, msg.data_address if transport else "", transport)


def peer_to_proto(peer: Peer) -> pb.MigrationPeer:
    return pb.MigrationPeer(
        worker_id=peer.worker_id,
        address=peer.address,
        data_address=peer.data_address,
        data_transport=DATA_TRANSPORT_TO_PROTO.get(
            peer.data_transport, kvstore_pb2.DATA_TRANSPORT_UNSPECIFIED
        ),
    )


def view(record: MigrationRecord, agent: MigrationAgent) -> pb.MigrationView:
    hosted = next(
        (h for h in agent.snapshot().hosted_layers if h.owner == record.migration_id), None
    )
    remaining = 0.0 if record.state.terminal else max(0.0, record.expires_at - agent.clock())
    return pb.MigrationView(
        migration_id=record.migration_id,
        role=ROLE_TO_PROTO[record.role],
        layers=pb.LayerRange(start=record.start, end=record.end),
        donor=peer_to_proto(record.donor),
        helper=peer_to_proto(record.helper),
        state=STATE_TO_PROTO[record.state],
        bytes_moved=record.bytes_moved,
        num_sequences_moved=len(record.sequences),
        reason=record.reason,
        lease_remaining=duration(remaining),
        weights_dropped=record.weights_dropped,
        num_hosted_sequences=hosted.num_seqs if hosted else 0,
        num_hosted_blocks_used=hosted.num_blocks_used if hosted else 0,
        num_hosted_blocks=hosted.num_blocks if hosted else 0,
        num_requeued_at_end=record.num_requeued_at_end,
        **agent.attention.view_fields(record),
    )


def _id(msg: Any) -> str:
    return required_id(msg.migration_id, "migration_id")


def _lease(msg: Any) -> float | None:
    return seconds(msg.lease) if msg.HasField("lease") else None


class MigrationWorkerServicer(migration_pb2_grpc.MigrationWorkerServiceServicer):
    def __init__(self, agent: MigrationAgent) -> None:
        self.agent = agent
        self.fence = CoordinatorFence()

    def _admit(self, context) -> None:  # noqa: ANN001 - a grpc.aio ServicerContext
        self.fence.admit(epoch_from_metadata(context.invocation_metadata()))

    async def Prepare(self, request, context):  # noqa: N802 - gRPC method name
        self._admit(context)
        role = ROLE_FROM_PROTO.get(request.role)
        if role is None:
            raise InvalidRequestError("role must be DONOR or HELPER")
        digests = {d.layer: d.digest for d in request.layer_digests}
        record, fp, mine, needed = await self.agent.prepare(
            _id(request),
            role,
            range(request.layers.start, request.layers.end),
            peer_from_proto(request.donor, "donor"),
            peer_from_proto(request.helper, "helper"),
            _lease(request),
            request.fingerprint,
            digests,
            request.num_hosted_blocks,
            attention=(
                selection_from_proto(request.attention) if request.HasField("attention") else None
            ),
        )
        if role is Role.HELPER:
            record.helper = Peer(
                record.helper.worker_id,
                record.helper.address,
                self.agent.data_address,
                self.agent.data_kind,
            )
        return pb.MigrationWorkerServicePrepareResponse(
            migration=view(record, self.agent),
            fingerprint=fp,
            layer_digests=[pb.LayerDigest(layer=i, digest=d) for i, d in sorted(mine.items())],
            weights_needed=needed,
        )

    async def CopyWeights(self, request, context):  # noqa: N802
        self._admit(context)
        mid = _id(request)
        helper = peer_from_proto(request.helper, "helper")
        nbytes, took = await self.agent.copy_weights(mid, helper, list(request.layers))
        return pb.MigrationWorkerServiceCopyWeightsResponse(
            migration=view(self.agent.get(mid), self.agent),
            bytes_moved=nbytes,
            duration=duration(took),
        )

    async def CopyKV(self, request, context):  # noqa: N802
        self._admit(context)
        mid = _id(request)
        nbytes, nseqs, took = await self.agent.copy_kv(
            mid, peer_from_proto(request.helper, "helper")
        )
        return pb.MigrationWorkerServiceCopyKVResponse(
            migration=view(self.agent.get(mid), self.agent),
            bytes_moved=nbytes,
            num_sequences=nseqs,
            duration=duration(took),
        )

    async def Switch(self, request, context):  # noqa: N802
        self._admit(context)
        mid = _id(request)
        timeout = seconds(request.stage_timeout) if request.HasField("stage_timeout") else None
        result = await self.agent.switch(mid, request.num_micro_batches or 1, timeout)
        return pb.MigrationWorkerServiceSwitchResponse(
            migration=view(self.agent.get(mid), self.agent),
            bytes_moved=result.num_bytes,
            num_sequences=len(result.request_ids),
            pause=duration(result.pause_s),
            num_requeued=len(result.requeued),
        )

    async def Activate(self, request, context):  # noqa: N802
        self._admit(context)
        mid = _id(request)
        before, after = await self.agent.activate(mid, request.drop_weights)
        return pb.MigrationWorkerServiceActivateResponse(
            migration=view(self.agent.get(mid), self.agent),
            num_blocks_before=before,
            num_blocks_after=after,
        )

    async def Revert(self, request, context):  # noqa: N802
        self._admit(context)
        mid = _id(request)
        result = await self.agent.revert(mid)
        return pb.MigrationWorkerServiceRevertResponse(
            migration=view(self.agent.get(mid), self.agent),
            bytes_moved=result.num_bytes,
            num_sequences=len(result.request_ids),
            pause=duration(result.pause_s),
            num_requeued=len(result.requeued),
        )

    async def Release(self, request, context):  # noqa: N802
        self._admit(context)
        record = await self.agent.release(_id(request))
        if record is None:
            return pb.MigrationWorkerServiceReleaseResponse(found=False)
        return pb.MigrationWorkerServiceReleaseResponse(
            found=True, migration=view(record, self.agent)
        )

    async def Abort(self, request, context):  # noqa: N802
        self._admit(context)
        check_reason(request.reason)
        record = await self.agent.abort(_id(request), request.reason)
        if record is None:
            return pb.MigrationWorkerServiceAbortResponse(found=False)
        return pb.MigrationWorkerServiceAbortResponse(
            found=True, migration=view(record, self.agent)
        )

    async def RenewLease(self, request, context):  # noqa: N802
        self._admit(context)
        record = self.agent.renew(_id(request), _lease(request))
        return pb.MigrationWorkerServiceRenewLeaseResponse(
            migration=view(record, self.agent), draining=self.agent.draining
        )

    async def List(self, request, context):  # noqa: N802
        self.fence.observe(epoch_from_metadata(context.invocation_metadata()))
        # An engine visit, not a cached answer: it waits for the commands before it, so the
        # views below count what they did (a helper's hosted sequences once it is ACTIVE).
        num_layers, fingerprint = await self.agent.engine_call(
            lambda e: (e.spec.num_layers, e.fingerprint)
        )
        return pb.MigrationWorkerServiceListResponse(
            num_layers=num_layers,
            fingerprint=fingerprint,
            migrations=[view(r, self.agent) for r in self.agent.list()],
            data_address=self.agent.data_address,
            data_transport=DATA_TRANSPORT_TO_PROTO.get(
                self.agent.data_kind, kvstore_pb2.DATA_TRANSPORT_UNSPECIFIED
            ),
        )


def migration_service(agent: MigrationAgent) -> Service:
    return Service.bind(
        MigrationWorkerServicer(agent),
        migration_pb2_grpc.add_MigrationWorkerServiceServicer_to_server,
        pb.DESCRIPTOR.services_by_name["MigrationWorkerService"],
    )
