"""The coordinator's state machine over fake workers: every transition, the exact worker calls
in their order, what each state costs, abort from every state, failures, leases."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from services.common.errors import (
    ConfigError,
    DependencyUnavailableError,
    InvalidRequestError,
    PreconditionError,
    ResourceExhaustedError,
)
from services.coordinator.core import CoordinatorConfig, MigrationNotFoundError
from services.coordinator.migration import MigrationState, TransitionError
from services.coordinator.ports import WorkerNotFoundError
from services.coordinator.store import RedisMigrationStore
from tests.coordinator.factories import CONFIG, coordinator
from tests.coordinator.fakes import (
    COPY_S,
    DELTA_BYTES,
    KV_BYTES,
    WEIGHT_BYTES,
    WEIGHTS_S,
    FakeClock,
    FakeCluster,
)

S = MigrationState
pytestmark = pytest.mark.timeout(60)
D, P = "decode-0", "prefill-0"
FORWARD = [
    f"{D} prepare donor",
    f"{P} prepare helper for [2, 3]",
    f"{D} copy to 127.0.0.1:9000",
    f"{D} copy to 127.0.0.1:9000",
    f"{D} switch micro-batches=2",
    f"{D} activate drop=False",
]
REVERT = [f"{D} revert", f"{D} release", f"{P} release"]


def states(m) -> list[S]:
    return [t.state for t in m.timings]


def run(redis_server, store_prefix, body, cluster=None, clock=None, **kw):
    cluster = cluster or FakeCluster()
    clock = clock or FakeClock()

    async def main():
        async with coordinator(redis_server.url, store_prefix, cluster, clock, **kw) as coord:
            await body(coord, cluster, clock)

    asyncio.run(main())
    return cluster


def test_forward_and_revert_in_order_with_bytes_and_times(redis_server, store_prefix):
    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 2)
        assert (m.migration_id, m.state, m.start_layer, m.end_layer) == ("m-1", S.PLANNED, 2, 4)
        assert cluster.calls == [f"{D} describe", f"{P} describe"]
        await coord.wait("m-1")
        assert m.state is S.ACTIVE
        assert cluster.steps() == FORWARD
        assert (m.weights_skipped, m.num_weight_bytes) == (True, 0)
        forward_kv = KV_BYTES + 2 * DELTA_BYTES  # the copy, its delta, the switch's delta
        assert (m.num_kv_bytes, m.num_sequences, m.switch_pause_s) == (forward_kv, 3, 0.004)
        assert m.helper_data_address == "127.0.0.1:9000"
        assert cluster.held() == {D: {"m-1"}, P: {"m-1"}}
        clock.advance(30.0)
        await coord.revert("m-1")
        assert m.state is S.REVERTING
        await coord.wait("m-1")
        assert m.state is S.DONE and m.reason == ""
        assert cluster.steps()[len(FORWARD) :] == REVERT
        assert m.num_kv_bytes == 2 * forward_kv
        assert states(m) == [S.PLANNED, S.COPYING, S.SWITCHING, S.ACTIVE, S.REVERTING, S.DONE]
        assert [t.duration(clock()) for t in m.timings] == [0.0, 0.0, 0.0, 30.0, 0.0, 0.0]
        assert coord.list(live_only=True) == [] and cluster.held() == {D: set(), P: set()}

    run(redis_server, store_prefix, body)


def test_a_helper_without_identical_weights_gets_them_shipped_first(redis_server, store_prefix):
    cluster = FakeCluster(D, P)
    cluster.ports[P].digest = b"\x02"  # a worker started to host layers only

    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 1, 4, num_micro_batches=1, drop_weights=True)
        await coord.wait(m.migration_id)
        assert (m.state, m.reason) == (S.ACTIVE, "")
        assert cluster.steps()[:3] == [
            f"{D} prepare donor",
            f"{P} prepare helper for [1, 2, 3]",
            f"{D} copy weights of [1, 2, 3] to 127.0.0.1:9000",
        ]
        assert cluster.steps()[3:] == FORWARD[2:4] + [
            f"{D} switch micro-batches=1",
            f"{D} activate drop=True",
        ]
        # the time split the record carries: weights, KV copied before the switch, the switch
        assert (m.weights_skipped, m.num_weight_bytes, m.weights_s) == (
            False,
            3 * WEIGHT_BYTES,
            WEIGHTS_S,
        )
        assert (m.num_copy_kv_bytes, m.kv_copy_s) == (KV_BYTES + DELTA_BYTES, 2 * COPY_S)
        assert (m.num_switch_kv_bytes, m.switch_pause_s) == (DELTA_BYTES, 0.004)
        assert m.num_kv_bytes == KV_BYTES + 2 * DELTA_BYTES
        assert cluster.held() == {D: {"m-1"}, P: {"m-1"}}

    run(redis_server, store_prefix, body, cluster)


def test_micro_batches_and_dropping_reach_the_donor(redis_server, store_prefix):
    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 3, num_micro_batches=1, drop_weights=True)
        await coord.wait(m.migration_id)
        assert cluster.steps()[-2:] == [f"{D} switch micro-batches=1", f"{D} activate drop=True"]

    run(redis_server, store_prefix, body)


# state -> (the step held so that the migration sits in it, the steps made before the abort)
ABORT_FROM = {
    S.PLANNED: (None, []),
    S.COPYING: ((P, "prepare helper for [2, 3]"), FORWARD[:2]),
    S.SWITCHING: ((D, "switch micro-batches=2"), FORWARD[:5]),
    S.ACTIVE: (None, FORWARD),
    S.REVERTING: ((D, "revert"), [*FORWARD, f"{D} revert"]),
}


@pytest.mark.parametrize("state", list(ABORT_FROM), ids=lambda s: s.name)
def test_abort_from_each_state_undoes_donor_then_helper(redis_server, store_prefix, state):
    held_step, before = ABORT_FROM[state]
    cluster = FakeCluster()
    hold = cluster.hold(*held_step) if held_step else None

    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 2)
        if state is S.REVERTING:
            await coord.wait("m-1")
            await coord.revert("m-1")
        if hold is not None:
            await hold.entered.wait()
        elif state is S.ACTIVE:
            await coord.wait("m-1")
        assert m.state is state
        await coord.abort("m-1", "operator says so")
        assert m.state is S.ABORTED and m.reason == "operator says so"
        assert cluster.steps() == [*before, f"{D} abort", f"{P} abort"]
        assert states(m)[-2:] == [state, S.ABORTED]
        assert cluster.held() == {D: set(), P: set()}
        with pytest.raises(PreconditionError, match="already ABORTED"):
            await coord.abort("m-1")
        with pytest.raises(PreconditionError, match="only an ACTIVE migration reverts"):
            await coord.revert("m-1")

    run(redis_server, store_prefix, body, cluster)


def test_an_abort_counts_the_sequences_the_donor_sent_back_to_recompute(redis_server, store_prefix):
    """Probe, session 40: an ACTIVE attention migration aborted with sequences located read
    "0 recomputed", though the donor recomputed each of them. The donor's abort answers how
    many its end sent back (the helper's answer is not counted), and the record adds them."""

    async def body(coord, cluster, clock):
        m = await coord.start_attention(D, P, max_sequences=4)
        await coord.wait("m-1")
        assert m.num_requeued == 0
        cluster.ports[D].requeued_at_end, cluster.ports[P].requeued_at_end = 3, 7
        await coord.abort("m-1", "operator says so")
        assert (m.state, m.num_requeued, m.num_requeued_at_end) == (S.ABORTED, 3, 3)
        (stored,) = await coord._store.load_all()
        assert (stored.num_requeued, stored.num_requeued_at_end) == (3, 3)

    run(redis_server, store_prefix, body)


def test_a_failed_step_aborts_with_its_reason(redis_server, store_prefix):
    cluster = FakeCluster()
    cluster.fail(D, "switch micro-batches=2", ResourceExhaustedError("no room for the delta"))

    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 2)
        await coord.wait("m-1")
        assert m.state is S.ABORTED
        assert (
            m.reason == "switch on decode-0 failed: ResourceExhaustedError: no room for the delta"
        )
        assert cluster.steps() == [*FORWARD[:5], f"{D} abort", f"{P} abort"]
        assert cluster.held() == {D: set(), P: set()}

    run(redis_server, store_prefix, body, cluster)


@pytest.mark.parametrize(
    ("rounds", "converged", "copies"),
    [
        (2, KV_BYTES, 1),  # the first round moved little: the switch copies the rest
        (3, DELTA_BYTES - 1, 3),  # never converged: every round
        (3, DELTA_BYTES, 2),  # the first delta is small enough
    ],
)
def test_copy_rounds_end_once_one_moved_little(
    redis_server, store_prefix, rounds, converged, copies
):
    """Every round waits for the donor's step in flight (seconds on a loaded prefill
    worker, whose rounds move nothing): a round that moved at most ``copy_converged_bytes``
    is the last."""
    config = replace(CONFIG, copy_rounds=rounds, copy_converged_bytes=converged)

    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 2)
        await coord.wait("m-1")
        assert m.state is S.ACTIVE
        assert cluster.steps() == FORWARD[:2] + FORWARD[2:3] * copies + FORWARD[4:]
        assert m.num_copy_kv_bytes == KV_BYTES + (copies - 1) * DELTA_BYTES

    run(redis_server, store_prefix, body, config=config)


def test_the_convergence_bound_is_a_flag_and_a_negative_one_is_refused():
    from services.coordinator.__main__ import coordinator_config, parse_args

    assert coordinator_config(parse_args([])).copy_converged_bytes == 16 << 20
    config = coordinator_config(parse_args(["--copy-converged-bytes", "0"]))
    assert config.copy_converged_bytes == 0
    with pytest.raises(ConfigError, match="copy_converged_bytes must be >= 0"):
        CoordinatorConfig(copy_converged_bytes=-1)


def test_a_step_past_its_timeout_aborts(redis_server, store_prefix):
    cluster = FakeCluster()
    cluster.hold(P, "prepare helper for [3]")  # never released
    config = CoordinatorConfig(lease_s=10.0, renew_interval_s=2.0, step_timeout_s=0.05)

    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 3)
        await coord.wait("m-1")
        assert m.state is S.ABORTED
        assert m.reason == "prepare on prefill-0 failed: TimeoutError: timed out"
        assert cluster.steps() == [
            f"{D} prepare donor",
            f"{P} prepare helper for [3]",
            f"{D} abort",
            f"{P} abort",
        ]

    run(redis_server, store_prefix, body, cluster, config=config)


def test_a_start_against_a_frozen_or_failing_worker_names_it(redis_server, store_prefix):
    """Probe, session 42: a start against a frozen worker failed after 4-6 s with
    ``UNAVAILABLE: UNAVAILABLE: Stream removed (ping timeout)``, naming no worker."""
    cluster = FakeCluster()
    cluster.hold(P, "describe")  # frozen: never answers
    config = CoordinatorConfig(lease_s=10.0, renew_interval_s=2.0, step_timeout_s=0.05)

    async def body(coord, cluster, clock):
        with pytest.raises(
            DependencyUnavailableError,
            match=rf"^{P} did not answer within 0.05s when asked for its model$",
        ):
            await coord.start_layers(D, P, 3)
        cluster.holds.clear()
        cluster.failures[(P, "describe")] = DependencyUnavailableError(
            "UNAVAILABLE: Stream removed (ping timeout)"
        )
        with pytest.raises(
            DependencyUnavailableError,
            match=rf"^cannot read {P}'s model: Stream removed \(ping timeout\)$",
        ):
            await coord.start_attention(D, P)
        assert coord.list() == []

    run(redis_server, store_prefix, body, cluster, config=config)


BAD_STARTS = [
    ((D, D, 2), InvalidRequestError, "same worker"),
    ((D, "", 2), InvalidRequestError, "needs a donor and a helper"),
    ((D, P, 0), InvalidRequestError, "start layer must be >= 1"),
    ((D, P, 3, 3), InvalidRequestError, r"empty layer range \[3, 3\)"),
    ((D, P, 2, 5), InvalidRequestError, r"\[2, 5\): only \[k, 4\) with 1 <= k < 4 move"),
    ((D, P, 1, 3), InvalidRequestError, r"\[1, 3\): only \[k, 4\)"),
    ((D, P, 4), InvalidRequestError, r"\[4, 4\): only"),
    ((D, P, 2, None, 9), InvalidRequestError, "micro-batches must be in \\[1, 8\\], got 9"),
    ((D, "decode-9", 2), WorkerNotFoundError, "no worker 'decode-9'"),
    ((D, "x" * 20_000, 2), InvalidRequestError, "helper is 20000 characters long; at most 128"),
    (("a b", P, 2), InvalidRequestError, "donor 'a b' must be printable ASCII without spaces"),
]


@pytest.mark.parametrize(("args", "error", "match"), BAD_STARTS)
def test_bad_starts_fail_before_any_work(redis_server, store_prefix, args, error, match):
    async def body(coord, cluster, clock):
        with pytest.raises(error, match=match):
            await coord.start_layers(*args)
        assert cluster.steps() == [] and coord.list() == []

    run(redis_server, store_prefix, body)


def test_one_migration_per_worker_and_same_models(redis_server, store_prefix):
    cluster = FakeCluster(D, P, "decode-1", "prefill-1")
    cluster.ports["prefill-1"].num_layers = 6

    async def body(coord, cluster, clock):
        await coord.start_layers(D, P, 2)
        for donor, helper in ((P, "decode-1"), ("decode-1", D)):
            with pytest.raises(PreconditionError, match="already takes part in m-1"):
                await coord.start_layers(donor, helper, 2)
        with pytest.raises(PreconditionError, match="different models"):
            await coord.start_layers("decode-1", "prefill-1", 2)
        with pytest.raises(PreconditionError, match="only an ACTIVE migration reverts"):
            await coord.revert("m-1")  # PLANNED: abort it instead
        with pytest.raises(MigrationNotFoundError):
            coord.describe("m-7")
        await coord.wait("m-1")
        assert [m.migration_id for m in coord.list()] == ["m-1"]
        await coord.abort("m-1")

    run(redis_server, store_prefix, body, cluster)


def test_concurrent_starts_on_one_worker_accept_exactly_one(redis_server, store_prefix, caplog):
    """Every start checks its workers are free, then awaits its id from Redis: without holding
    the table meanwhile, starts sent together all passed the check and went ACTIVE on one
    worker (a black-box probe saw 2-4 of 20), and the ids they got out of order read as Redis
    having lost its ids."""

    async def body(coord, cluster, clock):
        starts = [coord.start_layers(D, P, k) for k in (1, 2, 3)]
        starts += [coord.start_layers(P, D, k) for k in (1, 2, 3)]
        starts += [coord.start_attention(D, P), coord.start_attention(P, D)]
        results = await asyncio.gather(*starts, return_exceptions=True)
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1 and won[0].migration_id == "m-1"
        assert all(isinstance(e, PreconditionError) for e in lost), lost
        assert all("already takes part in m-1" in str(e) for e in lost)
        await coord.wait("m-1")
        await coord.abort("m-1")
        assert [m.migration_id for m in coord.list()] == ["m-1"]

    with caplog.at_level("WARNING", logger="services.coordinator.core"):
        run(redis_server, store_prefix, body)
    assert "start over" not in caplog.text


def test_attention_request_ids_are_checked_before_any_work(redis_server, store_prefix):
    async def body(coord, cluster, clock):
        for ids, match in [
            (("a b",), r"request_ids\[0\] 'a b' must be printable ASCII"),
            (("r-1", ""), r"request_ids\[1\] is empty"),
            (("r-1", "r-2", "r-1"), "request_ids names 'r-1' twice"),
            (tuple(f"r-{i}" for i in range(1025)), "1025 request_ids; at most 1024"),
        ]:
            with pytest.raises(InvalidRequestError, match=match):
                await coord.start_attention(D, P, ids)
        assert cluster.steps() == [] and coord.list() == []

    run(redis_server, store_prefix, body)


def test_a_long_failure_reason_is_cut_for_the_record(redis_server, store_prefix):
    cluster = FakeCluster()
    cluster.fail(D, "switch micro-batches=2", ResourceExhaustedError("no room " * 2000))

    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 2)
        await coord.wait("m-1")
        assert m.state is S.ABORTED
        assert m.reason.startswith("switch on decode-0 failed: ResourceExhaustedError: no room")
        assert len(m.reason.encode()) <= 1024 and m.reason.endswith("...")

    run(redis_server, store_prefix, body, cluster)


def test_totals_keep_what_forgotten_migrations_moved_and_spent(redis_server, store_prefix):
    """The coordinator's byte and state-second counters were recomputed from its table, which
    ``keep_ended`` bounds: with ``--keep-ended 1`` the second ended migration took the first's
    bytes with it (KV bytes 12,191,744 -> 0; probe, session 44). ``totals`` keeps them."""
    config = replace(CONFIG, keep_ended=1)

    async def body(coord, cluster, clock):
        seen, moved = [], 0
        for i in range(1, 4):
            m = await coord.start_layers(D, P, 2)
            await coord.wait(f"m-{i}")
            await coord.revert(f"m-{i}")
            await coord.wait(f"m-{i}")
            moved += m.num_kv_bytes
            await asyncio.sleep(0)  # the trim after a revert runs in the background
            seen.append(coord.totals())
        assert [m.migration_id for m in coord.list()] == ["m-3"]  # m-1, m-2 forgotten
        num_bytes, seconds = seen[-1]
        assert moved > 0 and num_bytes == {("layers", "kv"): moved, ("layers", "weights"): 0}
        for before, after in zip(seen, seen[1:], strict=False):
            for totals_before, totals_after in zip(before, after, strict=True):
                assert all(totals_after[k] >= v for k, v in totals_before.items())
        assert seconds[("layers", "active")] >= 0 and ("layers", "copying") in seconds

    run(redis_server, store_prefix, body, config=config)


def test_ended_migrations_past_keep_ended_are_forgotten_here_and_in_redis(
    redis_server, store_prefix
):
    """Records were never trimmed: ListMigrations grew with every migration until it passed
    the 4 MiB message (a probe counted ~14,000 at ~300 B a record). The newest ``keep_ended``
    ended ones are kept, live ones always, and a restarted coordinator trims what it loads."""
    config = replace(CONFIG, keep_ended=2)

    async def body(coord, cluster, clock):
        for i in range(1, 5):
            await coord.start_layers(D, P, 2)
            await coord.wait(f"m-{i}")
            await (coord.revert if i % 2 else coord.abort)(f"m-{i}")
            await coord.wait(f"m-{i}")
        await coord.start_layers(D, P, 2)  # m-5, live
        await coord.wait("m-5")
        await asyncio.sleep(0)  # the trim after m-3's revert runs in the background
        assert [m.migration_id for m in coord.list()] == ["m-3", "m-4", "m-5"]
        with pytest.raises(MigrationNotFoundError):
            coord.describe("m-1")
        store = RedisMigrationStore.from_url(redis_server.url, store_prefix)
        try:
            assert [m.migration_id for m in await store.load_all()] == ["m-3", "m-4", "m-5"]
        finally:
            await store.close()
        await coord.abort("m-5")
        assert [m.migration_id for m in coord.list()] == ["m-4", "m-5"]

    async def restarted(coord, cluster, clock):
        assert [m.migration_id for m in coord.list()] == ["m-5"]

    run(redis_server, store_prefix, body, config=config)
    run(redis_server, store_prefix, restarted, config=replace(CONFIG, keep_ended=1))
    with pytest.raises(ConfigError, match="keep_ended must be >= 1"):
        CoordinatorConfig(keep_ended=0)


def test_leases_are_renewed_and_a_lost_worker_aborts(redis_server, store_prefix):
    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 2)
        await coord.wait("m-1")
        await coord.renew_leases()
        assert cluster.ports[D].renewals == [("m-1", 10.0)] == cluster.ports[P].renewals
        cluster.ports[P].unreachable = True
        clock.advance(9.0)  # under a lease since the last renewal: keep trying
        await coord.renew_leases()
        assert m.state is S.ACTIVE
        clock.advance(1.0)
        await coord.renew_leases()
        await asyncio.gather(*coord._background)
        assert m.state is S.ABORTED
        assert m.reason.startswith("no lease renewal reached prefill-0 for 10.0 s")
        assert cluster.held()[D] == set()

    run(redis_server, store_prefix, body)


def test_a_refilling_attention_migrations_record_follows_what_its_donor_moved(
    redis_server, store_prefix
):
    """Probe, session 42: a refilled attention migration's record counted its staged copies'
    bytes and sequences only; the refills happen on the donor, while ACTIVE. Its record now
    follows what the donor's renewals (while ACTIVE) and its revert say it moved, each refill
    counted once, and keeps it in the store."""

    async def body(coord, cluster, clock):
        m = await coord.start_attention(D, P, max_sequences=2, refill=True)
        await coord.wait("m-1")
        copied, total = m.num_copy_kv_bytes, m.num_kv_bytes
        assert (copied, m.num_sequences) == (KV_BYTES + DELTA_BYTES, 3)
        donor = cluster.ports[D]
        donor.moved["m-1"] = (True, copied + 1000, 5)  # two more sequences refilled
        for _ in range(2):  # the same word twice counts once
            await coord.renew_leases()
            assert (m.num_kv_bytes, m.num_refill_kv_bytes, m.num_sequences) == (
                total + 1000, 1000, 5
            )  # fmt: skip
        donor.moved["m-1"] = (False, copied + 9000, 9)  # not ACTIVE: a copy may be in flight
        await coord.renew_leases()
        assert (m.num_kv_bytes, m.num_sequences) == (total + 1000, 5)
        donor.moved["m-1"] = (True, copied + 1500, 6)  # one more since the last renewal
        await coord.revert("m-1")
        await coord.wait("m-1")
        assert m.state is S.DONE
        back = KV_BYTES + 2 * DELTA_BYTES
        assert (m.num_kv_bytes, m.num_refill_kv_bytes, m.num_sequences) == (
            total + 1500 + back, 1500, 6
        )  # fmt: skip
        (stored,) = await coord._store.load_all()
        assert (stored.num_kv_bytes, stored.num_refill_kv_bytes) == (total + 1500 + back, 1500)

    run(redis_server, store_prefix, body)


def test_a_worker_that_lost_the_lease_aborts_the_migration(redis_server, store_prefix):
    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 2)
        await coord.wait("m-1")
        cluster.ports[P].held.clear()  # the helper restarted
        await coord.renew_leases()
        await asyncio.gather(*coord._background)
        assert m.state is S.ABORTED
        assert m.reason == (
            "prefill-0 no longer holds the migration (its lease ran out, or it restarted)"
        )

    run(redis_server, store_prefix, body)


@pytest.mark.parametrize("stopping", [D, P])
def test_a_stopping_worker_has_its_active_migration_reverted_at_the_next_renewal(
    redis_server, store_prefix, stopping
):
    """Either side answering the renewal that it drains: reverted cleanly (DONE, no reason),
    every step of a revert in order, nothing held; a second renewal meanwhile starts nothing."""

    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 2)
        await coord.wait("m-1")
        cluster.ports[stopping].draining = True
        await coord.renew_leases()
        await coord.renew_leases()
        await asyncio.gather(*coord._background)
        await coord.wait("m-1")
        assert (m.state, m.reason) == (S.DONE, "")
        assert cluster.steps() == FORWARD + REVERT
        assert cluster.held() == {D: set(), P: set()}

    run(redis_server, store_prefix, body)


def test_a_stopping_worker_has_a_migration_not_yet_active_aborted(redis_server, store_prefix):
    cluster = FakeCluster()
    hold = cluster.hold(D, "copy to 127.0.0.1:9000")

    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 2)
        await hold.entered.wait()
        assert m.state is S.COPYING
        cluster.ports[P].draining = True
        await coord.renew_leases()
        await asyncio.gather(*coord._background)
        assert (m.state, m.reason) == (S.ABORTED, "prefill-0 is stopping")
        assert cluster.held() == {D: set(), P: set()}

    run(redis_server, store_prefix, body, cluster=cluster)


def test_a_stopping_coordinator_reverts_the_migrations_of_stopping_workers_first(
    redis_server, store_prefix
):
    """A cluster torn down at once: the coordinator's drain ends the migration whose helper
    answers it is stopping, and returns once it is DONE; one whose workers stay up is kept
    ACTIVE for the next coordinator."""
    cluster = FakeCluster(D, P, "decode-1", "prefill-1")

    async def body(coord, cluster, clock):
        stopping = await coord.start_layers(D, P, 2)
        kept = await coord.start_layers("decode-1", "prefill-1", 2)
        await coord.wait(stopping.migration_id)
        await coord.wait(kept.migration_id)
        cluster.ports[P].draining = True
        await coord.drain(10.0)
        assert (stopping.state, kept.state) == (S.DONE, S.ACTIVE)
        await coord.drain(10.0)  # nothing stopping: returns after the settle, keeps it
        assert kept.state is S.ACTIVE

    run(redis_server, store_prefix, body, cluster=cluster)


def test_a_draining_coordinator_sees_a_worker_that_starts_stopping_a_moment_later(
    redis_server, store_prefix
):
    """Coordinator and workers sent SIGTERM together: the helper handles its signal after the
    coordinator's first renewal reached it. The drain kept asking for DRAIN_SETTLE_S and so
    still reverts (session 38's CI: it had asked once, stopped at once, and the leases ended
    the migration 10 s later)."""
    from services.coordinator.core import DRAIN_SETTLE_S

    cluster = FakeCluster(D, P)

    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 2)
        await coord.wait(m.migration_id)
        drain = asyncio.ensure_future(coord.drain(10.0))
        await asyncio.sleep(DRAIN_SETTLE_S / 4)
        assert m.state is S.ACTIVE and not drain.done()
        cluster.ports[P].draining = True
        await drain
        assert m.state is S.DONE

    run(redis_server, store_prefix, body, cluster=cluster)


def test_the_table_refuses_skipping_states():
    from services.coordinator.migration import Migration, MigrationKind

    m = Migration("m-1", MigrationKind.LAYERS, D, P, 2, 4, created_at=0.0)
    with pytest.raises(TransitionError, match="PLANNED -> ACTIVE"):
        m.enter(S.ACTIVE, 1.0)
    m.enter(S.ABORTED, 1.0)
    with pytest.raises(TransitionError, match="ABORTED -> COPYING"):
        m.enter(S.COPYING, 2.0)


def test_after_redis_comes_back_empty_ids_go_on_and_records_are_written_back(
    redis_server, store_prefix
):
    """Redis restarted empty under a running coordinator: its counter starts over, yet the next
    migration is m-3, not a second m-1 replacing the one held, and m-1 and m-2 are in Redis
    again (a restarted coordinator would find them)."""
    cluster = FakeCluster(D, P, "decode-1", "prefill-1")

    async def body(coord, cluster, clock):
        first = await coord.start_layers(D, P, 2)
        await coord.wait("m-1")
        await coord.revert("m-1")
        await coord.wait("m-1")
        second = await coord.start_layers(D, P, 3)
        await coord.wait("m-2")
        client = aioredis.Redis.from_url(redis_server.url)
        await client.delete(*[k async for k in client.scan_iter(match=f"{store_prefix}:*")])
        await client.aclose()
        third = await coord.start_layers("decode-1", "prefill-1", 2)
        await coord.wait(third.migration_id)
        assert third.migration_id == "m-3"
        assert {m.migration_id: m for m in coord.list()} == {
            "m-1": first, "m-2": second, "m-3": third,
        }  # fmt: skip
        assert [(m.state, m.start_layer) for m in coord.list()] == [
            (S.DONE, 2), (S.ACTIVE, 3), (S.ACTIVE, 2),
        ]  # fmt: skip
        store = RedisMigrationStore.from_url(redis_server.url, store_prefix)
        loaded = await store.load_all()
        assert [await store.next_id(), await store.next_id()] == ["m-4", "m-5"]
        await store.close()
        assert loaded == [first, second, third]

    run(redis_server, store_prefix, body, cluster)


async def until(predicate, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def test_a_start_whose_caller_is_cut_while_it_is_saved_still_runs(redis_server, store_prefix):
    # Session 40's probe: a StartMigration past its deadline between the registration and the
    # driver task left a PLANNED migration nothing moved on, refusing both workers for good.
    async def body(coord, cluster, clock):
        save, saving, saved = coord._driver.save, asyncio.Event(), asyncio.Event()

        async def slow_save(m):  # the first save (PLANNED) waits: the caller is cut then
            if not saved.is_set():
                saving.set()
                await saved.wait()
            await save(m)

        coord._driver.save = slow_save
        start = asyncio.create_task(coord.start_layers(D, P, 2))
        await saving.wait()
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        saved.set()
        m = await coord.wait("m-1")
        assert m.state is S.ACTIVE and cluster.steps() == FORWARD
        await coord.revert("m-1")
        assert (await coord.wait("m-1")).state is S.DONE
        assert (await coord.start_layers(D, P, 2)).migration_id == "m-2"  # both free again

    run(redis_server, store_prefix, body)


@pytest.mark.parametrize("command", ["abort", "revert"])
def test_an_abort_or_revert_whose_caller_is_cut_goes_on_to_its_end(
    redis_server, store_prefix, command
):
    # Session 40's probe: an abort cut after it had cancelled the step in flight left the
    # migration COPYING (or ACTIVE) with nothing to end it.
    cluster = FakeCluster()
    hold = cluster.hold(P, "prepare helper for [2, 3]") if command == "abort" else None

    async def body(coord, cluster, clock):
        m = await coord.start_layers(D, P, 2)
        if hold is not None:
            await hold.entered.wait()
            assert m.state is S.COPYING
        else:
            await coord.wait("m-1")
            assert m.state is S.ACTIVE
        call = asyncio.create_task(getattr(coord, command)("m-1"))
        await asyncio.sleep(0)  # it has begun: the step in flight cancelled, or REVERTING
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        ended = S.ABORTED if command == "abort" else S.DONE
        await until(lambda: m.state is ended)
        assert cluster.held() == {D: set(), P: set()}

    run(redis_server, store_prefix, body, cluster)
