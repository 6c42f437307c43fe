"""A step whose batch has located sequences (attention migration) runs as micro-batches: the
sequences are dealt out so every part waits on its helper, each part's queries of a layer go out
before the first part waits for its answer (the round trip overlaps the other part's layer), and
the output is the one-part step's, token for token."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from services.common.types import SamplingParams
from services.engine.attention import PartialAttention
from services.engine.local_ports import LocalAttentionPort
from services.engine.ports import AttentionPort, AttentionQuery
from services.engine.scheduler import ScheduledBatch
from services.engine.step import _deal
from tests.engine.coordinator import Migrations, owner_engine, prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = {f"r{i}": prompt_ids(40 + 9 * i, 30 + i) for i in range(4)}


def batch_of(*ids: str) -> ScheduledBatch:
    seqs = [SimpleNamespace(request_id=i) for i in ids]
    return ScheduledBatch(seqs, [1] * len(ids))  # type: ignore[arg-type]


def ids_of(parts: list[ScheduledBatch]) -> list[list[str]]:
    return [[s.request_id for s in p.seqs] for p in parts]


def test_located_sequences_are_dealt_out_then_the_others_continue_the_turn():
    batch = batch_of("a", "L1", "b", "L2", "c", "L3")
    assert ids_of(_deal(batch, 2, {"L1", "L2", "L3"})) == [["L1", "L3", "b"], ["L2", "a", "c"]]
    # no more parts than located sequences: each part has one to wait on
    assert ids_of(_deal(batch, 4, {"L1", "L2"})) == [["L1", "a", "c"], ["L2", "b", "L3"]]
    three = _deal(batch, 8, {"L1", "L2", "L3"})
    assert ids_of(three) == [["L1", "a"], ["L2", "b"], ["L3", "c"]]
    assert all(p.num_new_tokens == [1] * len(p.seqs) for p in three)
    # one located sequence (or none): nothing for a second part to overlap, the batch whole
    assert ids_of(_deal(batch, 2, {"L1"})) == [["a", "L1", "b", "L2", "c", "L3"]]
    assert ids_of(_deal(batch, 2, set())) == [["a", "L1", "b", "L2", "c", "L3"]]


class Recorded(Future):  # type: ignore[type-arg]
    def __init__(self, events: list[tuple], layer: int, ids: tuple[str, ...]) -> None:
        super().__init__()
        self.events, self.key = events, (layer, ids)

    def result(self, timeout: float | None = None):
        self.events.append(("wait", *self.key))
        return super().result(timeout)


class RecordingPort(AttentionPort):
    """The in-process port, with each layer's submit and each wait for its answer in order."""

    def __init__(self, inner: LocalAttentionPort) -> None:
        self.inner = inner
        self.events: list[tuple] = []

    def submit(
        self, layer: int, queries: Sequence[AttentionQuery]
    ) -> Future[list[PartialAttention]]:
        ids = tuple(sorted(q.request_id for q in queries))
        self.events.append(("submit", layer, ids))
        future = Recorded(self.events, layer, ids)
        future.set_result(self.inner.submit(layer, queries).result())
        return future

    def release(self, request_ids: Sequence[str]) -> None:
        self.inner.release(request_ids)

    def close(self) -> None:
        self.inner.close()


def run(model, parts: int) -> tuple[dict[str, list[int]], list[tuple]]:
    """Four requests; after their prompts, the first blocks of three of them on a helper;
    ``parts``: the owner's located_micro_batches."""
    a = owner_engine(model, False, located_micro_batches=parts)
    b = make_engine(model, num_kv_blocks=128)
    m = Migrations(a, b)
    m.attention = port = RecordingPort(m.attention)
    for rid, prompt in PROMPTS.items():
        a.add_request(rid, prompt, PARAMS)
    tokens: dict[str, list[int]] = {}
    while a.has_unfinished_requests:
        if not m.offloaded and len(tokens) == len(PROMPTS):  # every prompt computed
            for rid in ("r1", "r2", "r3"):
                m.offload(rid, 2)
        for out in a.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    b.step()
    assert_no_leaks(a)
    assert_no_leaks(b)
    return tokens, port.events


@pytest.fixture(scope="module")
def one_part(tiny_llama):
    return run(tiny_llama, 1)


def test_without_parts_each_layer_waits_for_all_located_sequences_at_once(one_part):
    _, events = one_part
    assert events[:2] == [("submit", 0, ("r1", "r2", "r3")), ("wait", 0, ("r1", "r2", "r3"))]


def test_two_parts_send_both_before_either_waits_and_keep_the_output(tiny_llama, one_part):
    tokens, events = run(tiny_llama, 2)
    assert tokens == one_part[0]
    first, second = ("r1", "r3"), ("r2",)  # dealt in turn (the batch's order: r0, r1, r2, r3)
    assert events[:6] == [
        ("submit", 0, first),
        ("submit", 0, second),
        ("wait", 0, first),
        ("submit", 1, first),  # its next layer's queries leave before the other part waits
        ("wait", 0, second),
        ("submit", 1, second),
    ]
    waits = [e for e in events if e[0] == "wait"]
    assert len(waits) == len([e for e in events if e[0] == "submit"])  # every answer was read
