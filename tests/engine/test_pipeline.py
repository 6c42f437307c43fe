"""Two step streams under a layer split (services/engine/pipeline.py): the order in which steps
are submitted and committed, exact output, and what settles a step in flight (an abort, a
layout change, a failed port, the engine loop's commands)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest
import torch

from services.common.types import SamplingParams
from services.engine.local_ports import LocalStagePort
from services.engine.loop import EngineLoop, LoopConfig
from services.engine.ports import StagePort, StageWork
from services.engine.stages import StageLayout
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.engine.test_port_failures import FailingStagePort, run_to_end
from tests.engine.test_stages import RecordingPort

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = {
    "w": prompt_ids(30, 1),
    "x": prompt_ids(4, 2),
    "y": prompt_ids(9, 3),
    "z": prompt_ids(17, 4),
}


class EventPort(RecordingPort):
    """Passes work on and logs ``("submit", request ids)`` in the shared event list."""

    def __init__(self, inner: StagePort, events: list[tuple[str, str]]) -> None:
        super().__init__(inner)
        self.events = events

    def submit(self, work: StageWork) -> Future[torch.Tensor]:
        self.events.append(("submit", "".join(work.request_ids)))
        return super().submit(work)


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    engine = make_engine(tiny_llama)
    return {r: engine.generate([p], PARAMS)[0].token_ids for r, p in PROMPTS.items()}


def split_pair(model, events: list | None = None, pipelined: bool = True, **overrides):
    """Owner ``a`` with layers [2, 4) on helper ``b`` and two micro-batches; ``a``'s committed
    steps are logged as ``("commit", request ids)`` when ``events`` is given."""
    log = events if events is not None else []

    def committed(seqs, logits):
        log.append(("commit", "".join(s.request_id for s in seqs)))

    a = make_engine(model, committed, pipelined_steps=pipelined, **overrides)
    b = make_engine(model)
    hosted = b.migration.host_layers("A", 2, 4, 64, a.fingerprint)
    port = EventPort(LocalStagePort(hosted), log)
    a.migration.set_stages(StageLayout.split(4, 2, port, num_micro_batches=2))
    return a, b, port


def add_all(engine) -> dict[str, list[int]]:
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, PARAMS)
    return {r: [] for r in PROMPTS}


def step(engine, tokens: dict[str, list[int]]) -> None:
    for out in engine.step():
        tokens[out.request_id] += out.new_token_ids


def finish(a, b, port) -> None:
    a.migration.set_stages(StageLayout.local(4))
    b.migration.release_hosted_layers("A")
    port.close()
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_two_streams_take_turns_and_each_is_submitted_before_the_other_commits(
    tiny_llama, reference
):
    events: list[tuple[str, str]] = []
    a, b, port = split_pair(tiny_llama, events)
    tokens = add_all(a)
    run_to_end(a, tokens)
    assert tokens == reference
    # The prompts arrive together and prefill as one step; then half the batch a step, the
    # next half submitted before the first commits, and so on (8 tokens: 1 + 7 decodes each).
    assert events[:9] == [
        ("submit", "wxyz"),
        ("commit", "wxyz"),
        ("submit", "wx"),
        ("submit", "yz"),
        ("commit", "wx"),
        ("submit", "wx"),
        ("commit", "yz"),
        ("submit", "yz"),
        ("commit", "wx"),
    ]
    assert events.count(("submit", "wx")) == events.count(("commit", "wx")) == 7
    assert a.stats()["num_overlapped_steps"] == 13  # 14 half steps: each but the first
    assert sorted(port.released) == ["w", "x", "y", "z"]
    finish(a, b, port)


def test_without_pipelined_steps_both_halves_stay_inside_one_step(tiny_llama, reference):
    events: list[tuple[str, str]] = []
    a, b, port = split_pair(tiny_llama, events, pipelined=False)
    tokens = add_all(a)
    run_to_end(a, tokens)
    assert tokens == reference
    assert events[:6] == [
        ("submit", "w"),
        ("submit", "xyz"),
        ("commit", "wxyz"),
        ("submit", "wx"),
        ("submit", "yz"),
        ("commit", "wxyz"),
    ]
    assert a.stats()["num_overlapped_steps"] == 0
    finish(a, b, port)


def test_a_sequence_in_flight_is_never_preempted(tiny_llama, reference):
    # 6 blocks of 16 tokens: the prompts take all six (w 2, x 1, y 1, z 2) and w needs a third
    # at token 32, so the scheduler must preempt; never a sequence of the step in flight.
    a, b, port = split_pair(tiny_llama, num_kv_blocks=6, enable_prefix_caching=False)
    original = a.scheduler.on_preempt
    victims: list[tuple[str, frozenset[str]]] = []

    def on_preempt(seq):
        victims.append((seq.request_id, a.pipeline.request_ids))
        original(seq)

    a.scheduler.on_preempt = on_preempt
    tokens = add_all(a)
    run_to_end(a, tokens)
    assert victims and all(rid not in in_flight for rid, in_flight in victims)
    # a preempted sequence recomputes: its tokens are still those of the plain run
    assert tokens == reference
    finish(a, b, port)


def test_an_abort_of_a_sequence_in_flight_finishes_that_step_first(tiny_llama, reference):
    events: list[tuple[str, str]] = []
    a, b, port = split_pair(tiny_llama, events)
    tokens = add_all(a)
    for _ in range(4):
        step(a, tokens)
    assert a.pipeline.request_ids == {"y", "z"}  # submitted, not committed
    before = len(tokens["z"])
    assert a.abort("z").finish_reason.name == "ABORT"
    assert events[-1] == ("commit", "yz") and not a.in_flight
    step(a, tokens)  # hands over the settled step's outputs, y's and z's
    assert len(tokens["z"]) == before + 1
    run_to_end(a, tokens)
    assert tokens["z"] == reference["z"][: before + 1]
    assert {r: tokens[r] for r in "wxy"} == {r: reference[r] for r in "wxy"}
    assert "z" in port.released
    finish(a, b, port)


def test_a_layout_change_settles_the_step_in_flight(tiny_llama, reference):
    a, b, port = split_pair(tiny_llama)
    tokens = add_all(a)
    for _ in range(3):
        step(a, tokens)
    assert a.in_flight
    # Back to local without restoring the helper's KV: every sequence recomputes, exactly.
    requeued = a.migration.set_stages(StageLayout.local(4))
    assert not a.in_flight and sorted(requeued) == ["w", "x", "y", "z"]
    run_to_end(a, tokens)
    assert tokens == reference
    b.migration.release_hosted_layers("A")
    port.close()
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_a_failed_stage_drops_the_step_started_after_it_too(tiny_llama, reference):
    a, b, port = split_pair(tiny_llama)
    failing = FailingStagePort(port, fail_at=5)  # the fourth decode half
    a.migration.set_stages(StageLayout.split(4, 2, failing, num_micro_batches=2))
    tokens = add_all(a)
    committed = a.snapshot.num_steps
    for _ in range(6):
        step(a, tokens)
    # call 6 started the fifth work and committed the fourth; call 7 starts the sixth and
    # waits for the fifth, which failed: neither is kept, and [2, 4) runs here from now on
    assert a.step() == []
    assert a.snapshot.num_failed_steps == 1 and a.snapshot.num_steps == committed + 4
    assert not a.in_flight and not a.migration.stage_layout.remote
    run_to_end(a, tokens)
    assert tokens == reference
    b.migration.release_hosted_layers("A")
    failing.close()
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_the_engine_loop_runs_no_command_while_a_step_is_in_flight(tiny_llama):
    params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    plain = make_engine(tiny_llama)
    reference = {r: plain.generate([p], params)[0].token_ids for r, p in PROMPTS.items()}
    a, b, port = split_pair(tiny_llama)
    loop = EngineLoop(a, LoopConfig("test", idle_poll_s=60.0))
    tokens: dict[str, list[int]] = {r: [] for r in PROMPTS}
    done = threading.Event()

    def on_outputs(outputs, done_at):
        for out in outputs:
            tokens[out.request_id] += out.new_token_ids
        if not a.has_unfinished_requests:
            done.set()

    async def main() -> list[bool]:
        loop.start(on_outputs, lambda failure: None, lambda error: None)
        for rid, prompt in PROMPTS.items():
            await loop.call(lambda e, rid=rid, prompt=prompt: e.add_request(rid, prompt, params))
        seen = []
        while not done.is_set():  # a command now and then: steps overlap between them
            seen.append(await loop.call(lambda e: e.in_flight))
            await asyncio.sleep(0.005)
        await loop.stop()
        return seen

    seen = asyncio.run(main())
    assert seen and not any(seen)
    assert tokens == reference
    assert a.stats()["num_overlapped_steps"] > 0
    finish(a, b, port)
