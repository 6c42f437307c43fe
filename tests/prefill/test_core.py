"""PrefillWorker without grpc: ``engine_call`` and the loop's snapshot."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.common.errors import DependencyUnavailableError, RequestNotFoundError
from services.prefill.core import PrefillWorker
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
