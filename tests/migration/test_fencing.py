"""Fencing tokens (services/common/fencing.py) on a real MigrationWorkerService: a worker that a
newer coordinator has called refuses an older one's calls (FAILED_PRECONDITION, before any
work), still answers its reads, and serves callers outside the fencing as before; a worker the
newer coordinator has only announced its epoch to (``RouterWorkers.announce``, which a real
coordinator process does before it serves) refuses the older one too. The coordinator's side
sends its claim's epoch (clients.py); claims' epochs grow (tests/coordinator/test_ownership.py)."""

from __future__ import annotations

import os
import sys
import time

import grpc
import pytest

from services.child_process import Child
from services.common.errors import InvalidRequestError, PreconditionError
from services.common.fencing import (
    ANNOUNCE_INTERVAL_S,
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


@pytest.fixture
def worker(tiny_llama, loop):
    """A router listing one real worker service, "A": (router, servers [router's, A's])."""
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
    try:
        yield router, servers
    finally:
        for server in servers:
            loop.call(server.stop(0))
        pair.close()


def test_a_worker_obeys_the_newest_coordinator_only(worker, loop):
    _, servers = worker

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

    seen = loop.call(calls())
    refusal = (
        "FAILED_PRECONDITION: a newer coordinator (epoch 200) has called this worker: this one "
        "(epoch {}) lost its key prefix and may not act on its migrations"
    )
    assert seen[:3] == [refusal.format(100)] * 3
    assert seen[3] == (C.FAILED_PRECONDITION, refusal.format(150).split(": ", 1)[1])
    assert seen[4][0] == C.INVALID_ARGUMENT and EPOCH_METADATA_KEY in seen[4][1]


def test_an_announced_epoch_fences_a_worker_the_new_coordinator_never_called(worker, loop):
    router, servers = worker
    router.workers["gone"] = "127.0.0.1:1"  # listed, not answering: told next time

    async def calls():
        old = RouterWorkers(servers[0].address, RPC, epoch=lambda: 100)
        new = RouterWorkers(servers[0].address, RPC, epoch=lambda: 200)
        try:
            old_port = await old.port("A")
            with pytest.raises(LeaseLostError):  # admitted: nobody newer has called A
                await old_port.renew("m-1", 5.0)
            assert await old.announce() == 1  # an older announcement is not remembered
            with pytest.raises(LeaseLostError):
                await old_port.renew("m-1", 5.0)
            told = await new.announce(timeout_s=1.0)  # A only; no call about a migration
            with pytest.raises(PreconditionError, match=r"epoch 200\).*\(epoch 100\)"):
                await old_port.renew("m-1", 5.0)
            assert (await old_port.describe()).num_layers == 4  # its reads still answered
            with pytest.raises(LeaseLostError):  # the new one's calls pass
                await (await new.port("A")).renew("m-1", 5.0)
            return told, await RouterWorkers("", RPC, epoch=lambda: 300).announce()
        finally:
            await old.close()
            await new.close()

    assert loop.call(calls()) == (1, 0)  # no router: nobody to tell


@pytest.mark.integration
def test_a_coordinator_process_announces_its_epoch_to_every_worker_at_once(
    worker, loop, redis_server, store_prefix, tmp_path
):
    _, servers = worker
    argv = [
        sys.executable, "-m", "services.coordinator", "--port", "0",
        "--redis", redis_server.url, "--key-prefix", store_prefix,
        "--router", servers[0].address, "--log-level", "WARNING",
    ]  # fmt: skip
    request = pb.MigrationWorkerServiceAbortRequest(migration_id="m-1", reason="stale")

    async def abort_as(epoch: int) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(servers[1].address) as channel:
            stub = migration_pb2_grpc.MigrationWorkerServiceStub(channel)
            try:
                await stub.Abort(request, metadata=epoch_metadata(epoch), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return C.OK

    assert loop.call(abort_as(1)) == C.OK  # an old coordinator, before any newer one
    with open(tmp_path / "coordinator.log", "w") as log:
        child = Child("coordinator", argv, dict(os.environ), log)
        try:
            child.wait_ready(time.monotonic() + 60)  # it announced (or tried) before serving
            # The coordinator never called A about a migration: its announcement fences A (the
            # one before it served, or on a loaded machine one of those every 2 s after).
            deadline = time.monotonic() + 3 * ANNOUNCE_INTERVAL_S
            while (code := loop.call(abort_as(1))) == C.OK and time.monotonic() < deadline:
                time.sleep(0.1)
            assert code == C.FAILED_PRECONDITION
        finally:
            assert child.stop() == 0


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
    for epoch in (None, 7, 12):  # a read's epoch: remembered if newer, never refused
        fence.observe(epoch)
    assert fence.highest == 12
