"""Store write-backs wait for an idle worker (or their deadline), one at a time, bounded."""

from __future__ import annotations

import asyncio

import pytest

from services.prefill.write_backs import WriteBacks, WritePolicy, blocks_to_write
from tests.prefill.helpers import wait_for


class Recorder:
    def __init__(self) -> None:
        self.done: list[str] = []
        self.running = 0
        self.most_at_once = 0

    def job(self, name: str, fail: bool = False, evicted: bool = False):
        async def run() -> bool:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            await asyncio.sleep(0.01)
            self.running -= 1
            if fail:
                raise RuntimeError("a defect in a write-back")
            self.done.append(name)
            return not evicted

        return run


def test_write_backs_wait_for_an_idle_worker_and_run_one_at_a_time():
    async def main():
        busy, rec = [True], Recorder()
        wb = WriteBacks(lambda: busy[0], max_delay_s=30.0, max_bytes=1000)
        for name in ("a", "b", "c"):
            wb.add(rec.job(name), 100)
        await asyncio.sleep(0.1)
        assert rec.done == [] and wb.stats.num_pending == 3  # busy: nothing ran
        assert wb.stats.num_bytes_pending == 300
        busy[0] = False
        wb.kick()  # what the worker does as a request ends
        await wait_for(lambda: len(rec.done) == 3)
        assert rec.done == ["a", "b", "c"] and rec.most_at_once == 1
        assert (wb.stats.num_done, wb.stats.num_pending, wb.stats.num_bytes_pending) == (3, 0, 0)
        await wb.close()

    asyncio.run(main())


def test_a_worker_that_is_never_idle_writes_back_after_the_delay():
    async def main():
        rec = Recorder()
        wb = WriteBacks(lambda: True, max_delay_s=0.2, max_bytes=1000)
        loop = asyncio.get_running_loop()
        start = loop.time()
        wb.add(rec.job("a"), 10)
        await wait_for(lambda: rec.done == ["a"])
        assert 0.18 <= loop.time() - start < 1.0
        # max_delay_s 0: at once, busy or not
        now = WriteBacks(lambda: True, max_delay_s=0.0, max_bytes=1000)
        now.add(rec.job("b"), 10)
        await wait_for(lambda: rec.done == ["a", "b"], within_s=0.15)
        await wb.close()
        await now.close()

    asyncio.run(main())


def test_pending_kv_is_bounded_by_dropping_the_oldest():
    async def main():
        busy, rec = [True], Recorder()
        wb = WriteBacks(lambda: busy[0], max_delay_s=30.0, max_bytes=250)
        wb.add(rec.job("a"), 100)
        wb.add(rec.job("b"), 100)
        wb.add(rec.job("c"), 100)  # 300 > 250: "a" goes
        wb.add(rec.job("huge"), 251)  # alone over the bound: never queued
        assert (wb.stats.num_dropped, wb.stats.num_pending, wb.stats.num_bytes_pending) == (
            2,
            2,
            200,
        )
        busy[0] = False
        wb.kick()
        await wait_for(lambda: len(rec.done) == 2)
        assert rec.done == ["b", "c"]
        await wb.close()

    asyncio.run(main())


def test_a_failing_write_back_does_not_stop_the_next_and_close_drops_the_rest():
    async def main():
        busy, rec = [False], Recorder()
        wb = WriteBacks(lambda: busy[0], max_delay_s=30.0, max_bytes=1000)
        wb.add(rec.job("bad", fail=True), 10)
        wb.add(rec.job("gone", evicted=True), 10)  # its blocks had left the prefix cache
        wb.add(rec.job("good"), 10)
        await wait_for(lambda: rec.done == ["gone", "good"])
        assert (wb.stats.num_done, wb.stats.num_evicted, wb.stats.num_bytes_pending) == (1, 1, 0)
        busy[0] = True
        wb.add(rec.job("late"), 10)
        await wb.close()  # pending: dropped, nothing left running
        assert (wb.stats.num_dropped, wb.stats.num_pending, wb.stats.num_bytes_pending) == (1, 0, 0)
        await asyncio.sleep(0.05)
        assert rec.done == ["gone", "good"]

    asyncio.run(main())


def test_negative_bounds_are_refused():
    for delay, size in ((-1.0, 10), (1.0, -1)):
        with pytest.raises(ValueError, match="must be >= 0"):
            WriteBacks(lambda: False, delay, size)


@pytest.mark.parametrize(
    ("policy", "known", "seen", "full", "expected"),
    [
        (WritePolicy.REUSED, 0, 0, 7, range(0)),  # first sight: nothing
        (WritePolicy.REUSED, 0, 6, 7, range(0, 6)),  # the reused prefix, not the tail
        (WritePolicy.REUSED, 6, 6, 7, range(6, 6)),  # the store has all that is reused
        (WritePolicy.REUSED, 2, 9, 7, range(2, 7)),  # seen past the full blocks: capped
        (WritePolicy.ALL, 0, 0, 7, range(0, 7)),
        (WritePolicy.ALL, 7, 7, 7, range(7, 7)),
    ],
)
def test_the_write_policy_picks_the_blocks(policy, known, seen, full, expected):
    assert blocks_to_write(policy, known, seen, full) == expected
