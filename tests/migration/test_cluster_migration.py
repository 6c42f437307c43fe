"""Real processes: router + prefill + decode workers, a layer migration driven over gRPC.

The test is the coordinator: through each worker's MigrationWorkerService it moves the decode
worker's layers [2, 4) to the prefill worker (Prepare both, two stages of CopyKV, Switch), lets
the decode worker's steps run them there over the TCP data plane, then reverts and releases,
all while greedy requests decode. Output equals the in-process engine's, token for token; no
block is left used and nothing stays hosted on either worker.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.client.client import BanaServeClient
from services.common.types import SamplingParams
from services.kvstore.redis_server import free_port
from services.launcher import ClusterSpec
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    kvstore_pb2,
    migration_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb
from tests.clusters import running_cluster, scrape, value, wait_for
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import make_engine

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.cluster]
NUM_REQUESTS, MAX_TOKENS, K = 4, 400, 2
METRICS_PORTS: dict[str, int] = {}  # the module cluster's, by service


@pytest.fixture(scope="module")
def cluster(banaserve_home, tiny_llama, tmp_path_factory):
    env = {"BANASERVE_HOME": str(banaserve_home)}
    METRICS_PORTS["decode"] = free_port()
    metrics = ("--metrics-port", str(METRICS_PORTS["decode"]))
    spec = ClusterSpec(
        num_kv_blocks=512, num_kvstore=0, kv_transport="tcp", extra_env=env,
        service_args={"decode": metrics},
    )  # fmt: skip
    with running_cluster(spec, tmp_path_factory.mktemp("logs") / "cluster.log") as cluster:
        yield cluster


def overlapped_steps() -> float:
    """The decode worker's steps started while another was in flight (two step streams)."""
    metrics = scrape(METRICS_PORTS["decode"])
    family = "banaserve_worker_overlapped_steps"
    return value(metrics, family, f"{family}_total", role="decode", model="tiny-llama")


def decode_stats(address: str):
    with grpc.insecure_channel(address) as ch:
        return decode_pb2_grpc.DecodeServiceStub(ch).Stats(decode_pb2.DecodeServiceStatsRequest())


def prefill_stats(address: str):
    with grpc.insecure_channel(address) as ch:
        stub = prefill_pb2_grpc.PrefillServiceStub(ch)
        return stub.Stats(prefill_pb2.PrefillServiceStatsRequest())


def migrate_and_revert(donor, helper) -> dict[str, object]:
    mid, layers = "m-e2e", pb.LayerRange(start=K, end=4)
    role = {"donor": pb.MIGRATION_ROLE_DONOR, "helper": pb.MIGRATION_ROLE_HELPER}
    prepared = donor.Prepare(
        pb.MigrationWorkerServicePrepareRequest(migration_id=mid, role=role["donor"], layers=layers)
    )
    hp = helper.Prepare(
        pb.MigrationWorkerServicePrepareRequest(
            migration_id=mid,
            role=role["helper"],
            layers=layers,
            fingerprint=prepared.fingerprint,
            layer_digests=prepared.layer_digests,
            num_hosted_blocks=256,
        )
    )
    assert list(hp.weights_needed) == [] and hp.migration.helper.data_address
    assert hp.migration.helper.data_transport == kvstore_pb2.DATA_TRANSPORT_TCP
    copies = [
        donor.CopyKV(
            pb.MigrationWorkerServiceCopyKVRequest(migration_id=mid, helper=hp.migration.helper)
        )
        for _ in range(2)
    ]
    switched = donor.Switch(
        pb.MigrationWorkerServiceSwitchRequest(migration_id=mid, num_micro_batches=2)
    )
    wait_for(
        lambda: (
            helper.List(pb.MigrationWorkerServiceListRequest()).migrations[0].state
            == pb.MIGRATION_WORKER_STATE_ACTIVE
        ),
        "the donor's steps to reach the helper",
    )
    # its two micro-batches run as two step streams: steps overlap in the worker process
    wait_for(lambda: overlapped_steps() > 0, "the donor's steps to overlap")
    active = donor.Activate(pb.MigrationWorkerServiceActivateRequest(migration_id=mid))
    reverted = donor.Revert(pb.MigrationWorkerServiceRevertRequest(migration_id=mid))
    released = [
        stub.Release(pb.MigrationWorkerServiceReleaseRequest(migration_id=mid))
        for stub in (donor, helper)
    ]
    return dict(
        copies=copies, switched=switched, active=active, reverted=reverted, released=released
    )


def test_decode_layers_on_the_prefill_worker_never_change_output(cluster, tiny_llama):
    prompts = [prompt_ids(20 + 13 * i, 40 + i) for i in range(NUM_REQUESTS)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = make_engine(tiny_llama).generate(prompts, [params] * NUM_REQUESTS)
    decode, prefill = cluster.child("decode-0").address, cluster.child("prefill-0").address
    with (
        BanaServeClient(cluster.router.address) as client,
        ThreadPoolExecutor(NUM_REQUESTS) as pool,
        grpc.insecure_channel(decode) as d_ch,
        grpc.insecure_channel(prefill) as p_ch,
    ):
        futures = [
            pool.submit(
                client.complete,
                p,
                temperature=0.0,
                max_tokens=MAX_TOKENS,
                ignore_eos=True,
                timeout_s=120,
            )
            for p in prompts
        ]
        wait_for(
            lambda: (
                (s := decode_stats(decode)).num_running_seqs == NUM_REQUESTS and not s.reservations
            ),
            "every request to decode",
        )
        donor = migration_pb2_grpc.MigrationWorkerServiceStub(d_ch)
        helper = migration_pb2_grpc.MigrationWorkerServiceStub(p_ch)
        steps = migrate_and_revert(donor, helper)
        results = [f.result() for f in futures]
        listed = [
            s.List(pb.MigrationWorkerServiceListRequest()).migrations for s in (donor, helper)
        ]
    print(  # the figures, for `pytest -s`
        f"copy {[c.bytes_moved for c in steps['copies']]} B; switch pause "
        f"{steps['switched'].pause.ToTimedelta().total_seconds() * 1e3:.1f} ms, "
        f"{steps['switched'].bytes_moved} B; revert pause "
        f"{steps['reverted'].pause.ToTimedelta().total_seconds() * 1e3:.1f} ms, "
        f"{steps['reverted'].bytes_moved} B"
    )
    assert [list(r.token_ids) for r in results] == [c.token_ids for c in expected]
    # tiny-llama's KV in use is far below the agent's precopy_skip_bytes: the copies make no
    # visit, and the switch's pause carries every sequence whole
    assert [(c.num_sequences, c.bytes_moved) for c in steps["copies"]] == [(0, 0), (0, 0)]
    assert steps["switched"].num_sequences == NUM_REQUESTS and steps["switched"].bytes_moved > 0
    assert steps["switched"].num_requeued == 0
    assert steps["reverted"].num_sequences == NUM_REQUESTS and steps["reverted"].num_requeued == 0
    assert [r.found for r in steps["released"]] == [True, True]
    for views in listed:
        assert [(v.migration_id, v.state) for v in views] == [
            ("m-e2e", pb.MIGRATION_WORKER_STATE_DONE)
        ]
    assert listed[1][0].num_hosted_blocks == 0
    wait_for(lambda: decode_stats(decode).kv.num_blocks_used == 0, "decode blocks freed")
    assert prefill_stats(prefill).kv.num_blocks_used == 0


@pytest.fixture(scope="module")
def mixed_cluster(banaserve_home, tiny_llama, tmp_path_factory):
    env = {"BANASERVE_HOME": str(banaserve_home)}
    spec = ClusterSpec(
        num_decode=0,
        num_mixed=1,
        num_kv_blocks=512,
        num_kvstore=0,
        kv_transport="tcp",
        extra_env=env,
    )
    with running_cluster(spec, tmp_path_factory.mktemp("logs") / "mixed.log") as cluster:
        yield cluster


def generate_on(address: str, request_id: str, prompt: list[int]) -> list[int]:
    """A request prefilled and decoded by one mixed worker (no router): its tokens."""
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with grpc.insecure_channel(address) as ch:
        stub = decode_pb2_grpc.DecodeServiceStub(ch)
        stub.ReserveKV(
            decode_pb2.ReserveKVRequest(
                request_id=request_id,
                prompt_token_ids=prompt,
                sampling=sampling,
                prefill_locally=True,
            )
        )
        frames = list(stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id=request_id)))
    assert frames[-1].WhichOneof("frame") == "finished"
    return [t for f in frames[:-1] for t in f.delta.token_ids]


def test_mixed_worker_admits_requests_through_the_helper(mixed_cluster, tiny_llama):
    """Requests admitted while the layers run on the helper prefill through it."""
    prompts = [prompt_ids(30 + 11 * i, 60 + i) for i in range(NUM_REQUESTS)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = make_engine(tiny_llama).generate(prompts, [params] * NUM_REQUESTS)
    mixed, prefill = (
        mixed_cluster.child("mixed-0").address,
        mixed_cluster.child("prefill-0").address,
    )
    half = NUM_REQUESTS // 2
    with (
        ThreadPoolExecutor(NUM_REQUESTS) as pool,
        grpc.insecure_channel(mixed) as m_ch,
        grpc.insecure_channel(prefill) as p_ch,
    ):
        first = [pool.submit(generate_on, mixed, f"a{i}", p) for i, p in enumerate(prompts[:half])]
        wait_for(lambda: decode_stats(mixed).num_running_seqs == half, "the first half to run")
        donor = migration_pb2_grpc.MigrationWorkerServiceStub(m_ch)
        helper = migration_pb2_grpc.MigrationWorkerServiceStub(p_ch)
        mid, layers = "m-mixed", pb.LayerRange(start=1, end=4)
        prepared = donor.Prepare(
            pb.MigrationWorkerServicePrepareRequest(
                migration_id=mid, role=pb.MIGRATION_ROLE_DONOR, layers=layers
            )
        )
        hp = helper.Prepare(
            pb.MigrationWorkerServicePrepareRequest(
                migration_id=mid,
                role=pb.MIGRATION_ROLE_HELPER,
                layers=layers,
                fingerprint=prepared.fingerprint,
                layer_digests=prepared.layer_digests,
            )
        )
        donor.CopyKV(
            pb.MigrationWorkerServiceCopyKVRequest(migration_id=mid, helper=hp.migration.helper)
        )
        donor.Switch(pb.MigrationWorkerServiceSwitchRequest(migration_id=mid, num_micro_batches=1))
        second = [pool.submit(generate_on, mixed, f"b{i}", p) for i, p in enumerate(prompts[half:])]
        wait_for(
            lambda: (
                helper.List(pb.MigrationWorkerServiceListRequest())
                .migrations[0]
                .num_hosted_sequences
                == NUM_REQUESTS
            ),
            "every request's layers [1, 4) on the helper",
        )
        reverted = donor.Revert(pb.MigrationWorkerServiceRevertRequest(migration_id=mid))
        for stub in (donor, helper):
            stub.Release(pb.MigrationWorkerServiceReleaseRequest(migration_id=mid))
        tokens = [f.result() for f in first + second]
    assert tokens == [c.token_ids for c in expected]
    assert reverted.num_requeued == 0
    wait_for(lambda: decode_stats(mixed).kv.num_blocks_used == 0, "mixed blocks freed")
    assert prefill_stats(prefill).kv.num_blocks_used == 0
