"""CoordinatorService: protos in, ``Coordinator`` calls, protos out (nothing else)."""

from __future__ import annotations

from services.common.errors import InvalidRequestError, ShuttingDownError
from services.common.limits import check_reason, required_id
from services.coordinator.core import Coordinator
from services.coordinator.migration import Migration, MigrationKind, MigrationState
from services.rpc.convert import duration
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import coordinator_pb2_grpc
from services.rpc.server import Service

STATE_TO_PROTO = {
    MigrationState.PLANNED: pb.MIGRATION_STATE_PLANNED,
    MigrationState.COPYING: pb.MIGRATION_STATE_COPYING,
    MigrationState.SWITCHING: pb.MIGRATION_STATE_SWITCHING,
    MigrationState.ACTIVE: pb.MIGRATION_STATE_ACTIVE,
    MigrationState.REVERTING: pb.MIGRATION_STATE_REVERTING,
    MigrationState.DONE: pb.MIGRATION_STATE_DONE,
    MigrationState.ABORTED: pb.MIGRATION_STATE_ABORTED,
}
KIND_TO_PROTO = {
    MigrationKind.LAYERS: pb.MIGRATION_KIND_LAYERS,
    MigrationKind.ATTENTION: pb.MIGRATION_KIND_ATTENTION,
}
DEFAULT_MICRO_BATCHES = 2


def migration_to_proto(m: Migration, now: float) -> pb.Migration:
    return pb.Migration(
        migration_id=m.migration_id,
        kind=KIND_TO_PROTO[m.kind],
        state=STATE_TO_PROTO[m.state],
        donor=m.donor,
        helper=m.helper,
        helper_data_address=m.helper_data_address,
        start_layer=m.start_layer,
        end_layer=m.end_layer,
        num_weight_bytes=m.num_weight_bytes,
        num_kv_bytes=m.num_kv_bytes,
        weights_duration=duration(m.weights_s),
        num_copy_kv_bytes=m.num_copy_kv_bytes,
        kv_copy_duration=duration(m.kv_copy_s),
        num_switch_kv_bytes=m.num_switch_kv_bytes,
        weights_skipped=m.weights_skipped,
        num_sequences=m.num_sequences,
        switch_pause=duration(m.switch_pause_s),
        timings=[
            pb.MigrationTiming(state=STATE_TO_PROTO[t.state], duration=duration(t.duration(now)))
            for t in m.timings
        ],
        reason=m.reason,
        trace_id=f"{m.trace_id:032x}" if m.trace_id else "",
        num_micro_batches=m.num_micro_batches,
        drop_weights=m.drop_weights,
        num_requeued=m.num_requeued,
        num_blocks=m.num_blocks,
        request_ids=list(m.request_ids),
        max_sequences=m.max_sequences,
        max_blocks_per_sequence=m.max_blocks_per_sequence,
        refill=m.refill,
    )


def _id(request) -> str:
    return required_id(request.migration_id, "migration_id")


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    def _out(self, m: Migration) -> pb.Migration:
        return migration_to_proto(m, self._coordinator.now())

    def _check_serving(self) -> None:
        """A stopping coordinator (its drain, then the server's stop) starts, reverts and
        aborts nothing: such a command would be cancelled half-way (CANCELLED, not retried).
        UNAVAILABLE instead, before any work: the restarted coordinator takes it, with every
        live migration carried over."""
        if self._coordinator.draining:
            raise ShuttingDownError(
                "the coordinator is stopping: send the command again once it is back "
                "(live migrations carry over)"
            )

    async def StartMigration(self, request, context):
        self._check_serving()
        if request.HasField("layers") and request.HasField("attention"):
            raise InvalidRequestError(
                "give `layers` (a layer migration) or `attention` (an attention migration), "
                "not both"
            )
        if request.kind == pb.MIGRATION_KIND_ATTENTION:
            if not request.HasField("attention"):
                raise InvalidRequestError("an attention migration needs `attention`")
            spec = request.attention
            m = await self._coordinator.start_attention(
                spec.donor,
                spec.helper,
                tuple(spec.request_ids),
                spec.max_sequences,
                spec.max_blocks_per_sequence,
                spec.refill,
            )
            return pb.StartMigrationResponse(migration=self._out(m))
        if request.kind != pb.MIGRATION_KIND_LAYERS:
            raise InvalidRequestError("kind must be MIGRATION_KIND_LAYERS or _ATTENTION")
        if not request.HasField("layers"):
            raise InvalidRequestError("a layer migration needs `layers`")
        spec = request.layers
        m = await self._coordinator.start_layers(
            spec.donor,
            spec.helper,
            spec.start_layer,
            spec.end_layer if spec.HasField("end_layer") else None,
            spec.num_micro_batches if spec.HasField("num_micro_batches") else DEFAULT_MICRO_BATCHES,
            spec.drop_weights,
        )
        return pb.StartMigrationResponse(migration=self._out(m))

    async def RevertMigration(self, request, context):
        self._check_serving()
        m = await self._coordinator.revert(_id(request))
        return pb.RevertMigrationResponse(migration=self._out(m))

    async def AbortMigration(self, request, context):
        check_reason(request.reason)
        self._check_serving()
        m = await self._coordinator.abort(_id(request), request.reason)
        return pb.AbortMigrationResponse(migration=self._out(m))

    async def ListMigrations(self, request, context):
        migrations = self._coordinator.list(live_only=request.live_only)
        stats = self._coordinator.auto_stats
        seen = sorted(stats.utilisations.items()) if stats is not None else []
        return pb.ListMigrationsResponse(
            migrations=[self._out(m) for m in migrations],
            utilisations=[pb.WorkerUtilisation(worker_id=w, compute=u.compute, memory=u.memory)
                          for w, u in seen],
        )  # fmt: skip

    async def DescribeMigration(self, request, context):
        m = self._coordinator.describe(_id(request))
        return pb.DescribeMigrationResponse(migration=self._out(m))


def coordinator_service(coordinator: Coordinator) -> Service:
    return Service.bind(
        CoordinatorServicer(coordinator),
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server,
        pb.DESCRIPTOR.services_by_name["CoordinatorService"],
    )
