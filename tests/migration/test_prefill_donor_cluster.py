"""Real processes: the prefill worker's layers [k, L) move to the decode worker (prefill →
decode) while requests flow through router + prefill + decode.

The test is the coordinator: through each worker's MigrationWorkerService it prepares both,
copies, switches the prefill worker (the donor) so its steps run layers [2, 4) on the decode
worker over the TCP data plane, drops them from the prefill worker, then reverts and releases.
Requests arrive before, while switched (their prompts prefill through the helper and the
prefill worker hands layers [2, 4) on from the helper's copy) and across the revert. Outputs
equal the in-process engine's, token for token; no block is left used, nothing stays hosted.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.client.client import BanaServeClient
from services.common.types import SamplingParams
from services.launcher import ClusterSpec
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb
from services.rpc.gen.banaserve.v1 import migration_pb2_grpc
from tests.clusters import running_cluster, wait_for
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import make_engine
from tests.migration.test_cluster_migration import decode_stats, prefill_stats

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.cluster]
NUM_PER_BATCH, MAX_TOKENS, K, MID = 3, 40, 2, "m-prefill-donor"


@pytest.fixture  # one cluster a case: each lists its own migration alone
def cluster(banaserve_home, tiny_llama, tmp_path_factory):
    env = {"BANASERVE_HOME": str(banaserve_home)}
    spec = ClusterSpec(num_kv_blocks=512, num_kvstore=0, kv_transport="tcp", extra_env=env)
    with running_cluster(spec, tmp_path_factory.mktemp("logs") / "cluster.log") as cluster:
        yield cluster


def prepare(donor, helper) -> pb.MigrationView:
    layers = pb.LayerRange(start=K, end=4)
    prepared = donor.Prepare(
        pb.MigrationWorkerServicePrepareRequest(
            migration_id=MID, role=pb.MIGRATION_ROLE_DONOR, layers=layers
        )
    )
    hp = helper.Prepare(
        pb.MigrationWorkerServicePrepareRequest(
            migration_id=MID,
            role=pb.MIGRATION_ROLE_HELPER,
            layers=layers,
            fingerprint=prepared.fingerprint,
            layer_digests=prepared.layer_digests,
            num_hosted_blocks=128,
        )
    )
    assert list(hp.weights_needed) == []
    return hp.migration


def helper_view(helper) -> pb.MigrationView:
    return helper.List(pb.MigrationWorkerServiceListRequest()).migrations[0]


# 8: the automatic mode's prefill donors (up to 8 micro-batches, one or more prompts each)
@pytest.mark.parametrize("micro", [1, 8])
def test_prefill_layers_on_the_decode_worker_never_change_output(cluster, tiny_llama, micro):
    prompts = [prompt_ids(25 + 17 * i, 300 + i) for i in range(4 * NUM_PER_BATCH)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [c.token_ids for c in make_engine(tiny_llama).generate(prompts, params)]
    batches = [prompts[i : i + NUM_PER_BATCH] for i in range(0, len(prompts), NUM_PER_BATCH)]
    decode, prefill = cluster.child("decode-0").address, cluster.child("prefill-0").address
    with (
        BanaServeClient(cluster.router.address) as client,
        ThreadPoolExecutor(2 * NUM_PER_BATCH) as pool,
        grpc.insecure_channel(prefill) as p_ch,
        grpc.insecure_channel(decode) as d_ch,
    ):

        def submit(batch):
            return [
                pool.submit(
                    client.complete,
                    p,
                    temperature=0.0,
                    max_tokens=MAX_TOKENS,
                    ignore_eos=True,
                    timeout_s=120,
                )
                for p in batch
            ]

        donor = migration_pb2_grpc.MigrationWorkerServiceStub(p_ch)
        helper = migration_pb2_grpc.MigrationWorkerServiceStub(d_ch)
        futures = submit(batches[0])  # before: decoding while the migration starts
        helper_peer = prepare(donor, helper).helper
        futures += submit(batches[1])  # prefilling while it copies and switches
        donor.CopyKV(pb.MigrationWorkerServiceCopyKVRequest(migration_id=MID, helper=helper_peer))
        donor.Switch(
            pb.MigrationWorkerServiceSwitchRequest(migration_id=MID, num_micro_batches=micro)
        )
        switched = submit(batches[2])  # every prompt through the helper
        [f.result() for f in switched]
        assert helper_view(helper).state == pb.MIGRATION_WORKER_STATE_ACTIVE
        donor.Activate(
            pb.MigrationWorkerServiceActivateRequest(migration_id=MID, drop_weights=True)
        )
        futures += switched + submit(batches[3])  # prefilling across the revert
        reverted = donor.Revert(pb.MigrationWorkerServiceRevertRequest(migration_id=MID))
        released = [
            stub.Release(pb.MigrationWorkerServiceReleaseRequest(migration_id=MID))
            for stub in (donor, helper)
        ]
        results = [f.result() for f in futures]
        views = [s.List(pb.MigrationWorkerServiceListRequest()).migrations for s in (donor, helper)]
    order = [*batches[0], *batches[1], *batches[2], *batches[3]]
    assert [list(r.token_ids) for r in results] == [expected[prompts.index(p)] for p in order]
    assert [r.found for r in released] == [True, True]
    assert reverted.num_requeued == 0
    for listed in views:
        assert [(v.migration_id, v.state) for v in listed] == [
            (MID, pb.MIGRATION_WORKER_STATE_DONE)
        ]
    assert views[1][0].num_hosted_blocks == 0
    wait_for(lambda: decode_stats(decode).kv.num_blocks_used == 0, "decode blocks freed")
    wait_for(lambda: prefill_stats(prefill).kv.num_blocks_used == 0, "prefill blocks freed")
