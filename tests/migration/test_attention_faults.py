"""Faults of an attention migration over a real TCP data plane, both agents in one process.

- The helper dies (its data plane stops) while the owner's steps attend on it: the step fails
  whole and keeps nothing, the located sequences recompute on the owner, the owner's record is
  ABORTED with the reason; greedy output unchanged.
- The owner dies (no call reaches the helper any more): the helper frees the hosted blocks when
  the migration's lease runs out; they were in its load report until then.
- The owner preempts a located sequence: its blocks are released on the helper at once (the
  migration stays ACTIVE); the sequence recomputes on the owner, output unchanged.
- A revert that passed its state check when the helper died: UNAVAILABLE, the record ABORTED.
- The link to the helper stranded: the step fails within the keepalive, the record ABORTED at
  once after.
Each ends with no block held on either engine.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from services.common.errors import DependencyUnavailableError
from services.common.migration_states import MigrationState
from services.migration.attention_agent import AttentionSelection
from services.migration.records import Peer
from tests.coordinator.fakes import FakeClock
from tests.engine.coordinator import owner_engine, prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.engine.test_migration_invariant import WORKLOAD, params, plain_run
from tests.migration.harness import hold_first_engine_call
from tests.migration.test_attention_dataplane import AttentionPair

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    return plain_run(tiny_llama)


def drain(pair: AttentionPair, tokens: dict, workload=WORKLOAD, step: int = 0, until=None):
    """Step both engines (arrivals from ``workload``) until ``until(step)`` or all finished."""
    a = pair.a
    while (until is None or not until(step)) and (step <= 40 or a.has_unfinished_requests):
        for rid, prompt, max_tokens, arrival in workload:
            if arrival == step:
                a.add_request(rid, prompt, params(max_tokens))
        for out in pair.a_thread.step() + pair.b_thread.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    return step


def located(pair: AttentionPair, tokens: dict, until: int) -> int:
    """Steps to 8, moves the longest sequences to the helper (at least one), steps on to
    ``until``; the step reached."""
    step = drain(pair, tokens, until=lambda s: s == 8)
    pair.prepare()
    pair.copy()
    assert pair.switch() > 0
    return drain(pair, tokens, step=step, until=lambda s: s == until)


def test_helper_dies_located_sequences_recompute(tiny_llama, reference, loop):
    a, b = owner_engine(tiny_llama, False), make_engine(tiny_llama, num_kv_blocks=128)
    pair = AttentionPair(loop, a, b, AttentionSelection(max_sequences=3))
    tokens: dict[str, list[int]] = {}
    step = located(pair, tokens, until=12)
    assert a.placement.located
    loop.call(pair.helper._data_server.stop())
    failed_before = a.snapshot.num_failed_steps
    pair.a_thread.step()  # attends on the dead helper: fails whole, the located recompute
    loop.call(pair.donor.settled())
    assert a.snapshot.num_failed_steps == failed_before + 1
    assert not a.placement.located
    record = pair.donor.get(pair.mid)
    assert record.state is MigrationState.ABORTED, record.reason
    assert record.reason.startswith("helper unreachable"), record.reason
    drain(pair, tokens, step=step)
    assert tokens == {rid: reference[rid] for rid, *_ in WORKLOAD}
    assert b.migration.hosted_blocks.num_blocks > 0  # the "dead" helper never heard
    loop.call(pair.helper.abort(pair.mid, "its process is gone"))
    pair.close()
    assert_no_leaks(a)
    assert_no_leaks(b)
    assert b.migration.hosted_blocks.num_blocks == 0


def test_owner_dies_helper_frees_blocks_when_the_lease_runs_out(tiny_llama, reference, loop):
    clock = FakeClock()
    a, b = owner_engine(tiny_llama, False), make_engine(tiny_llama, num_kv_blocks=128)
    pair = AttentionPair(loop, a, b, AttentionSelection(max_sequences=2), clock=clock)
    tokens: dict[str, list[int]] = {}
    step = located(pair, tokens, until=10)
    view = pair.helper.attention.view_fields(pair.helper.get(pair.mid))
    hosted = b.migration.hosted_blocks.num_blocks
    assert hosted == view["num_blocks"] == b.snapshot.num_hosted_blocks > 0
    # The owner is gone: nothing reaches the helper. Its lease runs out.
    clock.advance(29.0)
    loop.call(pair.helper.check())
    assert b.migration.hosted_blocks.num_blocks == hosted  # not yet
    clock.advance(1.0)
    loop.call(pair.helper.check())
    record = pair.helper.get(pair.mid)
    assert (record.state, record.reason) == (
        MigrationState.ABORTED,
        "lease expired: no coordinator call",
    )
    pair.b_thread.step()
    assert b.migration.hosted_blocks.num_blocks == b.snapshot.num_hosted_blocks == 0
    assert_no_leaks(b)
    # (In-process the owner lives on: its own lease ends it too, its sequences recompute.)
    loop.call(pair.donor.check())
    assert pair.donor.get(pair.mid).state is MigrationState.ABORTED
    drain(pair, tokens, step=step)
    pair.close()
    assert tokens == {rid: reference[rid] for rid, *_ in WORKLOAD}
    assert_no_leaks(a)


def test_owner_preempting_a_located_sequence_releases_its_blocks(tiny_llama, loop):
    # Two sequences that outgrow A's 24 blocks together; the second (the scheduler's victim)
    # is the one located.
    workload = [("p0", prompt_ids(60, 40), 190, 0), ("p1", prompt_ids(60, 41), 180, 1)]
    expected = {
        rid: make_engine(tiny_llama).generate([prompt], params(n))[0].token_ids
        for rid, prompt, n, _ in workload
    }
    a, b = owner_engine(tiny_llama, False), make_engine(tiny_llama, num_kv_blocks=128)
    preempted: list[str] = []
    inner = a.scheduler.on_preempt
    a.scheduler.on_preempt = lambda seq: (preempted.append(seq.request_id), inner(seq))
    pair = AttentionPair(loop, a, b, AttentionSelection(request_ids=("p1",)))
    tokens: dict[str, list[int]] = {}
    step = drain(pair, tokens, workload, until=lambda s: s == 12)
    pair.prepare()
    pair.copy()
    assert pair.switch() == 1
    num_blocks = b.migration.hosted_blocks.num_blocks
    assert num_blocks == len(pair.donor.attention.moves[pair.mid].copied["p1"]) > 0
    port = pair.donor.attention.moves[pair.mid].port
    step = drain(pair, tokens, workload, step, until=lambda s: bool(preempted))
    assert preempted == ["p1"] and not a.placement.located
    assert a.snapshot.num_preemptions == a.stats()["num_preemptions"] == 1  # counted
    port.wait_released()
    pair.b_thread.step()
    assert b.migration.hosted_blocks.num_blocks == 0
    assert pair.donor.get(pair.mid).state is MigrationState.ACTIVE
    drain(pair, tokens, workload, step)
    pair.revert()  # nothing located any more: nothing comes back
    assert pair.events[-1] == "revert 0/0"
    pair.close()
    assert tokens == expected
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_a_revert_racing_the_fall_back_is_unavailable_and_the_record_stays_aborted(
    tiny_llama, reference, loop
):
    """The coordinator's Revert passes its state check (ACTIVE), then the helper dies and the
    donor's fall-back ends the migration ABORTED before the revert looks at the located
    sequences: the revert must fail UNAVAILABLE naming the lost helper and leave the record
    ABORTED (it went on to mark it REVERTING, and the coordinator then ended it DONE)."""
    a, b = owner_engine(tiny_llama, False), make_engine(tiny_llama, num_kv_blocks=128)
    pair = AttentionPair(loop, a, b, AttentionSelection(max_sequences=3))
    tokens: dict[str, list[int]] = {}
    step = located(pair, tokens, until=10)
    gate, parked = hold_first_engine_call(pair.donor)
    revert = asyncio.run_coroutine_threadsafe(pair.donor.revert(pair.mid), loop.loop)
    loop.call(parked.wait())  # the revert passed its state check
    loop.call(pair.helper._data_server.stop())  # the helper's process is gone
    pair.a_thread.step()  # fails through the port: the donor falls back on its own
    loop.call(pair.donor.settled())
    record = pair.donor.get(pair.mid)
    assert record.state is MigrationState.ABORTED, record.state
    loop.loop.call_soon_threadsafe(gate.set)
    with pytest.raises(DependencyUnavailableError, match=r"helper B at 127\.0\.0\.1:\d+ is lost"):
        revert.result(60)
    assert record.state is MigrationState.ABORTED
    assert record.reason.startswith("helper unreachable"), record.reason
    with pytest.raises(DependencyUnavailableError, match="it was lost"):  # and a later revert
        loop.call(pair.donor.revert(pair.mid))
    drain(pair, tokens, step=step)
    assert tokens == {rid: reference[rid] for rid, *_ in WORKLOAD}
    loop.call(pair.helper.abort(pair.mid, "its process is gone"))
    pair.close()
    pair.b_thread.step()
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_a_stranded_exchange_ends_the_migration_within_one_keepalive(tiny_llama, reference, loop):
    """The link to the helper dies without closing (a middlebox dropped it): the donor's step
    waits on its exchange until the blocking channel's keepalive gives up (2 s + 5 s), the
    located sequences recompute, and the fall-back ends the record ABORTED at once. Found by a
    probe: the fall-back then asked the helper over the agent's link — stranded too — to free
    the blocks, so the record read ACTIVE for a second keepalive period (~14 s in all)."""
    from tests.chaos.proxy import FaultProxy, Mode

    a, b = owner_engine(tiny_llama, False), make_engine(tiny_llama, num_kv_blocks=128)
    pair = AttentionPair(loop, a, b, AttentionSelection(max_sequences=3))
    proxy = FaultProxy("migration-data", lambda: pair.address)
    pair.helper_peer = Peer("B", "", proxy.start(), "tcp")  # the donor reaches B through it
    try:
        tokens: dict[str, list[int]] = {}
        step = located(pair, tokens, until=10)
        proxy.set(Mode.STRAND)
        started = time.monotonic()
        pair.a_thread.step()  # stalls on the exchange, then fails whole: the located recompute
        stalled = time.monotonic() - started
        loop.call(pair.donor.settled())
        ended = time.monotonic() - started
        record = pair.donor.get(pair.mid)
        assert record.state is MigrationState.ABORTED, record.state
        assert "stalled" in record.reason, record.reason
        assert 6.0 < stalled < 9.0, stalled  # the keepalive's 2 s + 5 s, not the 30 s timeout
        assert ended - stalled < 1.0, (stalled, ended)  # no second wait on the stranded link
        assert not a.placement.located
        drain(pair, tokens, step=step)
        assert tokens == {rid: reference[rid] for rid, *_ in WORKLOAD}
        loop.call(pair.helper.abort(pair.mid, "the coordinator's abort"))
        pair.b_thread.step()
        assert_no_leaks(a)
        assert_no_leaks(b)
    finally:
        pair.close()
        proxy.stop()
