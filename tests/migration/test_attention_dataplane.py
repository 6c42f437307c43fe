"""Attention migration over a real TCP data plane: the invariant, with both agents in one process.

Owner A serves the mixed workload of tests/engine/test_migration_invariant.py (chunked prefill, a
pool small enough to preempt, prefix hits) while a seeded schedule, at random steps, has the two
``MigrationAgent``s prepare an attention migration, copy the leading full blocks of A's longest
sequences to helper B (``blocks_hold`` + ``kv_import`` over 127.0.0.1), switch (A frees its
copies; every layer of every step sends the located queries to B and merges B's ``(O, m, l)``),
revert (blocks back) or abort (A recomputes them). B serves requests of its own meanwhile.
Greedy float32 output of every request on both engines equals the run without migrations; both
end with no block held and nothing hosted.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Iterator

import pytest

from services.common.errors import InvalidRequestError, PreconditionError, RequestNotFoundError
from services.engine import step as step_module
from services.engine.engine import Engine
from services.migration.attention_agent import AttentionSelection, selection_from_proto
from services.migration.records import Peer, Role
from services.rpc.gen.banaserve.v1 import migration_pb2
from tests.engine.coordinator import owner_engine
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.engine.test_migration_invariant import B_WORKLOAD, WORKLOAD, params, plain_run
from tests.migration.harness import EngineThread, LoopThread, make_agent

pytestmark = pytest.mark.timeout(300)
TWO = AttentionSelection(max_sequences=2)


class AttentionPair:
    """Donor A and helper B with their agents; one attention migration at a time."""

    def __init__(
        self,
        loop: LoopThread,
        a: Engine,
        b: Engine,
        selection: AttentionSelection = TWO,
        clock=None,
        **donor_config,
    ) -> None:
        """``donor_config``: AgentConfig fields of the donor's agent."""
        self.loop, self.a, self.b, self.selection = loop, a, b, selection
        self.a_thread, self.b_thread = EngineThread(a), EngineThread(b)
        self.donor = make_agent(self.a_thread, "tcp", clock, **donor_config)
        self.helper = make_agent(self.b_thread, "tcp", clock)
        self.address = loop.call(self.helper.serve_data())
        loop.call(self.donor.serve_data())
        self.helper_peer = Peer("B", "", self.address, "tcp")
        self._ids = (f"m-{i}" for i in itertools.count(1))
        self.mid = ""
        self.state = "idle"  # idle | copying | switched
        self.events: list[str] = []
        self.num_located = 0  # sequences located at the switches, all together
        self.num_calls = 0  # attention round trips of the ended migrations

    def prepare(self) -> None:
        self.mid = next(self._ids)
        layers = range(0, self.a.spec.num_layers)
        _, fp, _, _ = self.loop.call(
            self.donor.prepare(
                self.mid, Role.DONOR, layers, Peer("A"), Peer("B"), None,
                attention=self.selection,
            )
        )  # fmt: skip
        self.loop.call(
            self.helper.prepare(
                self.mid, Role.HELPER, layers, Peer("A"), self.helper_peer, None, fp,
                attention=self.selection,
            )
        )  # fmt: skip
        self.state = "copying"
        self.events.append("prepare")

    def copy(self) -> tuple[int, int, float]:
        out = self.loop.call(self.donor.copy_kv(self.mid, self.helper_peer))
        self.events.append(f"copy {out[1]}")
        return out

    def switch(self) -> int:
        result = self.loop.call(self.donor.switch(self.mid, 1, None))
        self.state = "switched"
        self.num_located += len(result.request_ids)
        self.loop.call(self.donor.activate(self.mid, False))
        self.events.append(f"switch {len(result.request_ids)}")
        return len(result.request_ids)

    def revert(self) -> None:
        result = self.loop.call(self.donor.revert(self.mid))
        self.events.append(f"revert {len(result.request_ids)}/{len(result.requeued)}")
        self._count()
        self.loop.call(self.donor.release(self.mid))
        self.loop.call(self.helper.release(self.mid))
        self.state = "idle"

    def abort(self) -> None:
        self.loop.call(self.donor.abort(self.mid, "test"))
        self._count()
        self.loop.call(self.helper.abort(self.mid, "test"))
        self.events.append("abort")
        self.state = "idle"

    def release(self) -> None:
        self.loop.call(self.donor.release(self.mid))
        self.loop.call(self.helper.release(self.mid))
        self.state = "idle"

    def _count(self) -> None:
        report = self.donor.attention.overlap(self.mid)
        self.num_calls += report.num_calls if report else 0

    def close(self) -> None:
        self.loop.call(self.donor.close())
        self.loop.call(self.helper.close())


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    return plain_run(tiny_llama)


def act(pair: AttentionPair, rng: random.Random) -> None:
    """Maybe one move, at random among those possible now."""
    if rng.random() > 0.35:
        return
    if pair.state == "idle":
        pair.prepare()
        pair.copy()
    elif pair.state == "copying":
        roll = rng.random()
        if roll < 0.1:
            pair.abort()
        elif roll < 0.3:
            pair.copy()  # sequences chosen since the last stage
        else:
            try:
                pair.switch()
            except PreconditionError:  # nothing decoded on A to copy: the coordinator aborts
                pair.abort()
    elif rng.random() < 0.15:
        pair.abort()
    else:
        pair.revert()


def run_scenario(model, loop, seed: int, selection: AttentionSelection, parts: int = 2):
    """``parts``: the owner's ``located_micro_batches``."""
    a = owner_engine(model, False, located_micro_batches=parts)
    b = make_engine(model, num_kv_blocks=128)
    pair, rng = AttentionPair(loop, a, b, selection), random.Random(seed)
    tokens: dict[str, list[int]] = {}
    step, most_hosted = 0, 0
    while step <= 40 or a.has_unfinished_requests or b.has_unfinished_requests:
        for engine, workload in ((a, WORKLOAD), (b, B_WORKLOAD)):
            for rid, prompt, max_tokens, arrival in workload:
                if arrival == step:
                    engine.add_request(rid, prompt, params(max_tokens))
        act(pair, rng)
        most_hosted = max(most_hosted, b.snapshot.num_hosted_blocks)
        for out in pair.a_thread.step() + pair.b_thread.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    if pair.state == "switched":
        pair.revert()
    elif pair.state == "copying":
        pair.release()
    b.step()  # B returns what A released to its pool at its next step
    pair.close()
    assert_no_leaks(a)
    assert_no_leaks(b)
    assert not a.placement.located
    assert b.migration.hosted_blocks.num_blocks == 0
    return tokens, pair, most_hosted


@pytest.mark.parametrize(
    ("seed", "selection", "parts"),
    [
        (0, AttentionSelection(max_sequences=2), 2),
        (1, AttentionSelection(max_sequences=3, max_blocks_per_sequence=2), 1),
        (2, AttentionSelection(), 2),
    ],
)
def test_attention_migrations_over_tcp_never_change_output(
    tiny_llama, reference, loop, seed, selection, parts, monkeypatch
):
    split = []  # parts of each step cut for its located sequences
    deal = step_module._deal
    monkeypatch.setattr(step_module, "_deal", lambda *a: split.append(len(r := deal(*a))) or r)
    tokens, pair, most_hosted = run_scenario(tiny_llama, loop, seed, selection, parts)
    assert tokens == reference
    # two parts' queries out on the channel at once: each part's answer came back to it
    assert (max(split, default=1) == 2) == (parts == 2), split
    assert any(e.startswith("switch") for e in pair.events), pair.events
    assert any(e.startswith("revert") for e in pair.events), pair.events
    assert pair.num_located > 0 and pair.num_calls > 0, pair.events
    assert most_hosted > 0


@pytest.mark.slow
def test_attention_migrations_never_change_smollm2_output(smollm2, loop):
    tokens, pair, _ = run_scenario(smollm2, loop, 0, TWO)
    assert tokens == plain_run(smollm2)
    assert pair.num_located > 0 and pair.num_calls > 0, pair.events


def test_a_selection_with_nothing_to_move_fails_the_copy_and_names_match_client_ids(
    tiny_llama, loop
):
    """Probe, session 42: an attention migration from a worker with no decoding sequence (a
    prefill worker, an idle decode worker) went ACTIVE with nothing moved and held both workers
    until reverted; now a switch that no copy round found a sequence for fails
    FAILED_PRECONDITION (the coordinator aborts it), unless it refills. And ``--request-id``
    never matched: a decode worker runs a request as ``ID#N``, while its client knows ``ID``;
    both now name it. A switch whose copied sequences all ended meanwhile fails the same way
    (session 43)."""
    a, b = make_engine(tiny_llama, num_kv_blocks=64), make_engine(tiny_llama, num_kv_blocks=64)
    pair = AttentionPair(loop, a, b, AttentionSelection())
    try:
        pair.prepare()
        assert pair.copy()[1] == pair.copy()[1] == 0  # a later round may still find one
        with pytest.raises(PreconditionError, match="no sequence decodes here to move"):
            pair.switch()
        pair.abort()
        pair.selection = AttentionSelection(refill=True)  # moves sequences as they come
        pair.prepare()
        assert pair.copy()[1] == 0
        assert pair.switch() == 0
        pair.revert()
        a.add_request("client-7#3", list(range(40, 80)), params(30))
        for _ in range(3):
            pair.a_thread.step()
        pair.selection = AttentionSelection(request_ids=("client-7",))
        pair.prepare()
        assert pair.copy()[1] == 1
        pair.abort()
        # Copied, then ended before the switch: ACTIVE would locate nothing either.
        pair.selection = AttentionSelection()
        pair.prepare()
        assert pair.copy()[1] == 1
        helper_record = pair.helper.records[pair.mid]
        assert pair.helper.attention.view_fields(helper_record)["num_blocks"] > 0
        a.abort("client-7#3")
        with pytest.raises(PreconditionError, match=r"the 1 sequence\(s\) copied ended before"):
            pair.switch()
        assert pair.helper.attention.view_fields(helper_record)["num_blocks"] == 0  # released
        pair.abort()
    finally:
        pair.close()
    assert_no_leaks(a)
    assert_no_leaks(b)


@contextlib.contextmanager
def two_decoding(tiny_llama, loop) -> Iterator[AttentionPair]:
    """Donor A decoding two 40-token prompts (3 steps in), helper B, an attention migration
    prepared; at the end A runs them to completion and neither engine holds anything."""
    a, b = make_engine(tiny_llama, num_kv_blocks=64), make_engine(tiny_llama, num_kv_blocks=64)
    for i in range(2):
        a.add_request(f"r-{i}", list(range(40 + i, 80 + i)), params(30))
    pair = AttentionPair(loop, a, b)
    try:
        for _ in range(3):
            pair.a_thread.step()
        pair.prepare()
        yield pair
        while a.has_unfinished_requests:
            pair.a_thread.step()
    finally:
        pair.close()
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_an_abort_counts_the_located_sequences_it_sends_back_to_recompute(tiny_llama, loop):
    """Probe, session 40: an attention migration aborted with sequences located reported 0
    recomputed. The donor's record (its view's ``num_requeued_at_end``) counts them."""
    with two_decoding(tiny_llama, loop) as pair:
        pair.copy()
        assert pair.switch() == 2
        pair.abort()
        assert pair.donor.records[pair.mid].num_requeued_at_end == 2


def test_the_donor_counts_the_bytes_it_moved_once(tiny_llama, loop):
    """Probe, session 44: the donor's record (the coordinator's ``num_kv_bytes`` follows it)
    counted an attention copy's bytes twice, its link's report and the copy's own: after the
    revert, 3x the copy. Now the copy's, then the copy's and the revert's, as the helper saw."""
    with two_decoding(tiny_llama, loop) as pair:
        copied, _, _ = pair.copy()
        donor, helper = pair.donor.records[pair.mid], pair.helper.records[pair.mid]
        assert copied > 0 and donor.bytes_moved == copied == helper.bytes_moved
        assert pair.switch() == 2
        assert donor.bytes_moved == copied and donor.sequences == {"r-0", "r-1"}
        result = pair.loop.call(pair.donor.revert(pair.mid))
        assert result.num_bytes > 0 and donor.bytes_moved == copied + result.num_bytes
        pair.loop.call(pair.donor.release(pair.mid))
        pair.loop.call(pair.helper.release(pair.mid))


def test_named_requests_none_of_which_decode_here_fail_the_copy(tiny_llama, loop):
    """A probe's attention migration naming requests the donor does not run went ACTIVE with
    nothing moved and held both workers; now its first copy fails NOT_FOUND (the coordinator
    aborts it with that reason), while a selection naming one that runs copies it. Malformed
    names are refused when the selection is read."""
    a, b = make_engine(tiny_llama, num_kv_blocks=64), make_engine(tiny_llama, num_kv_blocks=64)
    a.add_request("r-1", list(range(40, 80)), params(30))
    pair = AttentionPair(loop, a, b, AttentionSelection(request_ids=("nope", "gone")))
    try:
        for _ in range(3):
            pair.a_thread.step()
        pair.prepare()
        with pytest.raises(
            RequestNotFoundError, match=r"none of the named requests \(nope, gone\)"
        ):
            pair.copy()
        pair.abort()
        pair.selection = AttentionSelection(request_ids=("nope", "r-1"))
        pair.prepare()
        assert pair.copy()[1] == 1
        pair.abort()
    finally:
        pair.close()
    for ids, match in [(["a b"], "must be printable ASCII"), (["x", "x"], "names 'x' twice")]:
        with pytest.raises(InvalidRequestError, match=match):
            selection_from_proto(migration_pb2.AttentionSelection(request_ids=ids))
