"""The coordinator's gRPC side (clients.py) against in-process MigrationWorkerService and
RouterService servers: the migration runs through real calls, the workers' server spans join
the migration's trace under the coordinator's call spans, and worker errors keep their meaning."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.config import RpcConfig
from services.common.errors import InvalidRequestError, RequestNotFoundError
from services.coordinator.clients import RouterWorkers
from services.coordinator.core import Coordinator, CoordinatorConfig
from services.coordinator.migration import MigrationState
from services.coordinator.ports import DonorPrepared, LayerPlan
from services.coordinator.store import RedisMigrationStore
from services.rpc.convert import duration
from services.rpc.gen.banaserve.v1 import migration_pb2 as mpb
from services.rpc.gen.banaserve.v1 import migration_pb2_grpc, router_pb2, router_pb2_grpc
from services.rpc.server import Service, start_server
from services.rpc.tracing import tracing_with_exporter
from tests.coordinator.fakes import DELTA_BYTES, KV_BYTES, FakeCluster, FakePort

RPC = RpcConfig(grace_s=0.1)
D, P = "decode-0", "prefill-0"
S = MigrationState
pytestmark = pytest.mark.timeout(60)


class FakeMigrationWorker(migration_pb2_grpc.MigrationWorkerServiceServicer):
    """MigrationWorkerService over a ``FakePort`` (which records the calls and what it holds)."""

    def __init__(self, port: FakePort) -> None:
        self.port = port
        self.reverted: set[str] = set()  # a donor refuses a second revert, as workers do
        self.ended: dict[str, str] = {}  # aborted here by a worker-side Abort: its reason

    @staticmethod
    def _plan(request, num_micro_batches: int = 2, drop: bool = False) -> LayerPlan:
        layers = request.layers
        return LayerPlan(
            request.migration_id, request.donor.worker_id, request.helper.worker_id,
            layers.start, layers.end, 10.0, num_micro_batches, drop,
        )  # fmt: skip

    @staticmethod
    def _id_plan(migration_id: str, num_micro_batches: int = 2, drop: bool = False) -> LayerPlan:
        return LayerPlan(migration_id, D, P, 2, 4, 10.0, num_micro_batches, drop)

    async def Prepare(self, request, context):
        plan = self._plan(request)
        if request.role == mpb.MIGRATION_ROLE_DONOR:
            done = await self.port.prepare_donor(plan)
            return mpb.MigrationWorkerServicePrepareResponse(
                fingerprint=done.fingerprint,
                layer_digests=[mpb.LayerDigest(layer=i, digest=d) for i, d in done.digests.items()],
            )
        donor = DonorPrepared(
            request.fingerprint, {d.layer: d.digest for d in request.layer_digests}
        )
        hosted = await self.port.prepare_helper(plan, donor)
        helper = mpb.MigrationPeer(worker_id=P, data_address=hosted.data_address)
        return mpb.MigrationWorkerServicePrepareResponse(
            migration=mpb.MigrationView(migration_id=plan.migration_id, helper=helper),
            weights_needed=hosted.weights_needed,
        )

    async def CopyKV(self, request, context):
        plan = self._id_plan(request.migration_id)
        copied = await self.port.copy(plan, _hosted(request.helper.data_address))
        return mpb.MigrationWorkerServiceCopyKVResponse(
            bytes_moved=copied.num_kv_bytes, num_sequences=copied.num_sequences
        )

    async def Switch(self, request, context):
        switched = await self.port.switch(
            self._id_plan(request.migration_id, request.num_micro_batches)
        )
        return mpb.MigrationWorkerServiceSwitchResponse(
            bytes_moved=switched.num_kv_bytes,
            num_sequences=switched.num_sequences,
            pause=duration(switched.pause_s),
        )

    async def Activate(self, request, context):
        await self.port.activate(self._id_plan(request.migration_id, drop=request.drop_weights))
        return mpb.MigrationWorkerServiceActivateResponse()

    async def Revert(self, request, context):
        if request.migration_id in self.reverted:
            raise InvalidRequestError(f"migration {request.migration_id} is reverting here")
        reverted = await self.port.revert(self._id_plan(request.migration_id))
        self.reverted.add(request.migration_id)
        return mpb.MigrationWorkerServiceRevertResponse(
            bytes_moved=reverted.num_kv_bytes,
            num_sequences=reverted.num_sequences,
            pause=duration(reverted.pause_s),
        )

    async def Release(self, request, context):
        await self.port.release(self._id_plan(request.migration_id))
        return mpb.MigrationWorkerServiceReleaseResponse(found=True)

    async def Abort(self, request, context):
        await self.port.abort(request.migration_id, request.reason)
        return mpb.MigrationWorkerServiceAbortResponse(found=True)

    async def RenewLease(self, request, context):
        if (reason := self.ended.get(request.migration_id)) is not None:  # its record stays
            view = mpb.MigrationView(
                migration_id=request.migration_id,
                state=mpb.MIGRATION_WORKER_STATE_ABORTED,
                reason=reason,
            )
            return mpb.MigrationWorkerServiceRenewLeaseResponse(migration=view)
        if request.migration_id not in self.port.held:
            raise RequestNotFoundError(f"no migration {request.migration_id!r} here")
        self.port.renewals.append((request.migration_id, request.lease.ToNanoseconds() / 1e9))
        return mpb.MigrationWorkerServiceRenewLeaseResponse(draining=self.port.draining)

    async def List(self, request, context):
        model = await self.port.describe()
        views = [
            mpb.MigrationView(migration_id=i, state=mpb.MIGRATION_WORKER_STATE_REVERTING)
            for i in sorted(self.reverted)
        ]
        return mpb.MigrationWorkerServiceListResponse(
            num_layers=model.num_layers, fingerprint=model.fingerprint, migrations=views
        )


def _hosted(data_address: str):
    from services.coordinator.ports import HelperPrepared

    return HelperPrepared(data_address)


class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    def __init__(self) -> None:
        self.workers: dict[str, str] = {}

    async def ListWorkers(self, request, context):
        return router_pb2.ListWorkersResponse(
            workers=[
                router_pb2.Worker(info=router_pb2.WorkerInfo(worker_id=w, address=a))
                for w, a in self.workers.items()
            ]
        )


@asynccontextmanager
async def grpc_cluster(redis_url: str, prefix: str, cluster: FakeCluster, tracing):
    router = FakeRouter()
    servers = [
        await start_server(
            [
                Service.bind(
                    router,
                    router_pb2_grpc.add_RouterServiceServicer_to_server,
                    router_pb2.DESCRIPTOR.services_by_name["RouterService"],
                )
            ],
            RPC,
        )
    ]
    for worker_id, port in cluster.ports.items():
        servicer = cluster.servicers[worker_id] = FakeMigrationWorker(port)
        service = Service.bind(
            servicer,
            migration_pb2_grpc.add_MigrationWorkerServiceServicer_to_server,
            mpb.DESCRIPTOR.services_by_name["MigrationWorkerService"],
        )
        server = await start_server([service], RPC, tracing=tracing)
        router.workers[worker_id] = server.address
        servers.append(server)
    workers = RouterWorkers(servers[0].address, RPC, tracing)
    store = RedisMigrationStore.from_url(redis_url, prefix)
    config = CoordinatorConfig(lease_s=10.0, renew_interval_s=2.0, step_timeout_s=5.0)
    tracer = tracing.provider.get_tracer("services.coordinator")
    coord = Coordinator(store, workers, config, tracer=tracer)
    try:
        yield coord
    finally:
        await coord.close()
        await workers.close()
        await store.close()
        for server in servers:
            await server.stop(0)


def test_a_migration_over_grpc_is_one_trace_across_processes(redis_server, store_prefix):
    exporter = InMemorySpanExporter()
    tracing = tracing_with_exporter(exporter)
    cluster = FakeCluster()

    async def main():
        async with grpc_cluster(redis_server.url, store_prefix, cluster, tracing) as coord:
            m = await coord.start_layers(D, P, 2)
            await coord.wait("m-1")
            assert m.state is S.ACTIVE
            await coord.renew_leases()
            await coord.revert("m-1")
            await coord.wait("m-1")
            return m

    m = asyncio.run(main())
    assert m.state is S.DONE, m.reason
    assert (m.num_kv_bytes, m.helper_data_address) == (
        2 * (KV_BYTES + 2 * DELTA_BYTES),
        "127.0.0.1:9000",
    )
    assert cluster.ports[D].renewals == [("m-1", 10.0)] == cluster.ports[P].renewals
    assert cluster.held() == {D: set(), P: set()}
    spans = exporter.get_finished_spans()
    assert {
        s.context.trace_id for s in spans if s.name != "/banaserve.v1.RouterService/ListWorkers"
    } >= {m.trace_id}
    by_id = {s.context.span_id: s for s in spans}

    def chain(span) -> list[str]:
        names = [span.name]
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            names.append(span.name)
        return names

    servers = [
        s
        for s in spans
        if s.name.startswith("/banaserve.v1.MigrationWorkerService/") and s.kind.name == "SERVER"
    ]
    switch = next(s for s in servers if s.name.endswith("/Switch"))
    assert chain(switch) == [
        "/banaserve.v1.MigrationWorkerService/Switch",  # the worker's server span
        "/banaserve.v1.MigrationWorkerService/Switch",  # the coordinator's client span
        "migration.switch",
        "migration.switching",
        "migration",
    ]
    assert switch.context.trace_id == m.trace_id
    in_trace = sorted(s.name.rsplit("/", 1)[1] for s in servers if s.context.trace_id == m.trace_id)
    assert in_trace == sorted(
        [
            "Prepare",
            "Prepare",
            "CopyKV",
            "CopyKV",
            "Switch",
            "Activate",
            "Revert",
            "Release",
            "Release",
        ]
    )
    # Lease renewals and describes run outside any migration's trace.
    assert all(
        s.context.trace_id != m.trace_id
        for s in servers
        if s.name.endswith(("/RenewLease", "/List"))
    )


def test_a_worker_refusal_becomes_the_reason(redis_server, store_prefix):
    from services.common.errors import ResourceExhaustedError

    cluster = FakeCluster()
    cluster.fail(D, "revert", ResourceExhaustedError("the pool cannot shrink back yet"))
    tracing = tracing_with_exporter(InMemorySpanExporter())

    async def main():
        async with grpc_cluster(redis_server.url, store_prefix, cluster, tracing) as coord:
            # The ids it does know are named: a mistyped id, or a worker started alone
            # (ROLE-HOST-PORT) named as `up` names its own (decode-0, ...).
            registered = r"no worker 'decode-9' is registered with the router \(registered: decode-0, prefill-0\)"
            with pytest.raises(Exception, match=registered):
                await coord.start_layers("decode-9", P, 2)
            await coord.start_layers(D, P, 2)
            await coord.wait("m-1")
            m = await coord.revert("m-1")
            await coord.wait("m-1")
            return m

    m = asyncio.run(main())
    assert m.state is S.ABORTED
    assert m.reason == (
        "revert on decode-0 failed: ResourceExhaustedError: "
        "RESOURCE_EXHAUSTED: the pool cannot shrink back yet"
    )
    assert cluster.held() == {D: set(), P: set()}


def test_a_migration_its_worker_aborted_ends_with_that_workers_reason(redis_server, store_prefix):
    """An operator's (or the worker's own) Abort on one worker: the next lease renewal ends the
    migration with the reason that worker recorded, not "its lease ran out"."""
    cluster = FakeCluster()
    tracing = tracing_with_exporter(InMemorySpanExporter())

    async def main():
        async with grpc_cluster(redis_server.url, store_prefix, cluster, tracing) as coord:
            m = await coord.start_layers(D, P, 2)
            await coord.wait("m-1")
            assert m.state is S.ACTIVE
            cluster.ports[D].held.discard("m-1")
            cluster.servicers[D].ended["m-1"] = "drained by the operator"
            await coord.renew_leases()
            await asyncio.gather(*coord._background)
            return m

    m = asyncio.run(main())
    assert m.state is S.ABORTED
    assert m.reason == "decode-0 ended the migration (ABORTED): drained by the operator"
    assert cluster.held() == {D: set(), P: set()}


def test_a_repeated_revert_is_answered_from_the_workers_view(redis_server, store_prefix):
    """After a restart in REVERTING the coordinator reverts again; a donor that finished the
    first one refuses, and the client reads the worker's view instead of failing."""
    cluster = FakeCluster()
    tracing = tracing_with_exporter(InMemorySpanExporter())

    async def main():
        async with grpc_cluster(redis_server.url, store_prefix, cluster, tracing) as coord:
            port = await coord._workers.port(D)
            plan = LayerPlan("m-5", D, P, 2, 4, 10.0)
            first = await port.revert(plan)
            second = await port.revert(plan)
            with pytest.raises(InvalidRequestError, match="INVALID_ARGUMENT: bad"):
                cluster.fail(D, "revert", InvalidRequestError("bad"))
                await port.revert(LayerPlan("m-6", D, P, 2, 4, 10.0))
            return first, second

    first, second = asyncio.run(main())
    assert (first.num_kv_bytes, first.num_sequences) == (KV_BYTES + 2 * DELTA_BYTES, 3)
    assert (second.num_kv_bytes, second.num_sequences, second.pause_s) == (0, 0, 0.0)
    assert cluster.steps() == [f"{D} revert", f"{D} revert"]  # the second: m-6, which failed
