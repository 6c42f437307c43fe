"""Real processes, ``banaserve up --mode banaserve``'s cluster (the coordinator in automatic
mode, the KV store, load routing) over 1 prefill + 1 decode tiny-llama workers: a decode-heavy
burst makes it move the decode worker's layers to the idle prefill worker on its own, and once
the burst is over it takes them back on its own; every greedy output equals the in-process
engine's, token for token.

Thresholds are set by flags so that it acts within seconds: a 1 s window, a gap of 0.3 held
1 s to start, a gap under 0.15 held 3 s to revert, a 2 s cool-down."""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.client.client import BanaServeClient
from services.common.types import SamplingParams
from services.coordinator.cli import format_row, run_migrations
from services.launcher import Mode, mode_spec
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import coordinator_pb2_grpc, decode_pb2, decode_pb2_grpc
from tests.clusters import running_cluster, wait_for
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import make_engine

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.cluster,
    pytest.mark.timeout(400),
]
NUM_REQUESTS, MAX_TOKENS, MAX_WAVES = 4, 160, 12
POLICY_FLAGS = (
    "--interval-s", "0.5", "--window-s", "1", "--min-reports", "3",
    "--sustain-s", "1", "--gap-high", "0.3", "--gap-low", "0.15", "--revert-after-s", "3",
    "--cooldown-s", "2", "--min-running-seqs", "1",  # 4 sequences are the whole burst here
)  # fmt: skip
S = pb.MigrationState


def migrations(stub) -> list[pb.Migration]:
    return list(stub.ListMigrations(pb.ListMigrationsRequest(), timeout=10).migrations)


def test_a_decode_burst_migrates_and_reverts_on_its_own(
    banaserve_home, tiny_llama, tmp_path, capsys
):
    prompts = [prompt_ids(20 + 13 * i, 170 + i) for i in range(NUM_REQUESTS)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [c.token_ids for c in make_engine(tiny_llama).generate(prompts, [params] * 4)]
    spec = mode_spec(
        Mode.BANASERVE, 2, num_kv_blocks=512, kv_transport="tcp",
        service_args={"coordinator": POLICY_FLAGS},
        extra_env={"BANASERVE_HOME": str(banaserve_home)},
    )  # fmt: skip
    assert spec.service_args["coordinator"][0] == "--auto"
    with (
        running_cluster(spec, tmp_path / "cluster.log") as cluster,
        BanaServeClient(cluster.router.address) as client,
        ThreadPoolExecutor(NUM_REQUESTS) as pool,
        grpc.insecure_channel(cluster.child("coordinator").address) as channel,
    ):
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        ids = {w.address: w.worker_id for w in client.list_workers()}
        decode, prefill = (
            ids[cluster.child("decode-0").address],
            ids[cluster.child("prefill-0").address],
        )

        def wave() -> list[list[int]]:
            futures = [
                pool.submit(client.complete, p, temperature=0.0, max_tokens=MAX_TOKENS,
                            ignore_eos=True, timeout_s=200)
                for p in prompts
            ]  # fmt: skip
            return [list(f.result().token_ids) for f in futures]

        # Before any load: nothing moves.
        assert migrations(stub) == []
        outputs, waves_after_active = [], 0
        while waves_after_active < 2:  # the burst lasts until 2 waves ran with layers moved
            assert len(outputs) < MAX_WAVES, f"no migration after {len(outputs)} waves"
            outputs.append(wave())
            live = [m for m in migrations(stub) if m.state == S.MIGRATION_STATE_ACTIVE]
            waves_after_active += 1 if live else 0
        during = migrations(stub)
        done = wait_for(
            lambda: (ms := migrations(stub)) and all(
                m.state in (S.MIGRATION_STATE_DONE, S.MIGRATION_STATE_ABORTED) for m in ms
            ) and ms,
            "the coordinator to take the layers back",
        )  # fmt: skip
        blocks = decode_pb2_grpc.DecodeServiceStub(
            grpc.insecure_channel(cluster.child("decode-0").address)
        )
        wait_for(
            lambda: blocks.Stats(decode_pb2.DecodeServiceStatsRequest()).kv.num_blocks_used == 0,
            "decode blocks freed",
        )
        watch = argparse.Namespace(
            coordinator=cluster.child("coordinator").address, router=cluster.router.address,
            watch=True, count=1, interval=1.0, live=False, migration_id=None, tls_dir="",
            api_token_file="",
        )  # fmt: skip
        capsys.readouterr()
        assert run_migrations(watch) == 0
        screen = capsys.readouterr().out.splitlines()
    assert all(out == expected for out in outputs)
    # Started by the coordinator alone (this test never calls StartMigration), the decode
    # worker's layers to the prefill worker; still ACTIVE when the burst ended, then reverted.
    assert [(m.donor, m.helper, m.end_layer) for m in during][-1:] == [(decode, prefill, 4)]
    assert during[-1].state == S.MIGRATION_STATE_ACTIVE
    assert [(m.state, m.reason) for m in done] == [(S.MIGRATION_STATE_DONE, "")] * len(done)
    assert [t.state for t in done[-1].timings] == [
        S.MIGRATION_STATE_PLANNED, S.MIGRATION_STATE_COPYING, S.MIGRATION_STATE_SWITCHING,
        S.MIGRATION_STATE_ACTIVE, S.MIGRATION_STATE_REVERTING, S.MIGRATION_STATE_DONE,
    ]  # fmt: skip
    assert [line.split()[:2] for line in screen[2:4]] == [[decode, "decode"], [prefill, "prefill"]]
    # Automatic mode: beside each worker's last report, the U its policy saw (session 44).
    assert all(float(line.split()[3]) >= 0 for line in screen[2:4]), screen
    assert screen[4:] == ["migrations: 0 live", *(f"  {format_row(m)}" for m in done)]
    print(
        f"{len(outputs)} waves, migrations: "
        + ", ".join(f"{m.migration_id} [{m.start_layer}, {m.end_layer})" for m in done)
    )
