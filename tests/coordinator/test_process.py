"""``python -m services.coordinator`` as a real process on a real Redis: it starts, serves health
and its API, picks up a migration a previous coordinator left in Redis, and stops cleanly."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.child_process import Child
from services.coordinator.migration import Migration, MigrationKind, MigrationState, StateTime
from services.coordinator.store import RedisMigrationStore
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import coordinator_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def leave_active_migration(url: str, prefix: str) -> None:
    """What a coordinator that died while m-1 was ACTIVE leaves in Redis."""
    now = time.time()
    m = Migration(
        "m-1", MigrationKind.LAYERS, "decode-0", "prefill-0", 2, 4, created_at=now - 3,
        state=MigrationState.ACTIVE,
        timings=[StateTime(MigrationState.PLANNED, now - 3, now - 2),
                 StateTime(MigrationState.COPYING, now - 2, now - 1),
                 StateTime(MigrationState.SWITCHING, now - 1, now - 1),
                 StateTime(MigrationState.ACTIVE, now - 1)],
    )  # fmt: skip

    async def save():
        store = RedisMigrationStore.from_url(url, prefix)
        assert await store.next_id() == "m-1"
        await store.save(m)
        await store.close()

    asyncio.run(save())


def test_the_process_serves_recovers_and_stops(redis_server, store_prefix):
    leave_active_migration(redis_server.url, store_prefix)
    argv = [
        sys.executable, "-m", "services.coordinator", "--port", "0",
        "--redis", redis_server.url, "--key-prefix", store_prefix,
        "--lease", "0.6", "--renew-interval", "0.2", "--log-level", "WARNING",
    ]  # fmt: skip
    child = Child("coordinator", argv, dict(os.environ), sys.stderr)
    try:
        address = child.wait_ready(time.monotonic() + 60)
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="banaserve.v1.CoordinatorService"),
                timeout=5,
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            listed = stub.ListMigrations(pb.ListMigrationsRequest(), timeout=5).migrations
            assert [(m.migration_id, m.donor, m.helper) for m in listed] == [
                ("m-1", "decode-0", "prefill-0")
            ]
            # No router: the workers cannot be reached, so once a whole lease passes without a
            # renewal the recovered migration is aborted (polled: the lease runs on real time).
            deadline = time.monotonic() + 30
            while (m := _describe(stub)).state != pb.MIGRATION_STATE_ABORTED:
                assert time.monotonic() < deadline, m
                time.sleep(0.05)
            assert m.reason.startswith("no lease renewal reached decode-0 for 0.")
            with pytest.raises(grpc.RpcError) as info:
                stub.StartMigration(
                    pb.StartMigrationRequest(
                        kind=pb.MIGRATION_KIND_LAYERS,
                        layers=pb.LayerMigrationSpec(
                            donor="decode-0", helper="prefill-0", start_layer=2
                        ),
                    ),
                    timeout=5,
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        code = child.stop()
    assert code == 0


def _describe(stub) -> pb.Migration:
    request = pb.DescribeMigrationRequest(migration_id="m-1")
    return stub.DescribeMigration(request, timeout=5).migration
