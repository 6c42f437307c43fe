"""Attention migration with ``refill``: while ACTIVE the donor keeps up to ``max_sequences`` of its
sequences located, moving the next longest decoding ones as located ones end.

Owner A serves the mixed workload of tests/engine/test_migration_invariant.py (sequences that
finish at different steps, preemption in a small pool); one migration of at most two sequences is
switched early and kept ACTIVE to the end. Without refill only the two sequences chosen at the
switch are ever located; with it, more are, never more than two at once, the output is the
plain run's token for token, and both engines end holding nothing.
"""

from __future__ import annotations

import time

import pytest

from services.common.errors import ConfigError
from services.migration.attention_agent import AttentionSelection, selection_from_proto
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb
from tests.engine.coordinator import owner_engine
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.engine.test_migration_invariant import B_WORKLOAD, WORKLOAD, params, plain_run
from tests.migration.test_attention_dataplane import AttentionPair

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    return plain_run(tiny_llama)


def run(model, loop, refill: bool, blocking: bool = True):
    a, b = owner_engine(model, False), make_engine(model, num_kv_blocks=128)
    selection = AttentionSelection(max_sequences=2, refill=refill)
    pair = AttentionPair(
        loop, a, b, selection, refill_interval_s=0.005, blocking_attention=blocking
    )
    tokens: dict[str, list[int]] = {}
    located_ever: set[str] = set()
    most_at_once, step = 0, 0
    while step <= 40 or a.has_unfinished_requests or b.has_unfinished_requests:
        for engine, workload in ((a, WORKLOAD), (b, B_WORKLOAD)):
            for rid, prompt, max_tokens, arrival in workload:
                if arrival == step:
                    engine.add_request(rid, prompt, params(max_tokens))
        if step == 8:
            pair.prepare()
            pair.copy()
            assert pair.switch() > 0
            port = pair.donor.attention.moves[pair.mid].port
            assert (port.channel is not None) is blocking  # the stepping thread's own socket
        for out in pair.a_thread.step() + pair.b_thread.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        with pair.a_thread.lock:
            located = set(a.placement.located)
        located_ever |= located
        most_at_once = max(most_at_once, len(located))
        time.sleep(0.02)  # the refill task's turn (it runs on the agents' loop)
        step += 1
    pair.revert()
    b.step()  # B returns what A released to its pool at its next step
    pair.close()
    assert_no_leaks(a)
    assert_no_leaks(b)
    assert not a.placement.located
    assert b.migration.hosted_blocks.num_blocks == 0
    return tokens, located_ever, most_at_once, pair


def test_refill_keeps_the_migration_filled_and_never_changes_output(tiny_llama, reference, loop):
    tokens, located_ever, most_at_once, _ = run(tiny_llama, loop, refill=True)
    assert tokens == reference
    assert most_at_once <= 2
    assert len(located_ever) > 2, located_ever


def test_without_refill_only_the_sequences_of_the_switch_are_located(tiny_llama, reference, loop):
    # and the exchanges through the agent's loop (no blocking channel) give the same output
    tokens, located_ever, most_at_once, pair = run(tiny_llama, loop, refill=False, blocking=False)
    assert tokens == reference
    assert 0 < len(located_ever) <= 2, located_ever


def test_refill_takes_no_named_sequences():
    with pytest.raises(ConfigError, match="refill"):
        AttentionSelection(request_ids=("r1",), refill=True)
    msg = pb.AttentionSelection(max_sequences=3, refill=True)
    assert selection_from_proto(msg) == AttentionSelection(max_sequences=3, refill=True)
