"""A helper that dies while the donor's steps run layers on it, over a real TCP data plane.

The helper's data-plane server stops mid-run (its process would be gone): the donor's next step
fails as a whole and keeps nothing. Layers still held by the donor: every request continues
there (those whose KV for the layers was on the helper recompute), greedy output unchanged.
Layers dropped: the requests of that step fail with a reason, the agent reloads the layers on
its own, and every other request finishes with unchanged output. Both end with nothing held.
"""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import DependencyUnavailableError
from services.common.migration_states import MigrationState
from services.engine.ports import StageFailedError
from tests.engine.coordinator import owner_engine
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.engine.test_migration_invariant import WORKLOAD, params, plain_run
from tests.migration.harness import MIGRATION, AgentPair, hold_first_engine_call


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    return plain_run(tiny_llama)


def run(model, loop, drop: bool, kill_at: int = 12, switch_at: int = 6, kill=None):
    a, b = owner_engine(model, drop), make_engine(model, num_kv_blocks=128)
    pair = AgentPair(loop, a, b)
    tokens: dict[str, list[int]] = {}
    failed: dict[str, str] = {}
    step = 0
    while step <= 40 or a.has_unfinished_requests:
        for rid, prompt, max_tokens, arrival in WORKLOAD:
            if arrival == step:
                a.add_request(rid, prompt, params(max_tokens))
        if step == switch_at:
            pair.prepare(2)
            pair.copy()
            pair.switch(1, drop)
        if step == kill_at:
            loop.call(kill(pair) if kill else pair.helper._data_server.stop())
        try:
            outs = pair.a_thread.step()
        except StageFailedError as e:
            failed.update(dict.fromkeys(e.request_ids, e.reason))
            loop.call(pair.donor.settled())  # the agent's fall-back: layers back here
            outs = []
        for out in outs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    record = pair.donor.get(MIGRATION)
    loop.call(pair.helper.abort(MIGRATION, "the donor gave up on it"))
    pair.close()
    b.step()
    assert_no_leaks(a)
    assert_no_leaks(b)
    assert not b.migration.hosted_layers
    assert a.migration.stage_layout.ranges == ((0, a.spec.num_layers, False),)
    assert a.snapshot.num_layers_held == a.spec.num_layers
    return tokens, failed, record


def test_helper_dies_layers_held_every_request_continues(tiny_llama, reference, loop):
    tokens, failed, record = run(tiny_llama, loop, drop=False)
    assert failed == {}
    assert tokens == {rid: reference[rid] for rid, *_ in WORKLOAD}
    assert record.state is MigrationState.ABORTED and record.reason.startswith("helper unreachable")


def test_helper_dies_layers_dropped_fails_that_steps_requests(tiny_llama, reference, loop):
    tokens, failed, record = run(tiny_llama, loop, drop=True)
    assert failed, "the step running on the dead helper fails its requests"
    assert all(r.startswith("helper unreachable") for r in failed.values()), failed
    survivors = {rid for rid, *_ in WORKLOAD} - set(failed)
    assert survivors
    for rid in survivors:
        assert tokens[rid] == reference[rid], rid
    for rid in failed:  # what they got before the failure is a prefix of the reference
        assert tokens.get(rid, []) == reference[rid][: len(tokens.get(rid, []))]
    assert record.state is MigrationState.ABORTED and not record.weights_dropped


def test_a_helper_that_no_longer_hosts_the_layers_is_named_as_refusing(tiny_llama, reference, loop):
    """The helper is up but holds nothing for the migration (it aborted it on its own: a lease
    that ran out, an operator's Abort): the donor falls back as for a lost helper, and its
    reason says the helper refused, with its answer, not that it was unreachable."""

    async def helper_aborts(pair):
        await pair.helper.abort(MIGRATION, "aborted on the helper")

    tokens, failed, record = run(tiny_llama, loop, drop=False, kill=helper_aborts)
    assert failed == {}
    assert tokens == {rid: reference[rid] for rid, *_ in WORKLOAD}
    assert record.state is MigrationState.ABORTED
    assert record.reason.startswith("helper refused the work: NOT_FOUND: "), record.reason


def test_a_revert_racing_the_fall_back_is_unavailable_naming_the_helper(tiny_llama, loop):
    """The coordinator's Revert passes the state check (ACTIVE), then the donor's fall-back
    after the helper died disconnects and ends the migration before the revert reaches the
    helper: the revert must say the helper is lost (UNAVAILABLE), not "CopyKV first"."""
    a, b = make_engine(tiny_llama, num_kv_blocks=64), make_engine(tiny_llama, num_kv_blocks=128)
    pair = AgentPair(loop, a, b)
    for rid, prompt, max_tokens, _ in WORKLOAD[:3]:
        a.add_request(rid, prompt, params(max_tokens))
    for _ in range(3):
        pair.a_thread.step()
    pair.prepare(2)
    pair.copy()
    pair.switch(1, drop=False)
    pair.a_thread.step()  # a step through the helper
    gate, parked = hold_first_engine_call(pair.donor)
    revert = asyncio.run_coroutine_threadsafe(pair.donor.revert(MIGRATION), loop.loop)
    loop.call(parked.wait())  # the revert passed its state check
    loop.call(pair.helper._data_server.stop())  # the helper's process is gone
    pair.a_thread.step()  # fails through the port: the donor falls back on its own
    loop.call(pair.donor.settled())
    record = pair.donor.get(MIGRATION)
    assert record.state is MigrationState.ABORTED and record.link is None
    loop.loop.call_soon_threadsafe(gate.set)
    with pytest.raises(DependencyUnavailableError, match=r"helper B at 127\.0\.0\.1:\d+ is lost"):
        revert.result(60)
    assert record.state is MigrationState.ABORTED
    assert record.reason.startswith("helper unreachable"), record.reason
    while a.has_unfinished_requests:  # every request finishes on the donor alone
        a.step()
    loop.call(pair.helper.abort(MIGRATION, "the donor gave up on it"))
    pair.close()
    b.step()
    assert a.migration.stage_layout.ranges == ((0, a.spec.num_layers, False),)
    assert_no_leaks(a)
    assert_no_leaks(b)
