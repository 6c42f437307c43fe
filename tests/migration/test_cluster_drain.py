"""A worker stopped on purpose (SIGTERM: its drain) while it takes part in a migration, in real
processes (1P1D on tiny-llama with the coordinator, the setup of test_cluster_faults.py).

The helper (prefill worker) is sent SIGTERM while a migration of either kind is ACTIVE on it.
Its next lease renewal tells the coordinator it is stopping; the coordinator reverts the
migration, and the worker stops once it holds nothing. So the migration ends DONE, not ABORTED
with "helper unreachable", no sequence recomputes, every request ends with the in-process
engine's tokens, and the worker exits 0. Before, a helper with no prompt of its own stopped at
once and its donor fell back (the helper-killed path of test_cluster_faults.py).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.launcher import LocalCluster
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from tests.clusters import wait_for
from tests.engine.coordinator import prompt_ids
from tests.migration.test_attention_cluster import (
    ENDED,
    NUM_REQUESTS,
    cluster_spec,
    expected_tokens,
    loaded_cluster,
)
from tests.migration.test_cluster_faults import start_layers

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.cluster,
    pytest.mark.timeout(300),
]
MAX_TOKENS = 480  # still decoding after the revert


@pytest.mark.parametrize("kind", ["layers", "attention"])
def test_a_stopping_helper_has_its_migration_reverted_before_it_exits(
    banaserve_home, tiny_llama, tmp_path, kind
):
    prompts = [prompt_ids(30 + 13 * i, 270 + i) for i in range(NUM_REQUESTS)]
    expected = expected_tokens(tiny_llama, prompts, MAX_TOKENS)
    spec = cluster_spec(banaserve_home)
    log = tmp_path / "cluster.log"
    with loaded_cluster(spec, log, prompts, MAX_TOKENS) as (cluster, c, futures):
        if kind == "layers":
            mid = start_layers(c).migration_id
        else:
            mid = c.start_attention(NUM_REQUESTS, max_sequences=3).migration_id
        helper = cluster.child("prefill-0").proc
        signalled = time.monotonic()
        helper.send_signal(signal.SIGTERM)
        done = wait_for(lambda: (m := c.describe(mid)).state in ENDED and m, "the revert")
        ended_s = time.monotonic() - signalled
        assert not all(f.done() for f in futures)  # reverted while the requests decode
        code = helper.wait(timeout=30)
        exited_s = time.monotonic() - signalled
        donor_view = c.view(c.donor_worker, mid)
        live = c.coordinator.ListMigrations(pb.ListMigrationsRequest(live_only=True), timeout=10)
        results = [f.result(timeout=120) for f in futures]
        wait_for(lambda: c.stats().kv.num_blocks_used == 0, "decode blocks freed")
    assert (done.state, done.reason) == (pb.MIGRATION_STATE_DONE, ""), done.reason
    assert code == 0
    assert ended_s < 15, ended_s  # a renewal (2 s) and the revert, not the 30 s drain
    assert exited_s < 20, exited_s
    assert donor_view.reason == "", donor_view.reason  # never "helper unreachable"
    assert list(live.migrations) == []
    assert [list(r.token_ids) for r in results] == expected
    assert "recompute" not in log.read_text().lower()


def test_a_stopping_worker_is_refused_a_new_migration(banaserve_home, tiny_llama, tmp_path):
    """The decode worker drains (its requests keep it up): a migration asked of it meanwhile
    fails at its prepare, naming the stop, and the requests still end whole."""
    prompts = [prompt_ids(30 + 13 * i, 290 + i) for i in range(NUM_REQUESTS)]
    spec = cluster_spec(banaserve_home)
    log = tmp_path / "cluster.log"
    with loaded_cluster(spec, log, prompts, MAX_TOKENS) as (cluster, c, futures):
        wait_for(lambda: c.stats().num_running_seqs == NUM_REQUESTS, "the requests to decode")
        decode = cluster.child("decode-0").proc
        decode.send_signal(signal.SIGTERM)
        wait_for(lambda: c.load(c.donor).draining, "the decode worker's draining report")
        spec_ = pb.LayerMigrationSpec(donor=c.donor, helper=c.helper, start_layer=2)
        request = pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_LAYERS, layers=spec_)
        mid = c.coordinator.StartMigration(request, timeout=10).migration.migration_id
        done = wait_for(lambda: (m := c.describe(mid)).state in ENDED and m, "the refusal")
        results = [f.result(timeout=120) for f in futures]
        assert decode.wait(timeout=30) == 0
    assert done.state == pb.MIGRATION_STATE_ABORTED
    assert "stopping: it takes no new migration" in done.reason, done.reason
    assert all(len(r.token_ids) == MAX_TOKENS for r in results)


@dataclass
class Migrating:
    cluster: LocalCluster
    futures: list[Future]
    mid: str
    expected: list[list[int]]
    log: Path


@contextmanager
def migrating_cluster(banaserve_home, tiny_llama, tmp_path, seed: int) -> Iterator[Migrating]:
    """A fresh cluster with greedy requests decoding and layers [K, L) of the decode worker
    ACTIVE on the prefill worker."""
    prompts = [prompt_ids(30 + 13 * i, seed + i) for i in range(NUM_REQUESTS)]
    expected = expected_tokens(tiny_llama, prompts, MAX_TOKENS)
    log = tmp_path / "cluster.log"
    with loaded_cluster(cluster_spec(banaserve_home), log, prompts, MAX_TOKENS) as (
        cluster,
        c,
        futures,
    ):
        yield Migrating(cluster, futures, start_layers(c).migration_id, expected, log)


def reverted_before_exit(run: Migrating, results: list) -> str:
    """Output unchanged, the revert in the log, no lease expiry or fall-back; the log."""
    assert [list(r.token_ids) for r in results] == run.expected
    text = run.log.read_text()
    assert f"{run.mid}: " in text and "is stopping: reverting" in text
    assert "lease expired" not in text and "helper unreachable" not in text
    return text


def test_stopping_the_cluster_reverts_a_live_migration_before_its_workers_go(
    banaserve_home, tiny_llama, tmp_path
):
    """``LocalCluster.stop`` (``banaserve up``'s Ctrl-C) with a layer migration ACTIVE: the
    router drains first (the requests end whole), then the workers, told to stop, have the
    coordinator, still up, revert it; before, the coordinator went first and the workers' own
    leases ended it ("lease expired"), the donor falling back."""
    with migrating_cluster(banaserve_home, tiny_llama, tmp_path, 310) as run:
        codes = run.cluster.stop()
        results = [f.result(timeout=60) for f in run.futures]
    assert set(codes.values()) == {0}, codes
    text = reverted_before_exit(run, results)
    # both workers stop together; the donor, its first holder, is the one named
    assert f"{run.mid}: decode-" in text


def test_a_cluster_torn_down_at_once_has_its_migration_reverted_by_the_coordinator(
    banaserve_home, tiny_llama, tmp_path
):
    """Compose's ``down`` without ordering, or ``kubectl delete``: the donor, the helper and the
    coordinator are sent SIGTERM together, a layer migration ACTIVE. The coordinator's drain
    reverts it before it goes (the workers answer its last renewal that they stop too), the
    workers finish their requests, and all three exit 0; before, the coordinator stopped at
    once and the workers' leases ended the migration ("lease expired"), the donor falling back."""
    with migrating_cluster(banaserve_home, tiny_llama, tmp_path, 330) as run:
        children = [run.cluster.child(n) for n in ("coordinator", "decode-0", "prefill-0")]
        for child in children:
            child.proc.send_signal(signal.SIGTERM)
        codes = [child.proc.wait(timeout=40) for child in children]
        results = [f.result(timeout=60) for f in run.futures]
    assert codes == [0, 0, 0]
    reverted_before_exit(run, results)
