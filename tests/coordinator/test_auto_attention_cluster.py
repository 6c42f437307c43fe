"""Real processes, ``banaserve up --mode banaserve``'s cluster with the coordinator's automatic
mode and its attention kind on (``--attention``), 1P1D tiny-llama, the decode worker's KV pool
holding two of the requests at a time: six clients sending long greedy requests back to back
keep requests waiting at the router for its room (a memory-bound decode worker, though it reads
busy ~1 as at any batch) beside an idle prefill worker with a large pool. The coordinator lends
KV blocks of the decode worker's longest sequences to the prefill worker on its own, and once
the load is gone it ends the migration on its own. Every greedy output equals the in-process
engine's, token for token, and no block stays held on either worker."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.client.client import BanaServeClient
from services.launcher import Mode, mode_spec
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import (
    coordinator_pb2_grpc,
    decode_pb2,
    decode_pb2_grpc,
    migration_pb2,
    migration_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests.clusters import running_cluster, wait_for
from tests.coordinator.test_auto_cluster import POLICY_FLAGS, migrations
from tests.engine.coordinator import prompt_ids
from tests.migration.test_attention_cluster import expected_tokens

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.cluster,
    pytest.mark.timeout(400),
]
NUM_CLIENTS, MAX_TOKENS = 6, 160
DECODE_BLOCKS = 48  # 16-token blocks: two of the requests (prompt + max_tokens: 21-23 blocks)
SERVED_WHILE_LENT = 6  # requests that end after the migration went ACTIVE, before the load stops
S = pb.MigrationState
ENDED = (S.MIGRATION_STATE_DONE, S.MIGRATION_STATE_ABORTED)


def test_a_memory_bound_decode_worker_lends_kv_blocks_on_its_own(
    banaserve_home, tiny_llama, tmp_path
):
    prompts = [prompt_ids(170 + 11 * i, 300 + i) for i in range(NUM_CLIENTS)]
    expected = expected_tokens(tiny_llama, prompts, MAX_TOKENS)
    spec = mode_spec(
        Mode.BANASERVE, 2, num_kv_blocks=512, kv_transport="tcp",
        service_args={
            "coordinator": (*POLICY_FLAGS, "--attention", "--attention-refill"),
            "decode": ("--num-kv-blocks", str(DECODE_BLOCKS)),
        },
        extra_env={"BANASERVE_HOME": str(banaserve_home)},
    )  # fmt: skip
    stop, lent = threading.Event(), threading.Event()
    hosted: list[int] = []  # blocks the prefill worker hosted, sampled while lent
    outputs: list[tuple[int, list[int], bool]] = []  # (prompt, tokens, ended while lent)
    with (
        running_cluster(spec, tmp_path / "cluster.log") as cluster,
        BanaServeClient(cluster.router.address) as client,
        ThreadPoolExecutor(NUM_CLIENTS) as pool,
        grpc.insecure_channel(cluster.child("coordinator").address) as channel,
        grpc.insecure_channel(cluster.child("decode-0").address) as decode_channel,
        grpc.insecure_channel(cluster.child("prefill-0").address) as prefill_channel,
        grpc.insecure_channel(cluster.router.address) as router_channel,
    ):
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        router = router_pb2_grpc.RouterServiceStub(router_channel)
        ids = {w.address: w.worker_id for w in client.list_workers()}
        decode, prefill = (
            ids[cluster.child("decode-0").address],
            ids[cluster.child("prefill-0").address],
        )

        def closed_loop(i: int) -> None:  # one client: a request, its answer, the next
            while not stop.is_set():
                out = client.complete(prompts[i], temperature=0.0, max_tokens=MAX_TOKENS,
                                      ignore_eos=True, timeout_s=200)  # fmt: skip
                outputs.append((i, list(out.token_ids), lent.is_set()))

        clients = [pool.submit(closed_loop, i) for i in range(NUM_CLIENTS)]
        try:
            first = wait_for(
                lambda: next((m for m in migrations(stub) if m.state != S.MIGRATION_STATE_PLANNED), None),
                "the coordinator to start a migration",
                timeout_s=120,
            )  # fmt: skip
            assert (first.kind, first.donor, first.helper) == (
                pb.MIGRATION_KIND_ATTENTION,
                decode,
                prefill,
            ), first
            wait_for(
                lambda: any(m.state == S.MIGRATION_STATE_ACTIVE for m in migrations(stub)),
                "the migration to switch",
            )
            lent.set()

            def served_while_lent() -> bool:
                hosted.append(hosted_blocks(router, prefill))  # the helper's load report
                return sum(w for *_, w in outputs) >= SERVED_WHILE_LENT

            wait_for(served_while_lent, "requests served with blocks lent", timeout_s=120)
        finally:
            stop.set()
            for c in clients:
                c.result()
        during = migrations(stub)
        done = wait_for(
            lambda: (ms := migrations(stub)) and all(m.state in ENDED for m in ms) and ms,
            "the coordinator to end it",
        )  # fmt: skip
        d_stats = decode_pb2_grpc.DecodeServiceStub(decode_channel)
        wait_for(
            lambda: d_stats.Stats(decode_pb2.DecodeServiceStatsRequest()).kv.num_blocks_used == 0,
            "decode blocks freed",
        )
        helper = migration_pb2_grpc.MigrationWorkerServiceStub(prefill_channel)
        views = helper.List(migration_pb2.MigrationWorkerServiceListRequest(), timeout=10)
    wrong = [(i, ended_lent) for i, tokens, ended_lent in outputs if tokens != expected[i]]
    assert wrong == [], f"{len(wrong)} of {len(outputs)} outputs differ"
    # Started by the coordinator alone (this test never calls StartMigration): blocks of the
    # decode worker lent to the prefill worker, and the only kind it started under this load.
    assert {(m.kind, m.donor, m.helper) for m in during} == {
        (pb.MIGRATION_KIND_ATTENTION, decode, prefill)
    }
    # Blocks were lent (the switch's may be none: its sequences may end first; refill lends
    # the next ones while ACTIVE).
    assert max(hosted) > 0
    assert [(m.state, m.reason) for m in done] == [(S.MIGRATION_STATE_DONE, "")] * len(done)
    assert all(v.num_blocks == 0 for v in views.migrations)  # nothing held on the helper
    print(
        f"{len(outputs)} requests, {sum(w for *_, w in outputs)} with blocks lent; migrations: "
        + ", ".join(f"{m.migration_id} {m.num_blocks} blocks at the switch" for m in done)
        + f"; the helper hosted up to {max(hosted)} blocks"
    )


def hosted_blocks(router: router_pb2_grpc.RouterServiceStub, worker_id: str) -> int:
    reply = router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=10)
    return next(
        w.last_load.num_hosted_blocks for w in reply.workers if w.info.worker_id == worker_id
    )
