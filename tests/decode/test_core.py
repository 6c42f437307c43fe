"""DecodeWorker without grpc, on an injected clock: leases, deadlines, load metering."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.common.errors import ConfigError, InvalidRequestError, RequestNotFoundError
from services.common.load import LoadMeter
from services.common.types import FinishReason
from services.decode.core import DecodeConfig, DecodeWorker, Finished, RequestStatus
from tests.decode.helpers import GREEDY, prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lease_and_deadline_expire_on_the_injected_clock(tiny_llama):
    clock = FakeClock()
    worker = DecodeWorker(
        make_engine(tiny_llama), DecodeConfig(default_lease_s=2.0, max_lease_s=5.0), clock
    )

    async def main():
        granted = await worker.reserve("a", prompt_ids(17, 1), GREEDY, lease_s=60.0)
        assert (granted.lease_s, granted.num_blocks, granted.status) == (
            5.0,
            2,
            RequestStatus.RESERVED,
        )
        await worker.reserve("b", prompt_ids(40, 2), GREEDY, lease_s=1.0, timeout_s=0.5)
        with pytest.raises(InvalidRequestError, match="lease must be positive"):
            await worker.reserve("c", [1, 2], GREEDY, lease_s=0.0)
        with pytest.raises(TimeoutError):
            await worker.reserve("c", [1, 2], GREEDY, timeout_s=-1.0)
        stats = await worker.stats()
        assert [(r.request_id, r.lease_s) for r in stats.reservations] == [("a", 5.0), ("b", 1.0)]
        assert stats.num_blocks_used == 5

        clock.now += 0.5  # b's deadline, before its lease
        assert worker.expire_overdue() == ["b"]
        clock.now += 4.0
        assert worker.expire_overdue() == []
        clock.now += 0.5  # a's (shortened) lease
        assert worker.expire_overdue() == ["a"]
        stats = await worker.stats()
        assert stats.num_blocks_used == 0 and stats.reservations == []
        assert await worker.release("a") == (False, 0)

    asyncio.run(main())
    asyncio.run(worker.stop())
    assert_no_leaks(worker.engine)


def test_a_stream_waiting_on_a_reservation_ends_when_its_lease_does(tiny_llama):
    clock = FakeClock()
    worker = DecodeWorker(make_engine(tiny_llama), DecodeConfig(), clock)

    async def main():
        await worker.reserve("a", prompt_ids(5, 3), GREEDY, lease_s=2.0)
        events = worker.stream("a")
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.01)
        assert not pending.done()
        clock.now += 2.0
        worker.expire_overdue()
        assert await pending == Finished(FinishReason.ABORT, 0)
        await events.aclose()
        assert (await worker.stats()).num_blocks_used == 0

    asyncio.run(main())
    asyncio.run(worker.stop())
    assert_no_leaks(worker.engine)


def test_load_meter_reports_mean_step_and_busy_share_of_the_window():
    clock = FakeClock()
    meter = LoadMeter(1.0, clock)
    assert meter.snapshot() == (0.0, 0.0)
    meter.record(99.0, 99.2)  # straddles the window's start: only 0.1 s of it counts
    meter.record(99.5, 99.6)
    meter.record(99.8, 100.0)
    clock.now = 100.1
    step, busy = meter.snapshot()
    assert step == pytest.approx((0.2 + 0.1 + 0.2) / 3)
    assert busy == pytest.approx(0.1 + 0.1 + 0.2)
    clock.now = 101.5
    assert meter.snapshot() == (0.0, 0.0)


def test_load_meter_counts_the_step_in_flight_as_busy():
    clock = FakeClock()
    meter = LoadMeter(1.0, clock)
    meter.begin(98.0)  # a 3 s prefill step, still running: busy, not idle until it ends,
    clock.now = 100.0  # and as long as it has run so far (a step, not a short one)
    assert meter.snapshot() == (2.0, 1.0)
    meter.end()
    meter.record(98.0, 100.0)
    meter.begin(100.2)
    clock.now = 100.5
    step, busy = meter.snapshot()
    assert step == pytest.approx(2.0)
    assert busy == pytest.approx(0.5 + 0.3)
    meter.end()
    assert meter.snapshot()[1] == pytest.approx(0.5)


def test_load_meter_reads_a_long_prompts_next_chunk_as_long_as_the_last():
    """A long prompt's chunks run back to back, each longer than the window: just after one
    begins, the step in flight reads as long as the last one, not as the 0.2 s it has run. A
    step that began after a pause reads as long as it has run."""
    clock = FakeClock()
    meter = LoadMeter(1.0, clock)
    meter.begin(90.0)
    meter.end()
    meter.record(90.0, 98.0)  # an 8 s chunk step
    meter.begin(98.01)  # the next chunk, at once
    clock.now = 99.2  # the 8 s step left the window at 99.0
    step, busy = meter.snapshot()
    assert step == pytest.approx(8.0) and busy == pytest.approx(1.0)
    clock.now = 107.0
    assert meter.snapshot()[0] == pytest.approx(8.99)  # longer than the last: so far
    meter.end()
    meter.record(98.01, 107.0)
    meter.begin(110.0)  # after a pause: a new prompt
    clock.now = 110.2
    assert meter.snapshot() == (pytest.approx(0.2), pytest.approx(0.2))


def test_mixed_worker_prefills_locally_and_streams_every_token(tiny_llama):
    engine = make_engine(tiny_llama)
    prompts = [prompt_ids(n, seed) for seed, n in enumerate((5, 40, 70))]
    expected = [c.token_ids for c in make_engine(tiny_llama).generate(prompts, GREEDY)]
    worker = DecodeWorker(engine, DecodeConfig(prefill_locally=True))

    async def run(request_id: str, prompt: list[int]) -> tuple[list[int], Finished]:
        granted = await worker.reserve(request_id, prompt, GREEDY, prefill_locally=True)
        assert granted.status is RequestStatus.RUNNING  # no transfer to wait for
        tokens, last = [], None
        async for event in worker.stream(request_id):
            if isinstance(event, Finished):
                last = event
            else:
                tokens += event.token_ids
        return tokens, last

    async def main():
        await worker.start()
        try:
            # Concurrent: the three prompts prefill and decode in one continuous batch.
            results = await asyncio.gather(*(run(f"r{i}", p) for i, p in enumerate(prompts)))
            assert [tokens for tokens, _ in results] == expected
            assert all(last.reason is FinishReason.LENGTH for _, last in results)
            assert [last.num_completion_tokens for _, last in results] == [12, 12, 12]
            # The same 40-token prompt again: its two full blocks come from the prefix cache.
            tokens, last = await run("again", prompts[1])
            assert (tokens, last.num_cached_tokens) == (expected[1], 32)
            assert (await worker.stats()).reservations == []
        finally:
            await worker.stop()

    asyncio.run(main())
    assert_no_leaks(worker.engine)


def test_decode_only_worker_refuses_local_prefill(tiny_llama):
    worker = DecodeWorker(make_engine(tiny_llama))

    async def main():
        with pytest.raises(ConfigError, match="only a mixed worker prefills locally"):
            await worker.reserve("a", prompt_ids(8, 1), GREEDY, prefill_locally=True)
        assert (await worker.stats()).num_blocks_used == 0

    asyncio.run(main())
    asyncio.run(worker.stop())
    assert_no_leaks(worker.engine)


def test_a_decode_worker_resumes_a_request_from_the_tokens_its_client_has(tiny_llama):
    """Any worker role prefills a resumed request itself and streams the tokens after those it
    was given; tokens that end it already get just its end; a resume that cannot have come
    from this request is refused before anything is held."""
    prompt = prompt_ids(40, 3)
    [whole] = make_engine(tiny_llama).generate([prompt], GREEDY)
    worker = DecodeWorker(make_engine(tiny_llama))  # a decode worker, not a mixed one

    async def main():
        await worker.start()
        try:
            have = tuple(whole.token_ids[:5])
            granted = await worker.reserve("r", prompt, GREEDY, resume_output_token_ids=have)
            assert granted.status is RequestStatus.RUNNING and granted.prefilling_locally
            tokens, last = [], None
            async for event in worker.stream("r"):
                if isinstance(event, Finished):
                    last = event
                else:
                    tokens += event.token_ids
            assert list(have) + tokens == whole.token_ids
            assert last.reason is FinishReason.LENGTH
            # Every token already: its stream just says how it ended, holding nothing.
            await worker.reserve("s", prompt, GREEDY, resume_output_token_ids=whole.token_ids)
            events = [event async for event in worker.stream("s")]
            assert events == [Finished(FinishReason.LENGTH, len(whole.token_ids))]
            with pytest.raises(InvalidRequestError, match="past max_tokens"):
                await worker.reserve("t", prompt, GREEDY, resume_output_token_ids=[5] * 99)
            stats = await worker.stats()
            assert stats.num_blocks_used == 0 and stats.reservations == []
        finally:
            await worker.stop()

    asyncio.run(main())
    assert_no_leaks(worker.engine)


def test_release_during_an_import_waits_for_the_copy_then_frees(tiny_llama):
    """KV is copied in off the engine thread; an abort in the middle of a copy must not free
    the blocks under it (they could go to another request while the copy still writes)."""
    import threading
    import time

    from services.decode.transfer import LayerChunk, TransferHeader
    from tests.decode.helpers import PrefillSide, tensor_bytes

    engine = make_engine(tiny_llama)
    worker = DecodeWorker(engine)
    prompt = prompt_ids(40, 3)
    side = PrefillSide(tiny_llama)
    side.prefill("r", prompt, GREEDY)
    data, layout = side.engine.export_kv("r", 0)
    copying, events = threading.Event(), []
    real_import = engine.import_kv

    def slow_import(*args):
        copying.set()
        time.sleep(0.3)
        real_import(*args)
        events.append("copied")

    engine.import_kv = slow_import
    real_abort = engine.abort
    engine.abort = lambda rid: (events.append("aborted"), real_abort(rid))[1]

    async def frames(reservation_id):
        yield TransferHeader("r", reservation_id, layout, engine.spec.num_layers)
        yield LayerChunk(0, 0, data.shape[1], tensor_bytes(data))
        await asyncio.sleep(10)  # the rest never comes

    async def main():
        await worker.start()
        try:
            granted = await worker.reserve("r", prompt, GREEDY)
            receiving = asyncio.create_task(worker.receive(frames(granted.reservation_id)))
            await asyncio.to_thread(copying.wait, 5)
            assert await worker.release("r") == (True, 3)  # waited for the copy, then freed
            assert events == ["copied", "aborted"]
            with pytest.raises(RequestNotFoundError, match="reservation of .r. was released"):
                await receiving
        finally:
            await worker.stop()

    asyncio.run(main())
    assert_no_leaks(worker.engine)


def mixed_worker_with_held_steps(tiny_llama):
    """A mixed worker whose every step waits until ``release`` is set; ``stepping`` is set once
    a step has started (the engine thread is then inside it)."""
    import threading

    engine = make_engine(tiny_llama)
    worker = DecodeWorker(engine, DecodeConfig(prefill_locally=True))
    release, stepping = threading.Event(), threading.Event()
    real_step = engine.step

    def long_step(*args):
        stepping.set()
        release.wait(10)
        return real_step(*args)

    engine.step = long_step
    return worker, stepping, release


def test_load_report_does_not_wait_for_a_long_step(tiny_llama):
    """A mixed worker's step over a long prompt takes seconds; its load reports must keep
    flowing meanwhile, or the router takes it for dead."""
    worker, stepping, release = mixed_worker_with_held_steps(tiny_llama)

    async def main():
        await worker.start()
        try:
            await worker.reserve("r", prompt_ids(70, 1), GREEDY, prefill_locally=True)
            await asyncio.to_thread(stepping.wait, 5)
            load = await asyncio.wait_for(worker.load(), 0.5)  # the step is still blocked
            # The stalled step has not scheduled the prompt yet: it waits, 70 tokens queued.
            queued = (load.num_running_seqs, load.num_waiting_seqs, load.num_queued_prefill_tokens)
            assert queued == (0, 1, 70)
        finally:
            release.set()
            await worker.release("r")
            await worker.stop()

    asyncio.run(main())
    assert_no_leaks(worker.engine)


def test_a_report_names_a_request_once_its_figures_count_it(tiny_llama):
    """The router counts a request it sent on top of a worker's reports until one names it
    (``LoadReport.admitted``): a reservation sent during a long step is admitted only after
    that step, so no report may name it before, and exactly one names it after."""
    worker, stepping, release = mixed_worker_with_held_steps(tiny_llama)

    async def main():
        await worker.start()
        try:
            await worker.reserve("r", prompt_ids(70, 1), GREEDY, prefill_locally=True)
            first = await worker.load()
            assert (first.admitted, first.num_queued_prefill_tokens) == (("r",), 70)
            await asyncio.to_thread(stepping.wait, 5)
            late = asyncio.create_task(
                worker.reserve("s", prompt_ids(40, 2), GREEDY, prefill_locally=True)
            )
            await asyncio.sleep(0.2)  # s waits for the step in flight
            during = await worker.load()
            assert not late.done()
            assert (during.admitted, during.num_queued_prefill_tokens) == ((), 70)
            release.set()
            await asyncio.wait_for(late, 10)
            after = await worker.load()
            assert after.admitted == ("s",)
            assert (await worker.load()).admitted == ()
        finally:
            release.set()
            for request_id in ("r", "s"):
                await worker.release(request_id)
            await worker.stop()

    asyncio.run(main())
    assert_no_leaks(worker.engine)


def test_engine_call_runs_between_steps_and_returns_or_raises(tiny_llama):
    """``engine_call(fn)``: ``fn(engine)`` on the engine thread, never inside a step; its
    result, or its exception, comes back to the caller."""
    import threading

    engine = make_engine(tiny_llama)
    real_step, in_step, threads = engine.step, threading.Event(), set()

    def marked_step(*args):
        in_step.set()
        try:
            return real_step(*args)
        finally:
            in_step.clear()

    engine.step = marked_step
    worker = DecodeWorker(engine, DecodeConfig(prefill_locally=True))

    def probe(e):
        threads.add(threading.current_thread().name)
        return in_step.is_set(), e.snapshot.num_running

    async def main():
        await worker.start()
        try:
            await worker.reserve("r", prompt_ids(30, 2), GREEDY, prefill_locally=True)
            seen = [await worker.engine_call(probe) for _ in range(5)]
            assert all(not stepping for stepping, _ in seen)
            with pytest.raises(RequestNotFoundError):
                await worker.engine_call(lambda e: e.abort("no-such-request"))
            events = [e async for e in worker.stream("r")]
            assert events[-1] == Finished(FinishReason.LENGTH, 12)
            assert (await worker.engine_call(probe)) == (False, 0)
            assert worker.snapshot.engine.num_running == 0
        finally:
            await worker.stop()

    asyncio.run(main())
    assert threads == {"decode-engine"}
    assert_no_leaks(worker.engine)


def test_load_report_counts_layers_and_blocks_hosted_for_another_engine(tiny_llama):
    """DESIGN §5: a helper's report says what it hosts, so the router and the coordinator
    see the memory and compute it spends on other workers."""
    owner, engine = make_engine(tiny_llama), make_engine(tiny_llama)
    worker = DecodeWorker(engine, DecodeConfig())

    async def main():
        await worker.start()
        try:
            before = await worker.load()
            await worker.engine_call(
                lambda e: e.migration.host_layers("A", 1, 4, 8, owner.fingerprint)
            )
            await worker.engine_call(lambda e: e.migration.publish())
            hosting = await worker.load()
            await worker.engine_call(lambda e: e.migration.release_hosted_layers("A"))
            await worker.engine_call(lambda e: e.migration.publish())
            after = await worker.load()
        finally:
            await worker.stop()
        return before, hosting, after

    before, hosting, after = asyncio.run(main())
    assert (before.num_hosted_layers, before.num_hosted_blocks) == (0, 0)
    assert hosting.num_hosted_layers == 3
    assert (after.num_hosted_layers, after.num_hosted_blocks) == (0, 0)
    assert_no_leaks(engine)


def _slow_steps(engine, seconds: float) -> None:
    real_step = engine.step

    def slow(*args):
        time.sleep(seconds)
        return real_step(*args)

    engine.step = slow


def test_a_queued_request_outlasts_the_stream_idle_timeout_while_the_engine_steps(tiny_llama):
    """One sequence at a time, 12 slow steps each: the second request gets no event for much
    longer than the idle timeout, yet the engine steps all along; it finishes."""
    engine = make_engine(tiny_llama, max_num_seqs=1)
    _slow_steps(engine, 0.04)
    worker = DecodeWorker(engine, DecodeConfig(prefill_locally=True, stream_idle_timeout_s=0.15))

    async def run(request_id: str, seed: int) -> list:
        await worker.reserve(request_id, prompt_ids(20, seed), GREEDY, prefill_locally=True)
        return [e async for e in worker.stream(request_id)]

    async def main():
        await worker.start()
        try:
            return await asyncio.gather(run("first", 3), run("second", 4))
        finally:
            await worker.stop()

    first, second = asyncio.run(main())
    assert first[-1] == second[-1] == Finished(FinishReason.LENGTH, 12)
    assert_no_leaks(worker.engine)


def test_a_stream_ends_when_the_engine_makes_no_step_for_the_idle_timeout(tiny_llama):
    engine = make_engine(tiny_llama)
    _slow_steps(engine, 1.0)
    worker = DecodeWorker(engine, DecodeConfig(prefill_locally=True, stream_idle_timeout_s=0.2))

    async def main():
        await worker.start()
        try:
            await worker.reserve("r", prompt_ids(20, 3), GREEDY, prefill_locally=True)
            with pytest.raises(TimeoutError, match="'r': no engine step for 0.2s"):
                async for _ in worker.stream("r"):
                    pass
        finally:
            await worker.stop()

    asyncio.run(main())
    assert_no_leaks(worker.engine)
