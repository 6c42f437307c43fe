"""CoordinatorService on an in-process server (port 0) over fake workers and a real Redis: the
messages it answers and the status code of every bad request, before any worker work."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import grpc
import pytest

from services.common.config import RpcConfig
from services.coordinator.servicer import coordinator_service
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import coordinator_pb2_grpc
from services.rpc.server import start_server
from tests.coordinator.factories import coordinator
from tests.coordinator.fakes import DELTA_BYTES, KV_BYTES, FakeClock, FakeCluster

RPC = RpcConfig(grace_s=0.1)
C = grpc.StatusCode
D, P = "decode-0", "prefill-0"
pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def served(redis_url: str, prefix: str, cluster: FakeCluster, clock: FakeClock):
    async with coordinator(redis_url, prefix, cluster, clock) as coord:
        server = await start_server([coordinator_service(coord)], RPC)
        channel = open_channel(server.address, RPC)
        try:
            yield coord, coordinator_pb2_grpc.CoordinatorServiceStub(channel), server.address
        finally:
            await channel.close()
            await server.stop(0)


def layers(donor=D, helper=P, start=2, **kw) -> pb.StartMigrationRequest:
    spec = pb.LayerMigrationSpec(donor=donor, helper=helper, start_layer=start, **kw)
    return pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_LAYERS, layers=spec)


async def status_of(call) -> tuple[C, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


def test_start_describe_list_revert_over_the_wire(redis_server, store_prefix):
    cluster, clock = FakeCluster(), FakeClock()

    async def main():
        async with served(redis_server.url, store_prefix, cluster, clock) as (coord, stub, _):
            started = await stub.StartMigration(layers(num_micro_batches=1, drop_weights=True))
            m = started.migration
            assert (m.migration_id, m.state, m.kind) == (
                "m-1",
                pb.MIGRATION_STATE_PLANNED,
                pb.MIGRATION_KIND_LAYERS,
            )
            assert (m.donor, m.helper, m.start_layer, m.end_layer) == (D, P, 2, 4)
            assert (m.num_micro_batches, m.drop_weights) == (1, True)
            await coord.wait("m-1")
            clock.advance(2.5)
            m = (
                await stub.DescribeMigration(pb.DescribeMigrationRequest(migration_id="m-1"))
            ).migration
            assert m.state == pb.MIGRATION_STATE_ACTIVE
            assert [(t.state, t.duration.ToNanoseconds()) for t in m.timings] == [
                (pb.MIGRATION_STATE_PLANNED, 0),
                (pb.MIGRATION_STATE_COPYING, 0),
                (pb.MIGRATION_STATE_SWITCHING, 0),
                (pb.MIGRATION_STATE_ACTIVE, 2_500_000_000),
            ]
            assert (m.num_kv_bytes, m.num_sequences, m.weights_skipped) == (
                KV_BYTES + 2 * DELTA_BYTES,
                3,
                True,
            )
            assert (m.helper_data_address, m.switch_pause.ToNanoseconds()) == (
                "127.0.0.1:9000",
                4_000_000,
            )
            live = await stub.ListMigrations(pb.ListMigrationsRequest(live_only=True))
            assert [x.migration_id for x in live.migrations] == ["m-1"]
            reverting = await stub.RevertMigration(pb.RevertMigrationRequest(migration_id="m-1"))
            assert reverting.migration.state == pb.MIGRATION_STATE_REVERTING
            await coord.wait("m-1")
            assert (
                await stub.ListMigrations(pb.ListMigrationsRequest(live_only=True))
            ).migrations == []
            done = (await stub.ListMigrations(pb.ListMigrationsRequest())).migrations
            assert [(x.migration_id, x.state, x.reason) for x in done] == [
                ("m-1", pb.MIGRATION_STATE_DONE, "")
            ]

    asyncio.run(main())
    assert cluster.held() == {D: set(), P: set()}


BAD = [
    (pb.StartMigrationRequest(), C.INVALID_ARGUMENT, "kind must be MIGRATION_KIND_LAYERS"),
    (
        pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_ATTENTION),
        C.INVALID_ARGUMENT,
        "an attention migration needs `attention`",
    ),
    (
        pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_LAYERS),
        C.INVALID_ARGUMENT,
        "a layer migration needs `layers`",
    ),
    (layers(helper=D), C.INVALID_ARGUMENT, "donor and helper are the same worker (decode-0)"),
    (layers(start=0), C.INVALID_ARGUMENT, "start layer must be >= 1"),
    (layers(end_layer=3), C.INVALID_ARGUMENT, "layers [2, 3): only [k, 4) with 1 <= k < 4 move"),
    (layers(num_micro_batches=0), C.INVALID_ARGUMENT, "micro-batches must be in [1, 8], got 0"),
    (layers(helper="prefill-7"), C.NOT_FOUND, "no worker 'prefill-7'"),
    # Both specs, either kind: the one not taken was silently dropped.
    *(
        (
            pb.StartMigrationRequest(
                kind=kind,
                layers=pb.LayerMigrationSpec(donor=P, helper=D, start_layer=2),
                attention=pb.AttentionMigrationSpec(donor=D, helper=P),
            ),
            C.INVALID_ARGUMENT,
            "give `layers` (a layer migration) or `attention` (an attention migration), not both",
        )
        for kind in (pb.MIGRATION_KIND_LAYERS, pb.MIGRATION_KIND_ATTENTION)
    ),
]


@pytest.mark.parametrize(("request_", "code", "details"), BAD, ids=range(len(BAD)))
def test_bad_starts_get_their_status_before_any_work(
    redis_server, store_prefix, request_, code, details
):
    cluster = FakeCluster()

    async def main():
        async with served(redis_server.url, store_prefix, cluster, FakeClock()) as (coord, stub, _):
            got = await status_of(stub.StartMigration(request_))
            assert got[0] == code and details in got[1]
            assert coord.list() == []

    asyncio.run(main())
    assert cluster.steps() == []


def test_ids_and_states_that_do_not_allow_the_call(redis_server, store_prefix):
    cluster = FakeCluster()
    hold = cluster.hold(D, "switch micro-batches=2")

    async def main():
        async with served(redis_server.url, store_prefix, cluster, FakeClock()) as (coord, stub, _):
            for call in (
                stub.DescribeMigration(pb.DescribeMigrationRequest(migration_id="m-9")),
                stub.RevertMigration(pb.RevertMigrationRequest(migration_id="m-9")),
                stub.AbortMigration(pb.AbortMigrationRequest(migration_id="m-9")),
            ):
                assert await status_of(call) == (C.NOT_FOUND, "no migration 'm-9'")
            await stub.StartMigration(layers())
            await hold.entered.wait()  # m-1 is SWITCHING
            busy = await status_of(stub.StartMigration(layers(donor=P, helper=D)))
            assert busy == (
                C.FAILED_PRECONDITION,
                "prefill-0 already takes part in m-1 (SWITCHING)",
            )
            revert = await status_of(
                stub.RevertMigration(pb.RevertMigrationRequest(migration_id="m-1"))
            )
            assert revert == (
                C.FAILED_PRECONDITION,
                "m-1 is SWITCHING; only an ACTIVE migration reverts",
            )
            aborted = await stub.AbortMigration(
                pb.AbortMigrationRequest(migration_id="m-1", reason="test")
            )
            assert (aborted.migration.state, aborted.migration.reason) == (
                pb.MIGRATION_STATE_ABORTED,
                "test",
            )
            again = await status_of(
                stub.AbortMigration(pb.AbortMigrationRequest(migration_id="m-1"))
            )
            assert again == (C.FAILED_PRECONDITION, "m-1 is already ABORTED")

    asyncio.run(main())
    assert cluster.held() == {D: set(), P: set()}


def test_malformed_ids_and_an_over_long_reason_are_refused_before_any_work(
    redis_server, store_prefix
):
    """A probe's 20 KB id came back as RESOURCE_EXHAUSTED "Stream removed" (the NOT_FOUND echoing
    it outgrew gRPC's status size) and two 2.5 MB abort reasons broke ListMigrations for good
    (the records outgrew the 4 MiB message). Ids are checked as the workers check them; a
    reason is at most 1,024 bytes."""
    cluster = FakeCluster()

    async def main():
        async with served(redis_server.url, store_prefix, cluster, FakeClock()) as (coord, stub, _):
            for migration_id, details in [
                ("", "migration_id is empty"),
                ("m" * 20_000, "migration_id is 20000 characters long; at most 128 are allowed"),
                (
                    "m 1",
                    "migration_id 'm 1' must be printable ASCII without spaces or control characters",
                ),
            ]:
                for call in (
                    stub.DescribeMigration(pb.DescribeMigrationRequest(migration_id=migration_id)),
                    stub.RevertMigration(pb.RevertMigrationRequest(migration_id=migration_id)),
                    stub.AbortMigration(pb.AbortMigrationRequest(migration_id=migration_id)),
                ):
                    assert await status_of(call) == (C.INVALID_ARGUMENT, details)
            await stub.StartMigration(layers())
            long = pb.AbortMigrationRequest(migration_id="m-1", reason="r" * 2_500_000)
            got = await status_of(stub.AbortMigration(long))
            assert got == (C.INVALID_ARGUMENT, "reason is longer than 1024 bytes")
            assert coord.describe("m-1").reason == ""  # refused: not aborted
            await coord.wait("m-1")
            await stub.AbortMigration(pb.AbortMigrationRequest(migration_id="m-1", reason="ok"))
            spec = pb.AttentionMigrationSpec(donor=D, helper=P, request_ids=["a b"] * 1000)
            bad = pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_ATTENTION, attention=spec)
            got = await status_of(stub.StartMigration(bad))
            assert got[0] == C.INVALID_ARGUMENT and "request_ids[0] 'a b'" in got[1]
            assert [m.migration_id for m in coord.list()] == ["m-1"]

    asyncio.run(main())
    assert cluster.held() == {D: set(), P: set()}


def test_the_cli_commands(redis_server, store_prefix, capsys):
    """``banaserve migrate`` / ``banaserve migrations`` through the real parser, in a thread
    (the CLI is blocking; the server runs on this test's event loop)."""
    from services.cli import build_parser

    def cli(address: str, *argv: str) -> int:
        args = build_parser().parse_args([*argv, "--coordinator", address])
        return args.func(args)

    layers = ("migrate", "layers", "--donor", D, "--helper", P, "--start", "2", "--wait")

    async def main():
        async with served(redis_server.url, store_prefix, FakeCluster(), FakeClock()) as (
            coord, stub, address,
        ):  # fmt: skip
            run = asyncio.to_thread
            return (
                await run(cli, address, *layers),
                await run(cli, address, "migrations"),
                await run(cli, address, "migrate", "revert", "m-1", "--wait"),
                await run(cli, address, "migrate", "abort", "m-1"),
                await run(cli, address, "migrations", "m-7"),
                await run(cli, address, "migrations", ""),  # not "list them all" (probe, s42)
            )

    assert asyncio.run(main()) == (0, 0, 0, 2, 2, 2)
    out, err = capsys.readouterr()
    blocks = out.split("migration   m-1 (layers)\n")
    assert blocks[1].splitlines()[:2] == ["state       ACTIVE", f"donor       {D}"]
    kv = KV_BYTES + 2 * DELTA_BYTES
    row = f"m-1    layers    ACTIVE         {D} -> {P:<12} [2, 4)    kv {kv:>12,} B"
    assert row in out
    assert blocks[2].splitlines()[0] == "state       DONE"
    assert err.splitlines() == [
        "banaserve: error: FAILED_PRECONDITION: m-1 is already DONE",
        "banaserve: error: NOT_FOUND: no migration 'm-7'",
        "banaserve: error: INVALID_ARGUMENT: migration_id is empty",
    ]


def test_a_stopping_coordinator_refuses_commands_unavailable_and_still_answers_queries(
    redis_server, store_prefix
):
    """Once its drain begins (SIGTERM) the coordinator starts, reverts and aborts nothing: the
    server's stop would cancel such a command half-way, and the caller read CANCELLED and did
    not send it again (session 36's chaos run: a Revert sent during the coordinator's
    rolling restart was cancelled, and its migration stayed ACTIVE). UNAVAILABLE, before any
    work, is sent again to the restarted coordinator; its migrations carry over."""
    cluster = FakeCluster()

    async def main():
        async with served(redis_server.url, store_prefix, cluster, FakeClock()) as (coord, stub, _):
            started = await stub.StartMigration(layers())
            mid = started.migration.migration_id
            await coord.wait(mid)
            await coord.drain(1.0)  # no worker is stopping: the migration stays ACTIVE
            refused = [
                await status_of(call)
                for call in (
                    stub.RevertMigration(pb.RevertMigrationRequest(migration_id=mid)),
                    stub.AbortMigration(pb.AbortMigrationRequest(migration_id=mid)),
                    stub.StartMigration(layers(donor="decode-1", helper="prefill-1")),
                )
            ]
            described = await stub.DescribeMigration(pb.DescribeMigrationRequest(migration_id=mid))
            return refused, described.migration.state

    refused, state = asyncio.run(main())
    told = (
        C.UNAVAILABLE,
        "the coordinator is stopping: send the command again once it is back "
        "(live migrations carry over)",
    )
    assert refused == [told, told, told]
    assert state == pb.MIGRATION_STATE_ACTIVE


def test_a_wait_that_times_out_exits_1_and_says_so(redis_server, store_prefix, capsys):
    # Session 40's probe: --wait past --wait-timeout printed the COPYING record and exited 0,
    # as if the migration had settled.
    from services.cli import build_parser

    cluster = FakeCluster()
    hold = cluster.hold(P, "prepare helper for [2, 3]")

    def cli(address: str, *argv: str) -> int:
        args = build_parser().parse_args([*argv, "--coordinator", address])
        return args.func(args)

    async def main():
        async with served(redis_server.url, store_prefix, cluster, FakeClock()) as (
            coord, stub, address,
        ):  # fmt: skip
            argv = ("migrate", "layers", "--donor", D, "--helper", P, "--start", "2", "--wait")
            code = await asyncio.to_thread(cli, address, *argv, "--wait-timeout", "0.3")
            await stub.AbortMigration(pb.AbortMigrationRequest(migration_id="m-1"))
            hold.release.set()
            return code

    assert asyncio.run(main()) == 1
    out, err = capsys.readouterr()
    assert "state       COPYING" in out
    assert err == "banaserve: error: m-1 is still COPYING after --wait-timeout 0.3 s\n"
