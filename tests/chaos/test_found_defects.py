"""Defects the chaos suite found, each reproduced in process (docs/reliability.md, "Chaos").

A coordinator killed while a migration is ACTIVE comes back after the helper's lease ran out:
the helper has dropped the layers, and the ``Revert`` the operator (or the restarted
coordinator) sends the donor must fail with a documented status (UNAVAILABLE: the helper
cannot give the KV back) rather than INTERNAL, and leave the donor able to abort and serve on
with unchanged greedy output and nothing held.
"""

from __future__ import annotations

import time

import pytest

from services.common.errors import DependencyUnavailableError
from services.common.migration_states import MigrationState
from tests.engine.helpers import make_engine
from tests.engine.test_migration_invariant import plain_run
from tests.migration.harness import (
    MIGRATION,
    AgentPair,
    LoopThread,
    assert_unchanged_and_local,
    run_with_fault,
)


@pytest.fixture
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


def test_revert_after_the_helper_dropped_the_layers_is_unavailable(tiny_llama, loop):
    reference = plain_run(tiny_llama)
    a, b = make_engine(tiny_llama, num_kv_blocks=64), make_engine(tiny_llama, num_kv_blocks=128)
    pair = AgentPair(loop, a, b)

    def fault() -> None:
        loop.call(pair.helper.abort(MIGRATION, "lease expired: no coordinator call"))
        with pytest.raises(DependencyUnavailableError, match="helper"):
            loop.call(pair.donor.revert(MIGRATION))
        loop.call(pair.donor.abort(MIGRATION, "the revert failed"))
        assert pair.donor.get(MIGRATION).state is MigrationState.ABORTED

    tokens = run_with_fault(pair, 12, fault)
    assert_unchanged_and_local(pair, tokens, reference)


def test_a_revert_racing_the_donors_own_fall_back_is_unavailable(tiny_llama, loop):
    """The donor learns its helper is lost (its connection broke) and starts falling back on
    its own; a Revert arriving before that fall-back ends must not run beside it (found: it
    "succeeded" with nothing to fetch, the sequences already requeued, or failed as a bad
    request once the fall-back had ended): UNAVAILABLE either way, output unchanged."""
    reference = plain_run(tiny_llama)
    a, b = make_engine(tiny_llama, num_kv_blocks=64), make_engine(tiny_llama, num_kv_blocks=128)
    pair = AgentPair(loop, a, b)
    lost = "helper cannot give the KV back"

    async def lose_helper_then_revert():
        pair.donor._port_failed(MIGRATION, "connection to the helper broke")  # starts the fall-back
        with pytest.raises(DependencyUnavailableError, match=lost):
            await pair.donor.revert(MIGRATION)

    def fault() -> None:
        loop.call(lose_helper_then_revert())
        wait_until(lambda: pair.donor.get(MIGRATION).state is MigrationState.ABORTED)
        with pytest.raises(DependencyUnavailableError, match=lost):
            loop.call(pair.donor.revert(MIGRATION))  # after the fall-back: the same status
        loop.call(pair.helper.abort(MIGRATION, "the donor fell back"))

    tokens = run_with_fault(pair, 12, fault)
    assert_unchanged_and_local(pair, tokens, reference)


def wait_until(condition, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)
