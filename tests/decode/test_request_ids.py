"""Issue 8, item 3 on a decode worker: the id of a request that ended (or is ending) may be
reserved again, and the old request's leftovers never reach the new one."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import AlreadyExistsError
from services.decode.core import DecodeConfig, DecodeWorker, RequestStatus
from tests.decode.helpers import GREEDY, prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine

QUICK = DecodeConfig(id_reuse_wait_s=0.2)


def test_an_id_released_while_a_new_reserve_waits_is_reserved_again(tiny_llama):
    worker = DecodeWorker(make_engine(tiny_llama), QUICK)

    async def main():
        await worker.start()
        old = await worker.reserve("a", prompt_ids(40, 1), GREEDY)
        old_engine_id = worker.engine_id("a")
        again = asyncio.create_task(worker.reserve("a", prompt_ids(20, 2), GREEDY))
        await asyncio.sleep(0.05)  # the new reserve now waits for the old request
        assert not again.done()
        assert await worker.release("a") == (True, 3)
        new = await again
        new_engine_id = worker.engine_id("a")
        stats = await worker.stats()
        await worker.stop()
        return old, old_engine_id, new, new_engine_id, stats

    old, old_engine_id, new, new_engine_id, stats = asyncio.run(main())
    assert old.reservation_id != new.reservation_id
    assert (old_engine_id, new_engine_id) == ("a#1", "a#2")  # the engine never sees one twice
    assert [(r.request_id, r.num_blocks) for r in stats.reservations] == [("a", 2)]
    assert stats.num_blocks_used == 2
    assert_no_leaks(worker.engine)


def test_an_id_still_running_after_the_wait_is_already_exists(tiny_llama):
    worker = DecodeWorker(make_engine(tiny_llama), QUICK)

    async def main():
        await worker.start()
        await worker.reserve("a", prompt_ids(40, 3), GREEDY)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(AlreadyExistsError) as err:
            await worker.reserve("a", prompt_ids(20, 4), GREEDY)
        waited = loop.time() - started
        stats = await worker.stats()
        await worker.stop()
        return str(err.value), waited, stats

    message, waited, stats = asyncio.run(main())
    assert message == "request id 'a' already exists here (still running)"
    assert 0.2 <= waited < 1.0
    assert [r.status for r in stats.reservations] == [RequestStatus.RESERVED]  # the old one
    assert_no_leaks(worker.engine)


def test_an_ended_request_nobody_streamed_gives_way_to_a_new_one(tiny_llama):
    """A request that finished before its stream opened keeps its tokens for that stream; a
    new reserve of its id replaces it (the old tokens are dropped), and the new stream gets
    the new request's tokens."""
    worker = DecodeWorker(make_engine(tiny_llama), DecodeConfig(prefill_locally=True))
    prompt = prompt_ids(20, 5)

    async def main():
        await worker.start()
        await worker.reserve("a", prompt, GREEDY, prefill_locally=True)
        await worker.ended("a").wait()  # finished, unread
        await worker.reserve("a", prompt, GREEDY, prefill_locally=True)
        events = [event async for event in worker.stream("a")]
        await worker.stop()
        return events

    events = asyncio.run(main())
    tokens = [t for e in events[:-1] for t in e.token_ids]
    (expected,) = make_engine(tiny_llama).generate([prompt], GREEDY)
    assert tokens == expected.token_ids
    assert events[-1].num_completion_tokens == GREEDY.max_tokens
    assert_no_leaks(worker.engine)
