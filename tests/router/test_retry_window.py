"""The router's retries of a request whose worker was lost before it produced a token
(``DriverConfig.retry_window_s``, services/router/driver.py): a worker unreachable for a
while, its report stream up, is tried again with a growing wait until it answers."""

from __future__ import annotations

import asyncio

import grpc

from services.router.registry import WorkerRole, WorkerStatus
from services.rpc.gen.banaserve.v1 import common_pb2
from tests.router.grpc_fakes import cluster
from tests.router.test_generate import collect, request


async def _unreachable_for(c, worker_id: str, role: WorkerRole, seconds: float) -> None:
    """``worker_id`` answers UNAVAILABLE for ``seconds`` (a link cut), while its report stream
    stays up: whenever the router removes it, its next report (0.05 s) registers it again."""
    address = {w.worker_id: w.address for w in c.router.workers()}[worker_id]
    c.workers[worker_id].dead = True
    loop = asyncio.get_running_loop()
    back_at = loop.time() + seconds
    while loop.time() < back_at + 1.0:
        if loop.time() >= back_at:
            c.workers[worker_id].dead = False
        status = {w.worker_id: w.status for w in c.router.workers()}[worker_id]
        if status is WorkerStatus.REMOVED:
            c.add(worker_id, role, address)
        await asyncio.sleep(0.05)


def test_a_prefill_worker_unreachable_for_a_while_is_tried_again_until_it_answers(caplog):
    """A link to the only prefill worker cut for 0.8 s: the request is routed to it again with a
    growing wait (0, 0.1, 0.2, 0.4, ... s) and completes; one retry at once (before session 27)
    failed it UNAVAILABLE."""

    async def main():
        async with cluster(prefill=1, decode=1) as c:
            outage = asyncio.create_task(_unreachable_for(c, "p0", WorkerRole.PREFILL, 0.8))
            await asyncio.sleep(0)
            frames = await collect(c.stub.Generate(request(), timeout=10))
            assert frames[0].started.prefill_worker_id == "p0"
            assert [list(f.delta.token_ids) for f in frames[1:5]] == [[7], [8], [9], [10]]
            assert frames[-1].finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
            retries = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
            assert len(retries) >= 3, retries
            await outage
            assert c.driver.num_running == 0 and c.router.num_inflight() == 0

    asyncio.run(main())


def test_a_decode_worker_unreachable_for_a_while_after_tokens_is_resumed_once_it_answers():
    """The decode worker's stream breaks after its first delta and the worker stays unreachable
    for 0.8 s: the resumed try's reservations fail (no resume spent on them) until it answers,
    then the request goes on from the tokens the caller has, on the same worker."""

    async def main():
        async with cluster(prefill=1, decode=1, max_resumes=1, tokens=(7, 8, 9, 10)) as c:
            c.workers["d0"].die_after_deltas = 1
            call = c.stub.Generate(request(), timeout=10)
            frames = [await call.read()]  # started
            frames.append(await call.read())  # the first token (from the prefill worker)
            frames.append(await call.read())  # the decode worker's first delta, then it "dies"
            c.workers["d0"].die_after_deltas = None
            outage = asyncio.create_task(_unreachable_for(c, "d0", WorkerRole.DECODE, 0.8))
            while (frame := await call.read()) is not grpc.aio.EOF:
                frames.append(frame)
            tokens = [t for f in frames if f.HasField("delta") for t in f.delta.token_ids]
            assert tokens == [7, 8, 9, 10]
            assert frames[-1].finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert c.workers["d0"].resumed == {"r1": 2}
            await outage
            assert c.driver.num_running == 0 and c.router.num_inflight() == 0

    asyncio.run(main())
