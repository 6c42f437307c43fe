"""Real processes (``banaserve up --coordinator``'s cluster): router, prefill and decode workers
and the coordinator. Through the coordinator's API and CLI the decode worker's layers [2, 4) move
to the prefill worker while greedy requests decode, then come back; the output equals the
in-process engine's token for token, and nothing stays held on either worker."""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.client.client import BanaServeClient
from services.common.types import SamplingParams
from services.coordinator.cli import add_migrations_arguments, run_migrations
from services.launcher import ClusterSpec
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import (
    coordinator_pb2_grpc,
    decode_pb2,
    decode_pb2_grpc,
    migration_pb2,
    migration_pb2_grpc,
)
from tests.clusters import running_cluster, wait_for
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import make_engine

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.cluster,
    pytest.mark.timeout(400),
]
NUM_REQUESTS, MAX_TOKENS, K = 4, 300, 2


@pytest.fixture(scope="module")
def cluster(banaserve_home, tiny_llama, tmp_path_factory):
    env = {"BANASERVE_HOME": str(banaserve_home)}
    spec = ClusterSpec(
        num_kv_blocks=512, num_kvstore=0, kv_transport="tcp", coordinator=True, extra_env=env
    )
    with running_cluster(spec, tmp_path_factory.mktemp("logs") / "cluster.log") as cluster:
        yield cluster


def describe(stub, migration_id: str) -> pb.Migration:
    request = pb.DescribeMigrationRequest(migration_id=migration_id)
    return stub.DescribeMigration(request, timeout=10).migration


def test_coordinated_layer_migration_never_changes_output(cluster, tiny_llama, capsys):
    prompts = [prompt_ids(20 + 13 * i, 70 + i) for i in range(NUM_REQUESTS)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = make_engine(tiny_llama).generate(prompts, [params] * NUM_REQUESTS)
    decode, prefill = cluster.child("decode-0").address, cluster.child("prefill-0").address
    coordinator = cluster.child("coordinator").address
    with (
        BanaServeClient(cluster.router.address) as client,
        ThreadPoolExecutor(NUM_REQUESTS) as pool,
        grpc.insecure_channel(coordinator) as channel,
        grpc.insecure_channel(decode) as d_ch,
    ):
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        # `up` registers each worker under the name it prints, the id `banaserve migrate` takes.
        ids = {w.address: w.worker_id for w in client.list_workers()}
        assert ids == {decode: "decode-0", prefill: "prefill-0"}
        donor, helper = ids[decode], ids[prefill]
        futures = [
            pool.submit(
                client.complete,
                p,
                temperature=0.0,
                max_tokens=MAX_TOKENS,
                ignore_eos=True,
                timeout_s=200,
            )  # fmt: skip
            for p in prompts
        ]
        stats = decode_pb2_grpc.DecodeServiceStub(d_ch)
        wait_for(
            lambda: (
                stats.Stats(decode_pb2.DecodeServiceStatsRequest()).num_running_seqs == NUM_REQUESTS
            ),
            "every request to decode",
        )
        spec = pb.LayerMigrationSpec(donor=donor, helper=helper, start_layer=K)
        started = stub.StartMigration(
            pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_LAYERS, layers=spec), timeout=10
        ).migration
        assert (started.migration_id, started.end_layer) == ("m-1", 4)
        active = wait_for(
            lambda: (
                (m := describe(stub, "m-1")).state != pb.MIGRATION_STATE_PLANNED
                and m.state not in (pb.MIGRATION_STATE_COPYING, pb.MIGRATION_STATE_SWITCHING)
                and m
            ),
            "the migration to settle",
        )
        assert active.state == pb.MIGRATION_STATE_ACTIVE, active.reason
        assert active.weights_skipped and active.num_kv_bytes > 0
        assert active.num_sequences == NUM_REQUESTS and active.num_requeued == 0
        stub.RevertMigration(pb.RevertMigrationRequest(migration_id="m-1"), timeout=10)
        done = wait_for(
            lambda: (
                (m := describe(stub, "m-1")).state
                in (pb.MIGRATION_STATE_DONE, pb.MIGRATION_STATE_ABORTED)
                and m
            ),
            "the revert",
        )
        results = [f.result() for f in futures]
        parser = argparse.ArgumentParser()  # the command line's own flags and defaults
        add_migrations_arguments(parser)
        assert run_migrations(parser.parse_args(["--coordinator", coordinator])) == 0
        worker = migration_pb2_grpc.MigrationWorkerServiceStub(d_ch)
        views = worker.List(migration_pb2.MigrationWorkerServiceListRequest()).migrations
    assert done.state == pb.MIGRATION_STATE_DONE, done.reason
    assert [list(r.token_ids) for r in results] == [c.token_ids for c in expected]
    assert [(v.migration_id, v.state) for v in views] == [
        ("m-1", migration_pb2.MIGRATION_WORKER_STATE_DONE)
    ]
    assert [t.state for t in done.timings] == [
        pb.MIGRATION_STATE_PLANNED, pb.MIGRATION_STATE_COPYING, pb.MIGRATION_STATE_SWITCHING,
        pb.MIGRATION_STATE_ACTIVE, pb.MIGRATION_STATE_REVERTING, pb.MIGRATION_STATE_DONE,
    ]  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith(f"m-1    layers    DONE       {donor:>12} -> {helper:<12} [2, 4)")
    wait_for(
        lambda: (
            decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(decode))
            .Stats(decode_pb2.DecodeServiceStatsRequest())
            .kv.num_blocks_used
            == 0
        ),
        "decode blocks freed",
    )
    print(
        f"kv {done.num_kv_bytes} B, switch pause {done.switch_pause.ToNanoseconds() / 1e6:.1f} ms, "
        + ", ".join(
            f"{pb.MigrationState.Name(t.state)} {t.duration.ToNanoseconds() / 1e6:.0f} ms"
            for t in done.timings
        )
    )


def test_an_abort_while_active_never_changes_output(cluster, tiny_llama):
    """Aborted while ACTIVE (no revert: the donor falls back and recomputes the KV it lacks)."""
    prompts = [prompt_ids(24 + 11 * i, 90 + i) for i in range(NUM_REQUESTS)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = make_engine(tiny_llama).generate(prompts, [params] * NUM_REQUESTS)
    decode, prefill = cluster.child("decode-0").address, cluster.child("prefill-0").address
    with (
        BanaServeClient(cluster.router.address) as client,
        ThreadPoolExecutor(NUM_REQUESTS) as pool,
        grpc.insecure_channel(cluster.child("coordinator").address) as channel,
        grpc.insecure_channel(decode) as d_ch,
    ):
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        ids = {w.address: w.worker_id for w in client.list_workers()}
        futures = [
            pool.submit(
                client.complete,
                p,
                temperature=0.0,
                max_tokens=MAX_TOKENS,
                ignore_eos=True,
                timeout_s=200,
            )  # fmt: skip
            for p in prompts
        ]
        stats = decode_pb2_grpc.DecodeServiceStub(d_ch)
        wait_for(
            lambda: (
                stats.Stats(decode_pb2.DecodeServiceStatsRequest()).num_running_seqs == NUM_REQUESTS
            ),
            "every request to decode",
        )
        spec = pb.LayerMigrationSpec(donor=ids[decode], helper=ids[prefill], start_layer=1)
        request = pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_LAYERS, layers=spec)
        mid = stub.StartMigration(request, timeout=10).migration.migration_id
        active = wait_for(
            lambda: (
                (m := describe(stub, mid)).state
                in (pb.MIGRATION_STATE_ACTIVE, pb.MIGRATION_STATE_ABORTED)
                and m
            ),
            "the migration to settle",
        )
        assert active.state == pb.MIGRATION_STATE_ACTIVE, active.reason
        abort = pb.AbortMigrationRequest(migration_id=mid, reason="test abort")
        aborted = stub.AbortMigration(abort, timeout=30).migration
        results = [f.result() for f in futures]
        worker = migration_pb2_grpc.MigrationWorkerServiceStub(d_ch)
        views = worker.List(migration_pb2.MigrationWorkerServiceListRequest()).migrations
    assert (aborted.state, aborted.reason) == (pb.MIGRATION_STATE_ABORTED, "test abort")
    assert [list(r.token_ids) for r in results] == [c.token_ids for c in expected]
    assert [(v.migration_id, v.state) for v in views if v.migration_id == mid] == [
        (mid, migration_pb2.MIGRATION_WORKER_STATE_ABORTED)
    ]
    wait_for(
        lambda: (
            decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(decode))
            .Stats(decode_pb2.DecodeServiceStatsRequest())
            .kv.num_blocks_used
            == 0
        ),
        "decode blocks freed",
    )
