"""Faults of an attention migration in real processes (1P1D on tiny-llama, the coordinator, the
setup of test_attention_cluster.py): each ends with nothing lost, no hang, nothing held.

- The helper (prefill worker) is SIGKILLed while the decode worker's steps attend on it: the
  decode worker recomputes the located sequences, every request finishes with the in-process
  engine's output, the migration ends ABORTED.
- The owner (decode worker) is SIGKILLed while its located blocks are on the helper: no lease
  renewal reaches it, the coordinator aborts the migration when its lease runs out and the helper
  frees every hosted block (its load report drops to 0).
- The owner preempts located sequences (its small pool outgrows with their new tokens, which
  stay local): the preempted sequences' blocks are released on the helper while the migration
  stays ACTIVE and every request still runs; the decode worker counts the preemptions; output
  equals the in-process engine's.
"""

from __future__ import annotations

import pytest

from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import migration_pb2
from tests.clusters import wait_for
from tests.engine.coordinator import prompt_ids
from tests.migration.test_attention_cluster import (
    FAST_LEASE,
    LEASE_S,
    MAX_TOKENS,
    NUM_REQUESTS,
    cluster_spec,
    expected_tokens,
    loaded_cluster,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.cluster,
    pytest.mark.timeout(300),
]


def test_helper_process_killed_while_active_never_changes_output(
    banaserve_home, tiny_llama, tmp_path
):
    prompts = [prompt_ids(40 + 17 * i, 150 + i) for i in range(NUM_REQUESTS)]
    expected = expected_tokens(tiny_llama, prompts, MAX_TOKENS)
    spec = cluster_spec(banaserve_home)
    log = tmp_path / "cluster.log"
    with loaded_cluster(spec, log, prompts, MAX_TOKENS, ("prefill-0",)) as (cluster, c, futures):
        active = c.start_attention(NUM_REQUESTS, max_sequences=3)
        mid = active.migration_id
        cluster.child("prefill-0").proc.kill()
        results = [f.result() for f in futures]
        done = wait_for(
            lambda: (m := c.describe(mid)).state == pb.MIGRATION_STATE_ABORTED and m,
            "the coordinator to see the migration end",
        )
        wait_for(lambda: c.stats().kv.num_blocks_used == 0, "decode blocks freed")
    assert done.state == pb.MIGRATION_STATE_ABORTED, done.reason
    assert [list(r.token_ids) for r in results] == expected
    # the located ones recomputed, and counted (session 43: "0 recomputed")
    assert 1 <= done.num_requeued <= active.num_sequences, (done.num_requeued, active)


def test_owner_process_killed_helper_frees_blocks_when_the_lease_runs_out(
    banaserve_home, tiny_llama, tmp_path
):
    prompts = [prompt_ids(40 + 17 * i, 170 + i) for i in range(NUM_REQUESTS)]
    spec = cluster_spec(banaserve_home, coordinator=FAST_LEASE)
    log = tmp_path / "cluster.log"
    # Outputs far longer than the other cases': every request must still run when the owner is
    # killed, after the switch and the helper's next load report; with MAX_TOKENS a slow switch
    # on a loaded machine can let them finish first, and the kill then fails nothing.
    max_tokens = 1800
    with loaded_cluster(spec, log, prompts, max_tokens, ("decode-0",)) as (cluster, c, futures):
        active = c.start_attention(NUM_REQUESTS, max_sequences=3)
        wait_for(  # the helper's load report (periodic) catches up with the switch
            lambda: c.load(c.helper).num_hosted_blocks == active.num_blocks,
            "the located blocks in the helper's load report",
        )
        assert not any(f.done() for f in futures)
        cluster.child("decode-0").proc.kill()
        for future in futures:  # the requests fail with their decode worker; none hangs
            assert future.exception(timeout=60) is not None
        done = wait_for(
            lambda: (
                (m := c.describe(active.migration_id)).state == pb.MIGRATION_STATE_ABORTED and m
            ),
            "the lease to run out",
            timeout_s=LEASE_S + 30,
        )
        wait_for(lambda: c.load(c.helper).num_hosted_blocks == 0, "hosted blocks freed")
        view = c.view(c.helper_worker, active.migration_id)
        assert c.load(c.helper).num_kv_blocks_used == 0
    assert done.reason.startswith(f"no lease renewal reached {c.donor}"), done.reason
    assert view is None or (view.state, view.num_blocks) == (
        migration_pb2.MIGRATION_WORKER_STATE_ABORTED,
        0,
    )


def test_owner_preempting_located_sequences_releases_their_blocks(
    banaserve_home, tiny_llama, tmp_path
):
    # Short prompts, long outputs, a 120-block decode pool: the four would outgrow it near 480
    # tokens each without the migration (room for their arrivals to spread on a loaded
    # machine); with their first blocks on the helper they still do, later (their new tokens
    # stay local), and the scheduler's victim is a located sequence.
    prompts = [prompt_ids(20 + 3 * i, 190 + i) for i in range(NUM_REQUESTS)]
    max_tokens = 1000
    expected = expected_tokens(tiny_llama, prompts, max_tokens)
    spec = cluster_spec(banaserve_home, decode=("--num-kv-blocks", "120"))
    log = tmp_path / "cluster.log"
    with loaded_cluster(spec, log, prompts, max_tokens) as (cluster, c, futures):
        active = c.start_attention(NUM_REQUESTS, max_sequences=NUM_REQUESTS)
        assert active.num_sequences == NUM_REQUESTS
        assert c.stats().num_preemptions == 0  # not before the switch
        mid = active.migration_id
        wait_for(lambda: c.stats().num_preemptions > 0, "a preemption", timeout_s=120)
        # Its blocks are released on the helper while every request still runs.
        wait_for(
            lambda: c.view(c.helper_worker, mid).num_blocks < active.num_blocks,
            "the preempted sequence's blocks released",
        )
        assert not any(f.done() for f in futures)
        assert c.describe(mid).state == pb.MIGRATION_STATE_ACTIVE
        results = [f.result() for f in futures]
        c.coordinator.RevertMigration(pb.RevertMigrationRequest(migration_id=mid), timeout=10)
        done = wait_for(
            lambda: (m := c.describe(mid)).state == pb.MIGRATION_STATE_DONE and m, "the revert"
        )
        wait_for(lambda: c.load(c.helper).num_hosted_blocks == 0, "hosted blocks freed")
        wait_for(lambda: c.stats().kv.num_blocks_used == 0, "decode blocks freed")
        preemptions = c.stats().num_preemptions
    assert [list(r.token_ids) for r in results] == expected
    assert done.num_requeued == 0
    print(f"{preemptions} preemptions, {active.num_blocks} blocks located")
