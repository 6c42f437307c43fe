"""The engine loop (services/engine/loop.py): commands in order between steps, a snapshot after
each step that reads never wait for, failure rules, no busy wait, and a clean stop."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from dataclasses import replace

import pytest

from services.common.errors import DependencyUnavailableError
from services.common.types import SamplingParams
from services.engine.loop import EngineLoop, LoopConfig, StepFailure
from tests.decode.helpers import prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.worker_faults import POISON_SEED, PoisonedStep

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
QUIET = LoopConfig("test", idle_poll_s=60.0)  # no timed wake-ups: every wake has a cause


class Events:
    """The loop's handlers: what reached the event loop, in order."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finished: list[str] = []
        self.failures: list[StepFailure] = []
        self.died: list[BaseException] = []
        self.changed = asyncio.Event()

    def start(self, loop: EngineLoop) -> None:
        loop.start(self.on_outputs, self.on_step_failed, self.on_died)

    def on_outputs(self, outputs, done_at: float) -> None:
        for out in outputs:
            self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                self.finished.append(out.request_id)
        self.changed.set()

    def on_step_failed(self, failure: StepFailure) -> None:
        self.failures.append(failure)
        self.changed.set()

    def on_died(self, error: BaseException) -> None:
        self.died.append(error)
        self.changed.set()

    async def until(self, done) -> None:
        while not done():
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 30)


def reference(model, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    (completion,) = make_engine(model).generate([prompt], params)
    return completion.token_ids


def test_commands_run_in_order_between_steps_and_their_effect_is_published(tiny_llama):
    engine = make_engine(tiny_llama)
    stepping = threading.Event()
    seen: list[tuple[str, bool]] = []  # (command, a step in flight while it ran)

    def hook(layer, ctx):
        if layer == 0:
            stepping.set()
        if layer == engine.spec.num_layers - 1:
            stepping.clear()

    loop = EngineLoop(engine, QUIET, on_layer_done=hook)
    events = Events()
    held, go = threading.Event(), threading.Event()

    def record(name: str):
        def command(e):
            seen.append((name, stepping.is_set()))
            return name

        return command

    async def main():
        events.start(loop)
        blocker = loop.submit(lambda e: (held.set(), go.wait(10)))
        await asyncio.to_thread(held.wait, 10)  # the engine thread runs the blocker
        # Queued together behind it: one batch, in submission order, before any step.
        added = loop.submit(lambda e: e.add_request("a", prompt_ids(20, 1), GREEDY))
        names = [loop.submit(record(f"c{i}")) for i in range(3)]
        dropped = loop.submit(lambda e: e.add_request("b", prompt_ids(9, 2), GREEDY))
        aborted = loop.submit(lambda e: e.abort("b").finish_reason.name)
        go.set()
        await asyncio.wrap_future(blocker)
        assert await asyncio.wrap_future(added) is None
        # Its result came after the snapshot that shows it: "a" waits, "b" came and went.
        snap = loop.snapshot
        assert (snap.engine.num_waiting, snap.num_waiting_tokens, snap.num_steps) == (1, 20, 0)
        assert [await asyncio.wrap_future(f) for f in names] == ["c0", "c1", "c2"]
        assert await asyncio.wrap_future(dropped) is None
        assert await asyncio.wrap_future(aborted) == "ABORT"
        await events.until(lambda: "a" in events.finished)
        # Commands between steps too: each ran while no step was in flight.
        assert await loop.call(record("late")) == "late"
        assert seen == [("c0", False), ("c1", False), ("c2", False), ("late", False)]
        assert events.tokens == {"a": reference(tiny_llama, prompt_ids(20, 1))}
        assert (loop.snapshot.num_steps, loop.snapshot.num_commands) == (4, 8)
        await loop.stop()

    asyncio.run(main())
    assert_no_leaks(engine)


def test_a_snapshot_read_never_waits_behind_a_step(tiny_llama):
    engine = make_engine(tiny_llama)
    in_step, release = threading.Event(), threading.Event()
    # The second step is held too, until the snapshot after the first is read: else the engine
    # thread may step again (and publish) before this event loop reads it (seen in CI).
    release_second = threading.Event()

    def hold(layer, ctx):
        if layer != 0:
            return
        if not release.is_set():
            in_step.set()
            release.wait(30)
        elif not release_second.is_set():
            release_second.wait(30)

    ticks = itertools.count()  # the loop's clock: every step lasts exactly 1.0
    config = replace(QUIET, load_window_s=1000.0)
    loop = EngineLoop(engine, config, on_layer_done=hold, clock=lambda: float(next(ticks)))
    events = Events()

    async def main():
        events.start(loop)
        before = loop.snapshot
        await loop.call(lambda e: e.add_request("r", prompt_ids(40, 3), GREEDY))
        await asyncio.to_thread(in_step.wait, 10)  # the engine thread is held mid-step
        snap = loop.snapshot  # published after the add, before the step
        assert (snap.engine.num_waiting, snap.engine.num_running) == (1, 0)
        assert (snap.num_waiting_tokens, snap.num_steps, snap.engine.num_steps) == (40, 0, 0)
        assert snap.engine.num_free_blocks == before.engine.num_free_blocks
        assert await asyncio.wait_for(loop.settled(), 5) is snap  # nothing queued: no wait
        # Beside work runs now, not behind the step.
        name = await asyncio.wrap_future(
            loop.submit_beside(lambda e: threading.current_thread().name)
        )
        assert name.startswith("test-beside")
        queued = asyncio.ensure_future(loop.call(lambda e: e.snapshot.num_steps))
        settled = asyncio.ensure_future(loop.settled())  # waits: a command is queued
        await asyncio.sleep(0)
        assert not queued.done() and not settled.done()
        release.set()
        assert await queued == 1  # ran after the held step, which the engine counted
        after = await settled
        assert (after.num_steps, after.engine.num_running, after.engine.num_waiting) == (1, 1, 0)
        assert after.num_waiting_tokens == 0
        assert after.engine.num_free_blocks == before.engine.num_free_blocks - 3
        release_second.set()
        await events.until(lambda: "r" in events.finished)
        assert (loop.snapshot.num_steps, loop.snapshot.engine.num_running) == (4, 0)
        assert loop.meter.snapshot() == (1.0, 4 / 1000)  # every step timed, none twice
        await loop.stop()

    asyncio.run(main())
    assert_no_leaks(engine)


def test_a_failed_step_fails_only_its_requests_and_the_loop_steps_on(tiny_llama):
    poison = PoisonedStep()
    engine = make_engine(tiny_llama, logits_hook=poison)
    loop = EngineLoop(engine, QUIET)
    events = Events()
    bad_params = replace(GREEDY, seed=POISON_SEED)

    async def main():
        events.start(loop)
        # Reserved for an import: holds blocks, in no step.
        await loop.call(lambda e: e.begin_prompt_import("held", prompt_ids(30, 4), GREEDY))
        await loop.call(lambda e: e.add_request("bad", prompt_ids(20, 5), bad_params))
        await events.until(lambda: events.failures)
        (failure,) = events.failures
        assert (failure.request_ids, str(failure.error)) == (
            ("bad",),
            "probability tensor contains either inf, nan or element < 0",
        )
        assert len(failure.ref) == 12 and poison.num_failed == 1
        snap = await loop.settled()
        assert (snap.num_failed_steps, snap.engine.num_running, snap.engine.num_importing) == (
            1,
            0,
            1,
        )
        assert snap.engine.num_free_blocks == snap.engine.num_blocks - 2  # "held"'s only
        await loop.call(lambda e: e.add_request("after", prompt_ids(25, 6), GREEDY))
        await events.until(lambda: "after" in events.finished)
        assert events.tokens == {"after": reference(tiny_llama, prompt_ids(25, 6))}
        await loop.call(lambda e: e.abort("held"))
        await loop.stop()

    asyncio.run(main())
    assert events.died == []
    assert_no_leaks(engine)


@pytest.mark.parametrize("where", ["after_step", "handler"])
def test_a_loop_that_dies_steps_no_more_but_still_runs_commands(tiny_llama, where):
    engine = make_engine(tiny_llama)
    steps: list[int] = []
    one = replace(GREEDY, max_tokens=1)  # done in one step: nothing more to step meanwhile

    def after_step(e, outputs):
        steps.append(len(outputs))
        if where == "after_step":
            raise RuntimeError("a bug outside any step")

    loop = EngineLoop(engine, QUIET, after_step=after_step)
    events = Events()
    if where == "handler":

        def broken(outputs, done_at):
            raise RuntimeError("a bug outside any step")

        events.on_outputs = broken

    async def main():
        events.start(loop)
        await loop.call(lambda e: e.add_request("r1", prompt_ids(20, 7), one))
        died = await asyncio.wait_for(asyncio.shield(loop.died), 10)
        assert str(died) == "a bug outside any step" and events.died == [died]
        # Halted: a new request joins, and nothing steps it; a command frees it.
        await loop.call(lambda e: e.add_request("r2", prompt_ids(20, 8), GREEDY))
        snap = loop.snapshot
        assert (snap.engine.num_waiting, snap.engine.num_running, snap.num_steps) == (1, 0, 1)
        assert await loop.call(lambda e: e.abort("r2").finish_reason.name) == "ABORT"
        assert (await loop.settled()).num_steps == 1
        await loop.stop()

    asyncio.run(main())
    assert steps == [1]
    assert_no_leaks(engine)


def test_an_idle_loop_sleeps_until_a_command_and_a_stalled_one_until_it_may_step(tiny_llama):
    engine = make_engine(tiny_llama, num_kv_blocks=4)  # 64 tokens
    real_step, num_outputs = engine.step, []
    stalls: queue.Queue[None] = queue.Queue()

    def counting_step(*args):
        outputs = real_step(*args)
        num_outputs.append(len(outputs))
        if not outputs and engine.scheduler.waiting:
            stalls.put(None)
        return outputs

    engine.step = counting_step
    loop = EngineLoop(engine, QUIET)
    events = Events()

    async def main():
        events.start(loop)
        for _ in range(5):  # idle: each command wakes the thread once, and nothing steps
            await loop.call(lambda e: None)
        assert num_outputs == [] and loop.snapshot.num_idle_waits <= 5
        # Every block reserved for an import: a 40-token prompt cannot start.
        await loop.call(lambda e: e.begin_prompt_import("held", prompt_ids(63, 8), GREEDY))
        await loop.call(lambda e: e.add_request("r", prompt_ids(40, 9), GREEDY))
        await asyncio.to_thread(stalls.get, True, 10)
        await loop.call(lambda e: None)  # one more look: one more stalled step, no spinning
        await asyncio.to_thread(stalls.get, True, 10)
        await loop.call(lambda e: e.abort("held"))  # its blocks free: "r" runs to its end
        await events.until(lambda: "r" in events.finished)
        assert events.tokens == {"r": reference(tiny_llama, prompt_ids(40, 9))}
        await loop.stop()

    asyncio.run(main())
    assert num_outputs == [0, 0, 1, 1, 1, 1]
    assert_no_leaks(engine)


def test_stop_ends_the_thread_after_queued_commands_and_refuses_later_ones(tiny_llama):
    engine = make_engine(tiny_llama)
    loop = EngineLoop(engine, QUIET)
    events = Events()

    async def main():
        events.start(loop)
        prompts = {f"r{i}": prompt_ids(10 + 7 * i, 10 + i) for i in range(3)}
        for rid, prompt in prompts.items():
            loop.submit(lambda e, rid=rid, p=prompt: e.add_request(rid, p, GREEDY))
        await events.until(lambda: len(events.finished) == 3)
        assert events.tokens == {rid: reference(tiny_llama, p) for rid, p in prompts.items()}
        loop.submit(lambda e: e.begin_prompt_import("late", [5, 6, 7], GREEDY))
        last = loop.submit(lambda e: e.abort("late").finish_reason.name)  # queued before stop
        await loop.stop()
        assert last.result() == "ABORT"
        with pytest.raises(DependencyUnavailableError, match="the test engine loop has stopped"):
            await loop.call(lambda e: None)
        names = [t.name for t in threading.enumerate()]
        assert not [n for n in names if n.startswith("test-")]

    asyncio.run(main())
    assert_no_leaks(engine)
