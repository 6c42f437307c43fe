"""Random layer migrations under concurrent load, across processes (issue 10, "Show").

A real cluster (router, prefill worker, decode worker, coordinator, Redis: ``banaserve up
--coordinator``'s) serves greedy float32 requests of varied lengths, sent at seeded random
moments, while a seeded random driver starts layer migrations through the coordinator's gRPC
API (random ``k``, one or two micro-batches, weights dropped or not) and reverts or aborts each
at a random moment: during COPYING, SWITCHING or ACTIVE. Afterwards:

- every request's tokens equal the in-process engine's for the same requests;
- every migration ended DONE or ABORTED, a reverted one DONE unless a step refused it (its
  reason then names the step), an aborted one with the driver's reason or such a refusal;
- no KV block is used on either worker, every worker's view of every migration is DONE or
  ABORTED with nothing hosted, and the router's load reports show no hosted layers.

Directions: decode → prefill (a decode worker borrows the prefill worker's core) and
prefill → decode (a prefill donor: its prompts' KV for ``[k, L)`` is computed on the helper and
read back for the handoff). ``PREFILL_DONOR = False`` skips the second where workers cannot
donate from a prefill worker.

The default run is one short seeded case on tiny-llama; ``-m slow`` adds more seeds and
smollm2-135m.
"""

from __future__ import annotations

import functools
import json
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.client.client import BanaServeClient, GenerationResult
from services.common.types import SamplingParams
from services.launcher import ClusterSpec, LocalCluster
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import (
    coordinator_pb2_grpc,
    decode_pb2,
    decode_pb2_grpc,
    migration_pb2,
    migration_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests.clusters import running_cluster, wait_for
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import make_engine

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.cluster,
    pytest.mark.timeout(600),
]

# The prefill donor: a prefill worker lending its layers to a decode worker (docs/migration.md,
# "Requests that arrive while switched, and a prefill donor").
PREFILL_DONOR = True
TERMINAL = (pb.MIGRATION_STATE_DONE, pb.MIGRATION_STATE_ABORTED)
SETTLED = (pb.MIGRATION_STATE_ACTIVE, *TERMINAL)
ABORT_REASON = "random abort"
LIVE_VIEW_STATES = frozenset(
    (migration_pb2.MIGRATION_WORKER_STATE_DONE, migration_pb2.MIGRATION_WORKER_STATE_ABORTED)
)


@dataclass(frozen=True)
class Case:
    """One seeded run: the load and how many migrations the driver makes."""

    seed: int
    num_requests: int
    num_migrations: int
    prompt_len: tuple[int, int]
    max_tokens: tuple[int, int]
    # Requests are sent within [0, send_within_s) of the first migration's start.
    send_within_s: float


@dataclass(frozen=True)
class Move:
    """One random migration: ``[k, L)`` moves; after ``delay_s`` it is aborted wherever it is,
    or (``revert``) reverted once ACTIVE."""

    k: int
    num_micro_batches: int
    drop_weights: bool
    revert: bool
    delay_s: float
    pause_after_s: float


@dataclass(frozen=True)
class Load:
    prompts: list[list[int]]
    max_tokens: list[int]
    send_at_s: list[float]


def moves(rng: random.Random, num_layers: int, count: int) -> list[Move]:
    """``count`` random migrations, half of them reverted (in a random order)."""
    reverts = [i % 2 == 0 for i in range(count)]
    rng.shuffle(reverts)
    return [
        Move(
            k=rng.randrange(1, num_layers),
            num_micro_batches=rng.choice((1, 2)),
            drop_weights=rng.random() < 0.3,
            revert=revert,
            delay_s=rng.choice((0.0, rng.uniform(0.0, 0.3), rng.uniform(0.3, 1.5))),
            pause_after_s=rng.uniform(0.0, 0.3),
        )
        for revert in reverts
    ]


def load(rng: random.Random, case: Case) -> Load:
    n = case.num_requests
    return Load(
        prompts=[
            prompt_ids(rng.randint(*case.prompt_len), rng.randrange(1 << 30)) for _ in range(n)
        ],
        max_tokens=[rng.randint(*case.max_tokens) for _ in range(n)],
        send_at_s=sorted(rng.uniform(0.0, case.send_within_s) for _ in range(n)),
    )


@functools.cache
def expected_tokens(model: Path, case: Case) -> list[list[int]]:
    """The in-process engine's tokens for ``case``'s requests (once per case: both directions
    send the same)."""
    work = load(random.Random(case.seed), case)
    params = [
        SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in work.max_tokens
    ]
    return [c.token_ids for c in make_engine(model).generate(work.prompts, params)]


class Driver:
    """The coordinator's API, one random migration at a time."""

    def __init__(self, channel: grpc.Channel, donor: str, helper: str) -> None:
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        self.donor, self.helper = donor, helper

    def describe(self, mid: str) -> pb.Migration:
        request = pb.DescribeMigrationRequest(migration_id=mid)
        return self.stub.DescribeMigration(request, timeout=10).migration

    def until(self, mid: str, states: tuple[int, ...], what: str) -> pb.Migration:
        return wait_for(
            lambda: (m := self.describe(mid)).state in states and m, f"{mid} {what}", 120
        )

    def run(self, move: Move) -> tuple[Move, pb.Migration]:
        spec = pb.LayerMigrationSpec(
            donor=self.donor, helper=self.helper, start_layer=move.k,
            num_micro_batches=move.num_micro_batches, drop_weights=move.drop_weights,
        )  # fmt: skip
        request = pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_LAYERS, layers=spec)
        mid = self.stub.StartMigration(request, timeout=30).migration.migration_id
        if move.revert:
            self.until(mid, SETTLED, "to settle")
        time.sleep(move.delay_s)  # the random moment, not a synchronisation
        try:
            if move.revert:
                self.stub.RevertMigration(pb.RevertMigrationRequest(migration_id=mid), timeout=30)
            else:
                abort = pb.AbortMigrationRequest(migration_id=mid, reason=ABORT_REASON)
                self.stub.AbortMigration(abort, timeout=60)
        except grpc.RpcError as exc:  # it ended by itself meanwhile (a refused step)
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
        ended = self.until(mid, TERMINAL, "to end")
        time.sleep(move.pause_after_s)
        return move, ended


def send_all(
    client: BanaServeClient, pool: ThreadPoolExecutor, work: Load, start: float
) -> list[Future[GenerationResult]]:
    def one(i: int) -> GenerationResult:
        time.sleep(max(0.0, start + work.send_at_s[i] - time.monotonic()))
        return client.complete(
            work.prompts[i], temperature=0.0, max_tokens=work.max_tokens[i], ignore_eos=True,
            timeout_s=300, request_id=f"r{i}",
        )  # fmt: skip

    return [pool.submit(one, i) for i in range(len(work.prompts))]


def check_migration(move: Move, m: pb.Migration) -> None:
    """DONE when reverted; ABORTED by the driver; or ABORTED by a step the workers refused."""
    refused = m.state == pb.MIGRATION_STATE_ABORTED and " failed: " in m.reason
    if move.revert:
        assert m.state == pb.MIGRATION_STATE_DONE or refused, (move, m)
    else:
        assert m.state == pb.MIGRATION_STATE_ABORTED, (move, m)
        assert m.reason == ABORT_REASON or refused, (move, m)
    assert m.end_layer > m.start_layer == move.k


def check_nothing_held(cluster: LocalCluster) -> None:
    decode, prefill = cluster.child("decode-0").address, cluster.child("prefill-0").address
    with grpc.insecure_channel(decode) as d_ch, grpc.insecure_channel(prefill) as p_ch:
        d_stats = decode_pb2_grpc.DecodeServiceStub(d_ch)
        p_stats = prefill_pb2_grpc.PrefillServiceStub(p_ch)
        wait_for(
            lambda: d_stats.Stats(decode_pb2.DecodeServiceStatsRequest()).kv.num_blocks_used == 0,
            "decode blocks freed",
        )
        wait_for(
            lambda: (
                (s := p_stats.Stats(prefill_pb2.PrefillServiceStatsRequest())).kv.num_blocks_used
                == s.num_open_transfers
                == 0
            ),
            "prefill blocks freed",
        )
        for ch in (d_ch, p_ch):
            stub = migration_pb2_grpc.MigrationWorkerServiceStub(ch)
            views = stub.List(migration_pb2.MigrationWorkerServiceListRequest()).migrations
            print([(v.migration_id, v.role, v.state, v.reason) for v in views])
            assert {v.state for v in views} <= LIVE_VIEW_STATES, views
            assert sum(v.num_hosted_sequences + v.num_hosted_blocks_used for v in views) == 0
    with grpc.insecure_channel(cluster.router.address) as r_ch:
        router = router_pb2_grpc.RouterServiceStub(r_ch)
        hosting = lambda: {  # noqa: E731
            w.info.worker_id: (w.last_load.num_hosted_layers, w.last_load.num_hosted_blocks)
            for w in router.ListWorkers(router_pb2.ListWorkersRequest()).workers
        }
        try:
            wait_for(lambda: set(hosting().values()) == {(0, 0)}, "reports without hosting", 20)
        except AssertionError:
            pytest.fail(f"(hosted layers, hosted blocks) in load reports: {hosting()}")


def wait_for_load(decode: str, num_running: int) -> None:
    """Until the decode worker runs ``num_running`` requests: migrations start under load."""
    with grpc.insecure_channel(decode) as d_ch:
        stats = decode_pb2_grpc.DecodeServiceStub(d_ch)
        wait_for(
            lambda: (
                stats.Stats(decode_pb2.DecodeServiceStatsRequest()).num_running_seqs >= num_running
            ),
            "load on the decode worker",
        )


def run_case(cluster: LocalCluster, model: Path, case: Case, donor_role: str) -> None:
    rng = random.Random(case.seed)
    work = load(rng, case)
    t0 = time.monotonic()
    expected = expected_tokens(model, case)
    helper_role = "prefill" if donor_role == "decode" else "decode"
    with (
        BanaServeClient(cluster.router.address) as client,
        ThreadPoolExecutor(case.num_requests) as pool,
        grpc.insecure_channel(cluster.child("coordinator").address) as channel,
    ):
        ids = {w.address: w.worker_id for w in client.list_workers()}
        donor, helper = (ids[cluster.child(f"{r}-0").address] for r in (donor_role, helper_role))
        plan = moves(rng, num_layers_of(model), case.num_migrations)
        driver = Driver(channel, donor, helper)
        futures = send_all(client, pool, work, time.monotonic())
        wait_for_load(cluster.child("decode-0").address, case.num_requests // 3)
        ended = [driver.run(move) for move in plan]
        results = [f.result() for f in futures]
    print(
        f"seed {case.seed} {donor_role}->{helper_role} ({time.monotonic() - t0:.1f} s): "
        + "; ".join(
            f"k={mv.k} mb={mv.num_micro_batches} drop={int(mv.drop_weights)} "
            f"{'revert' if mv.revert else 'abort'} -> {pb.MigrationState.Name(m.state)[16:]} "
            f"({len(m.timings)} states, {m.num_kv_bytes} B, {m.reason or 'ok'})"
            for mv, m in ended
        )
    )
    assert [list(r.token_ids) for r in results] == expected
    check_nothing_held(cluster)
    for move, m in ended:
        check_migration(move, m)


def num_layers_of(model: Path) -> int:
    return json.loads((model / "config.json").read_text())["num_hidden_layers"]


def cluster_spec(model: str, env: dict[str, str]) -> ClusterSpec:
    return ClusterSpec(
        model=model, num_kv_blocks=512, num_kvstore=0, kv_transport="tcp", coordinator=True,
        extra_env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_cluster(banaserve_home, tiny_llama, tmp_path_factory):
    spec = cluster_spec("tiny-llama", {"BANASERVE_HOME": str(banaserve_home)})
    with running_cluster(spec, tmp_path_factory.mktemp("logs") / "random.log") as cluster:
        yield cluster


DIRECTIONS = [
    pytest.param("decode", id="decode-to-prefill"),
    pytest.param(
        "prefill",
        id="prefill-to-decode",
        marks=pytest.mark.skipif(not PREFILL_DONOR, reason="no prefill donor yet"),
    ),
]
SHORT = Case(
    seed=1, num_requests=10, num_migrations=4, prompt_len=(8, 96), max_tokens=(200, 600),
    send_within_s=4.0,
)  # fmt: skip


@pytest.mark.parametrize("donor_role", DIRECTIONS)
def test_random_migrations_never_change_output(tiny_cluster, tiny_llama, donor_role):
    run_case(tiny_cluster, tiny_llama, SHORT, donor_role)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
@pytest.mark.parametrize("donor_role", DIRECTIONS)
def test_more_seeds(tiny_cluster, tiny_llama, donor_role, seed):
    case = Case(
        seed=seed, num_requests=12, num_migrations=8, prompt_len=(8, 160),
        max_tokens=(200, 700), send_within_s=6.0,
    )  # fmt: skip
    run_case(tiny_cluster, tiny_llama, case, donor_role)


@pytest.fixture(scope="module")
def smollm2_cluster(smollm2, tmp_path_factory):
    spec = cluster_spec("smollm2-135m", {})
    with running_cluster(spec, tmp_path_factory.mktemp("logs") / "smollm2.log") as cluster:
        yield cluster


@pytest.mark.slow
@pytest.mark.parametrize("donor_role", DIRECTIONS)
def test_random_migrations_on_smollm2(smollm2_cluster, smollm2, donor_role):
    case = Case(
        seed=5, num_requests=8, num_migrations=4, prompt_len=(16, 200), max_tokens=(60, 160),
        send_within_s=4.0,
    )  # fmt: skip
    run_case(smollm2_cluster, smollm2, case, donor_role)
