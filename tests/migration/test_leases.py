"""Leases and the agent's state rules: a lost coordinator never pins anything for ever.

The coordinator's calls stop after the switch; once the lease runs out (an injected clock) the
donor runs every layer itself again and the helper drops what it hosts, while requests keep
decoding with unchanged greedy output. Calls the state does not allow are refused and change
nothing; Release and Abort of an unknown id answer "not found" without error.
"""

from __future__ import annotations

import pytest

from services.common.errors import AlreadyExistsError, InvalidRequestError, ShuttingDownError
from services.common.migration_states import MigrationState
from services.migration.records import Peer, Role
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.engine.test_migration_invariant import plain_run
from tests.migration.harness import (
    MIGRATION,
    AgentPair,
    assert_unchanged_and_local,
    run_with_fault,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lost_coordinator_lease_expiry_ends_it_on_both_workers(tiny_llama, loop):
    reference = plain_run(tiny_llama)
    clock = Clock()
    a, b = make_engine(tiny_llama, num_kv_blocks=64), make_engine(tiny_llama, num_kv_blocks=128)
    pair = AgentPair(loop, a, b, clock=clock)

    def fault() -> None:
        clock.now += 29.0  # within the 30 s lease: nothing happens
        loop.call(pair.donor.check())
        loop.call(pair.helper.check())
        assert pair.donor.get(MIGRATION).state is MigrationState.SWITCHING
        clock.now += 1.0
        loop.call(pair.donor.check())
        loop.call(pair.helper.check())

    tokens = run_with_fault(pair, 14, fault)
    donor, helper = pair.donor.get(MIGRATION), pair.helper.get(MIGRATION)
    assert (donor.state, helper.state) == (MigrationState.ABORTED, MigrationState.ABORTED)
    assert donor.reason == helper.reason == "lease expired: no coordinator call"
    assert_unchanged_and_local(pair, tokens, reference)


def test_calls_out_of_order_are_refused_and_change_nothing(tiny_llama, loop):
    a, b = make_engine(tiny_llama, num_kv_blocks=32), make_engine(tiny_llama, num_kv_blocks=32)
    pair = AgentPair(loop, a, b)
    with pytest.raises(InvalidRequestError, match="only \\[k, 4\\)"):
        loop.call(pair.donor.prepare("m-0", Role.DONOR, range(0, 4), Peer(), Peer(), None))
    with pytest.raises(InvalidRequestError, match="needs a donor in switching, active"):
        pair.prepare(2)
        loop.call(pair.donor.revert(MIGRATION))
    with pytest.raises(AlreadyExistsError):
        loop.call(pair.donor.prepare(MIGRATION, Role.DONOR, range(2, 4), Peer(), Peer(), None))
    with pytest.raises(InvalidRequestError, match="CopyKV first"):
        loop.call(pair.donor.switch(MIGRATION, 1, None))
    pair.copy()
    pair.switch(1, drop=False)
    with pytest.raises(InvalidRequestError, match="revert or abort it"):
        loop.call(pair.donor.release(MIGRATION))
    assert loop.call(pair.donor.abort("nope", "")) is None
    assert loop.call(pair.helper.release("nope")) is None
    records = pair.donor.get(MIGRATION), pair.helper.get(MIGRATION)
    assert pair.revert()
    assert [r.state for r in records] == [MigrationState.DONE, MigrationState.DONE]
    assert b.migration.hosted_layers == {}
    pair.close()
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_helper_without_the_weights_says_so_and_awaits_them(tiny_llama, loop):
    a, b = make_engine(tiny_llama, num_kv_blocks=32), make_engine(tiny_llama, num_kv_blocks=32)
    pair = AgentPair(loop, a, b)
    _, fp, digests, _ = loop.call(
        pair.donor.prepare(MIGRATION, Role.DONOR, range(2, 4), Peer(), Peer(), None)
    )
    assert sorted(digests) == [2, 3] and len(set(digests.values())) == 2
    record, _, mine, needed = loop.call(
        pair.helper.prepare(
            MIGRATION,
            Role.HELPER,
            range(2, 4),
            Peer(),
            Peer(),
            None,
            fp,
            {2: digests[2], 3: "0" * 32},
            16,
        )
    )
    assert mine == digests and needed == [3]
    # hosted, layer 2 its own, layer 3 awaited from the donor (tests/migration/test_weights.py)
    assert (record.state, record.reason) == (MigrationState.PLANNED, "")
    assert b.migration.hosted_layers[MIGRATION].stack.missing() == [3]
    loop.call(pair.helper.abort(MIGRATION, "test"))
    assert b.migration.hosted_layers == {}
    pair.close()


def test_a_draining_worker_holds_its_migrations_until_they_end_and_takes_no_new_one(
    tiny_llama, loop
):
    """What a worker's drain reads (``holds_migrations``) and what it refuses once it drains."""
    a, b = make_engine(tiny_llama, num_kv_blocks=32), make_engine(tiny_llama, num_kv_blocks=32)
    pair = AgentPair(loop, a, b)
    assert not pair.helper.holds_migrations()
    pair.prepare(2)
    pair.helper.begin_drain()
    assert pair.helper.draining and not pair.donor.draining
    assert pair.helper.holds_migrations() and pair.donor.holds_migrations()
    with pytest.raises(ShuttingDownError, match="stopping: it takes no new migration"):
        loop.call(pair.helper.prepare("m-9", Role.HELPER, range(2, 4), Peer(), Peer(), None))
    pair.copy()
    pair.switch(1, drop=False)
    assert pair.revert()
    assert not pair.helper.holds_migrations() and not pair.donor.holds_migrations()
    pair.close()
    assert_no_leaks(a)
    assert_no_leaks(b)
