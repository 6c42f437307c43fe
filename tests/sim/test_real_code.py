"""The simulator runs the project's own decision code, not a copy of it."""

from __future__ import annotations

from dataclasses import replace

from services.common.migration_states import MigrationState
from services.coordinator.policy import Policy, PolicyConfig
from services.engine.block_manager import BlockManager
from services.engine.scheduler import Scheduler
from services.launcher import Mode
from services.router.core import Router
from services.sim.cluster import SimCluster, SimSpec
from services.sim.profile import DecodeModel, TransportModel
from tests.sim.factories import assert_no_leaks, make_profile, request


def decode_heavy() -> list:
    # 8 short prompts, 120 tokens out each: the decode worker is busy every step for ~12 s,
    # the prefill worker idle after the first 1.3 s.
    return [request(i, 0.0, 16, 120) for i in range(8)]


def run(policy: PolicyConfig, **profile) -> SimCluster:
    cluster = SimCluster(SimSpec(Mode.BANASERVE, 2, policy=policy), make_profile(**profile))
    requests = cluster.run(decode_heavy())
    assert all(r.status == "OK" for r in requests)
    return cluster


def test_the_objects_are_the_projects_own():
    cluster = SimCluster(SimSpec(Mode.BANASERVE, 2), make_profile())
    assert type(cluster.router) is Router and type(cluster.policy) is Policy
    for w in cluster.workers.values():
        assert type(w.scheduler) is Scheduler and type(w.block_manager) is BlockManager


# The decode worker runs 8 sequences: past the backlog threshold only when it is 8.
EIGHT = PolicyConfig(min_running_seqs=8)


def test_the_policy_decides_a_layer_migration_off_the_hot_decode_worker():
    cluster = run(EIGHT)
    (m,) = cluster.migrations.records()
    assert (m.donor, m.helper, m.start_layer, m.end_layer) == ("decode-000", "prefill-000", 1, 2)
    states = [t.state for t in m.timings]
    assert states[:4] == [MigrationState.PLANNED, MigrationState.COPYING,
                          MigrationState.SWITCHING, MigrationState.ACTIVE]  # fmt: skip
    assert_no_leaks(cluster)


def test_a_policy_config_change_changes_the_decisions():
    # The same load, a sustain longer than the run: the real policy never starts anything.
    cluster = run(replace(EIGHT, sustain_s=100.0))
    assert cluster.migrations.records() == []
    # By default 8 running sequences and nothing waiting is no backlog: busy, but a layer
    # split cannot pay at that batch (docs/coordinator.md, min_running_seqs). (With 64 blocks
    # the 8 outgrow the decode worker's memory near the end and one is preempted: a decode
    # worker's waiting sequences are no backlog since session 30, nothing moves; with 48 its
    # pool stays 90 % used, a backlog, and that moves a layer; 128 hold them.)
    cluster = run(PolicyConfig(), num_kv_blocks=128)
    assert cluster.migrations.records() == []
    assert run(PolicyConfig()).migrations.records() == []
    assert len(run(PolicyConfig(), num_kv_blocks=48).migrations.records()) == 1
    # Steps of ~0.1 s are not full ones when 0.25 s is (full_step_s): the decode worker has
    # room (U_compute ~0.4 against an idle prefill worker's 0: under gap_high), nothing moves.
    cluster = run(replace(EIGHT, full_step_s=0.25))
    assert cluster.migrations.records() == []


def test_a_layer_migration_shortens_the_donors_steps_when_rows_cost_more_than_the_step():
    # 8 sequences at 10 ms each + 20 ms a step = 0.1 s. The decode donor's two step streams of
    # 4 take (0.1 + 0.02) / 2 each, and 60 % of both (the donor's part) is 72 ms a token, plus
    # four 0.1 ms hops.
    fast = {"transports": {"tcp": TransportModel(0.0001, 1e6)}}
    rows = {**fast, "decode": DecodeModel(0.02, 0.01, 0.0)}
    done = lambda c: max(r.done_s for r in c.requests.values())  # noqa: E731
    with_migration = run(EIGHT, **rows)
    assert len(with_migration.migrations.records()) == 1
    assert done(with_migration) < done(run(replace(EIGHT, sustain_s=100.0), **rows))
    # All fixed cost (0.1 s a step whatever the batch): a half step costs the whole step, and
    # the split makes the run longer (as a layer split at a small batch does, docs/migration.md)
    with_migration = run(EIGHT, **fast)
    assert len(with_migration.migrations.records()) == 1
    assert done(with_migration) > done(run(replace(EIGHT, sustain_s=100.0), **fast))
