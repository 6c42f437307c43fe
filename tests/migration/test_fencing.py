"""Fencing tokens (services/common/fencing.py) on a real MigrationWorkerService: a worker that a
newer coordinator has called refuses an older one's calls (FAILED_PRECONDITION, before any
work), still answers its reads, and serves callers outside the fencing as before. The
coordinator's side sends its claim's epoch (clients.py); claims' epochs grow
(tests/coordinator/test_ownership.py)."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import InvalidRequestError, PreconditionError
from services.common.fencing import (
    EPOCH_METADATA_KEY,
    CoordinatorFence,
    epoch_from_metadata,
    epoch_metadata,
)
from services.coordinator.clients import RouterWorkers
from services.coordinator.ports import LayerPlan, LeaseLostError
from services.migration.servicer import migration_service
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb
from services.rpc.gen.banaserve.v1 import migration_pb2_grpc, router_pb2, router_pb2_grpc
from services.rpc.server import Service, start_server
from tests.coordinator.test_grpc_workers import RPC, FakeRouter
from tests.engine.helpers import make_engine
from tests.migration.harness import AgentPair

pytestmark = pytest.mark.timeout(120)
C = grpc.StatusCode


def test_a_worker_obeys_the_newest_coordinator_only(tiny_llama, loop):
    pair = AgentPair(loop, make_engine(tiny_llama, num_kv_blocks=32), make_engine(tiny_llama))
    router = FakeRouter()
    bound = Service.bind(
        router,
        router_pb2_grpc.add_RouterServiceServicer_to_server,
        router_pb2.DESCRIPTOR.services_by_name["RouterService"],
    )
    servers = [loop.call(start_server([bound], RPC))]
    servers.append(loop.call(start_server([migration_service(pair.donor)], RPC)))
    router.workers["A"] = servers[1].address

    async def calls():
        # Two coordinators of one prefix: the first lost its claim, the second holds it now.
        old = RouterWorkers(servers[0].address, RPC, epoch=lambda: 100)
        new = RouterWorkers(servers[0].address, RPC, epoch=lambda: 200)
        seen = []
        try:
            old_port, new_port = await old.port("A"), await new.port("A")
            with pytest.raises(LeaseLostError):  # through the fence: no such migration
                await old_port.renew("m-1", 5.0)
            with pytest.raises(LeaseLostError):
                await new_port.renew("m-1", 5.0)
            for call in (
                lambda: old_port.renew("m-1", 5.0),
                lambda: old_port.abort("m-1", "stale"),
                lambda: old_port.revert(LayerPlan("m-1", "A", "B", 2, 4, 10.0)),
            ):
                with pytest.raises(PreconditionError) as info:
                    await call()
                seen.append(str(info.value))
            assert (await old_port.describe()).num_layers == 4  # reads are not fenced
            async with grpc.aio.insecure_channel(servers[1].address) as channel:
                stub = migration_pb2_grpc.MigrationWorkerServiceStub(channel)
                request = pb.MigrationWorkerServiceAbortRequest(migration_id="m-1", reason="x")
                # A caller outside the fencing (no epoch): served as before.
                assert not (await stub.Abort(request)).found
                for value in ("150", "abc"):
                    with pytest.raises(grpc.aio.AioRpcError) as raw:
                        await stub.Abort(request, metadata=((EPOCH_METADATA_KEY, value),))
                    seen.append((raw.value.code(), raw.value.details()))
            return seen
        finally:
            await old.close()
            await new.close()

    try:
        seen = loop.call(calls())
    finally:
        for server in servers:
            loop.call(server.stop(0))
        pair.close()
    refusal = (
        "FAILED_PRECONDITION: a newer coordinator (epoch 200) has called this worker: this one "
        "(epoch {}) lost its key prefix and may not act on its migrations"
    )
    assert seen[:3] == [refusal.format(100)] * 3
    assert seen[3] == (C.FAILED_PRECONDITION, refusal.format(150).split(": ", 1)[1])
    assert seen[4][0] == C.INVALID_ARGUMENT and EPOCH_METADATA_KEY in seen[4][1]


@pytest.mark.parametrize(
    ("metadata", "epoch"),
    [((), None), (((EPOCH_METADATA_KEY, "7"),), 7), ((("other", "x"),), None)],
)
def test_an_epoch_from_metadata(metadata, epoch):
    assert epoch_from_metadata(metadata) == epoch


@pytest.mark.parametrize(
    "values",
    [["abc"], ["-1"], ["0"], [""], ["１２"], [str(2**63)], ["1", "2"], [b"5"]],
)
def test_a_malformed_epoch_is_invalid(values):
    with pytest.raises(InvalidRequestError, match=EPOCH_METADATA_KEY):
        epoch_from_metadata([(EPOCH_METADATA_KEY, v) for v in values])


def test_the_fence_admits_equal_and_newer_epochs_and_unfenced_callers():
    fence = CoordinatorFence()
    for epoch in (None, 5, 5, None, 9):
        fence.admit(epoch)
    assert fence.highest == 9
    with pytest.raises(PreconditionError, match=r"epoch 9\).*\(epoch 8\)"):
        fence.admit(8)
    assert fence.highest == 9
    assert epoch_metadata(0) == () and epoch_metadata(9) == ((EPOCH_METADATA_KEY, "9"),)
