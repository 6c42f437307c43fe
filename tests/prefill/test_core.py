"""PrefillWorker without grpc: ``engine_call`` and the loop's snapshot."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.common.errors import DependencyUnavailableError, RequestNotFoundError
from services.common.types import SamplingParams
from services.prefill.core import PrefillWorker
from services.prefill.jobs import PrefillRequest
from services.prefill.transport import KVTarget
from tests.engine.helpers import assert_no_leaks, make_engine


class NoTransport:
    async def close(self) -> None:
        pass


def test_engine_call_runs_on_the_engine_thread_and_returns_or_raises(tiny_llama):
    worker = PrefillWorker(make_engine(tiny_llama), NoTransport())

    async def main():
        worker.start()
        name = await worker.engine_call(lambda e: threading.current_thread().name)
        blocks = await worker.engine_call(lambda e: e.snapshot.num_blocks)
        with pytest.raises(RequestNotFoundError):
            await worker.engine_call(lambda e: e.abort("no-such-request"))
        assert worker.snapshot.num_commands == 3
        await worker.stop()
        with pytest.raises(DependencyUnavailableError, match="prefill engine loop has stopped"):
            await worker.engine_call(lambda e: None)
        return name, blocks

    assert asyncio.run(main()) == ("prefill-engine", 256)
    assert_no_leaks(worker.engine)


class HeldTransport(NoTransport):
    """Opens no transfer until ``go`` is set, then fails it: the request stays queued."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def open(self, target, request_id, num_layers, timeout_s):
        await self.go.wait()
        raise ConnectionError("no decode worker here")


def test_a_report_names_each_queued_request_once(tiny_llama):
    """A prefill worker's queue is read live: the first report after a request arrives counts
    it and names it (``LoadReport.admitted``: the router stops adding it on top), the next
    one counts it without naming it again."""
    transport = HeldTransport()
    worker = PrefillWorker(make_engine(tiny_llama), transport)
    target = KVTarget("d0", "127.0.0.1:1", "res-1")
    params = SamplingParams(temperature=0, max_tokens=4)

    async def main():
        worker.start()
        try:
            assert (await worker.load()).admitted == ()
            calls = [
                asyncio.create_task(
                    _drain(worker.prefill(PrefillRequest(i, [1] * n, params, target)))
                )
                for i, n in (("a", 30), ("b", 12))
            ]
            await asyncio.sleep(0.1)
            first, second = await worker.load(), await worker.load()
            assert (first.admitted, first.num_queued_prefill_tokens) == (("a", "b"), 42)
            assert (second.admitted, second.num_queued_prefill_tokens) == ((), 42)
            transport.go.set()
            for call in calls:
                with pytest.raises(ConnectionError):
                    await call
            assert (await worker.load()).num_queued_prefill_tokens == 0
        finally:
            await worker.stop()

    asyncio.run(main())
    assert_no_leaks(worker.engine)


async def _drain(frames) -> None:
    async for _ in frames:
        pass
