"""ReportLoad and ListWorkers over real gRPC, and the client library against the router."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.client import AsyncBanaServeClient, BanaServeClientError
from services.router.core import NoRoomNowError, RouteRequest
from services.router.registry import WorkerStatus
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2
from tests.router.grpc_fakes import cluster

C = grpc.StatusCode


def worker_frame(
    worker_id="d9", role=common_pb2.WORKER_ROLE_DECODE, model="m", address="127.0.0.1:9999"
):
    info = router_pb2.WorkerInfo(
        worker_id=worker_id,
        address=address,
        role=role,
        model=model,
        fingerprint="test-model",
        block_size=16,
        num_kv_blocks=100,
    )
    return router_pb2.ReportLoadRequest(worker=info)


def load_frame(free=90, used=10, running=3):
    load = router_pb2.LoadReport(
        num_kv_blocks_free=free, num_kv_blocks_used=used, num_running_seqs=running
    )
    return router_pb2.ReportLoadRequest(load=load)


async def workers(stub) -> dict[str, router_pb2.Worker]:
    reply = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=2)
    return {w.info.worker_id: w for w in reply.workers}


async def until(predicate, timeout=2.0):
    async def poll():
        while not await predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def test_register_report_list_then_half_close_deregisters():
    async def main():
        async with cluster(prefill=0, decode=0) as c:
            call = c.stub.ReportLoad(timeout=5)
            await call.write(worker_frame())
            await call.write(load_frame())

            async def reported():
                w = (await workers(c.stub)).get("d9")
                return w is not None and w.HasField("last_load")

            await until(reported)
            w = (await workers(c.stub))["d9"]
            assert w.state == router_pb2.WORKER_STATE_ACTIVE
            assert (w.info.role, w.info.model) == (common_pb2.WORKER_ROLE_DECODE, "m")
            load = w.last_load
            assert (load.num_kv_blocks_free, load.num_kv_blocks_used) == (90, 10)
            assert load.num_running_seqs == 3
            assert c.router.workers()[0].num_free_blocks == 90
            assert w.num_waiting_for_room == 0
            # 95 blocks: more than the 90 free now, fewer than its 100: it waits for d9's room.
            with pytest.raises(NoRoomNowError):
                c.router.route(RouteRequest("r1", tuple(range(1500)), 20, decode_only=True))
            assert (await workers(c.stub))["d9"].num_waiting_for_room == 1

            await call.done_writing()
            assert await call == router_pb2.ReportLoadResponse()
            assert await workers(c.stub) == {}
            assert c.router.workers()[0].status is WorkerStatus.REMOVED
            assert "deregistered" in c.router.workers()[0].removed_reason

    asyncio.run(main())


def test_broken_report_stream_removes_the_worker():
    async def main():
        async with cluster(prefill=0, decode=0) as c:
            call = c.stub.ReportLoad(timeout=5)
            await call.write(worker_frame())
            await call.write(load_frame())
            await until(lambda: _has(c.stub, "d9"))
            call.cancel()

            async def removed():
                return c.router.workers()[0].status is WorkerStatus.REMOVED

            await until(removed)
            assert c.router.workers()[0].removed_reason == "report stream broke"

    asyncio.run(main())


async def _has(stub, worker_id):
    return worker_id in await workers(stub)


def test_silent_worker_goes_stale_then_recovers_on_its_next_report():
    async def main():
        async with cluster(prefill=0, decode=0, report_timeout_s=0.2) as c:
            call = c.stub.ReportLoad(timeout=5)
            await call.write(worker_frame())
            await call.write(load_frame())
            await asyncio.sleep(0.3)
            assert (await workers(c.stub))["d9"].state == router_pb2.WORKER_STATE_STALE
            await call.write(load_frame(free=80, used=20))

            async def active():
                return (await workers(c.stub))["d9"].state == router_pb2.WORKER_STATE_ACTIVE

            await until(active)
            call.cancel()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("frames", "code", "message"),
    [
        ([load_frame()], C.INVALID_ARGUMENT, "first ReportLoad frame must be `worker`"),
        ([worker_frame(), worker_frame()], C.INVALID_ARGUMENT, "must be `load`"),
        (
            [worker_frame(role=common_pb2.WORKER_ROLE_UNSPECIFIED)],
            C.INVALID_ARGUMENT,
            "has no role",
        ),
        ([worker_frame(), load_frame(free=100, used=10)], C.INVALID_ARGUMENT, "110 KV blocks"),
    ],
)
def test_bad_report_streams_end_at_once(frames, code, message):
    async def main():
        async with cluster(prefill=0, decode=0) as c:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.stub.ReportLoad(iter(frames), timeout=2)
            assert info.value.code() == code
            assert message in info.value.details()
            assert await workers(c.stub) == {}

    asyncio.run(main())


def test_second_connection_with_the_same_worker_id_is_already_exists():
    async def main():
        async with cluster(prefill=0, decode=0) as c:
            first = c.stub.ReportLoad(timeout=5)
            await first.write(worker_frame())
            await until(lambda: _has(c.stub, "d9"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.stub.ReportLoad(iter([worker_frame()]), timeout=2)
            assert info.value.code() == C.ALREADY_EXISTS
            assert await _has(c.stub, "d9")  # the first connection is untouched
            first.cancel()

    asyncio.run(main())


def test_a_second_worker_at_a_connected_workers_address_is_already_exists():
    """Two workers told to advertise one address (found by a probe: ``up --decode 2
    --decode-args "--advertise X"``): the router would send the second's calls to the first.
    Refused while the first is connected; once it has gone, the address is free again."""

    async def main():
        async with cluster(prefill=0, decode=0) as c:
            first = c.stub.ReportLoad(timeout=5)
            await first.write(worker_frame("d9"))
            await until(lambda: _has(c.stub, "d9"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.stub.ReportLoad(iter([worker_frame("d8")]), timeout=2)
            assert info.value.code() == C.ALREADY_EXISTS
            assert "'127.0.0.1:9999' is registered by worker 'd9'" in info.value.details()
            assert set(await workers(c.stub)) == {"d9"}
            await first.done_writing()
            await first
            second = c.stub.ReportLoad(timeout=5)
            await second.write(worker_frame("d8"))
            await until(lambda: _has(c.stub, "d8"))
            second.cancel()

    asyncio.run(main())


def test_a_call_silent_past_the_report_timeout_is_replaced_by_the_workers_new_one():
    """A worker whose report connection died without closing reconnects within its own
    keepalive, while this server finds the old call dead only after 10 s + 5 s: a new call of
    the same worker (id and address) replaces one that has sent nothing for longer than the
    report timeout, and the old call's end does not remove the new registration. Refused
    before (ALREADY_EXISTS until the old call ended: "strand workers → router" recovered in
    ~15 s, session 28)."""

    async def main():
        async with cluster(prefill=0, decode=0, report_timeout_s=0.3) as c:
            first = await reporting(c.stub)
            with pytest.raises(grpc.aio.AioRpcError) as info:  # still reporting: refused
                await c.stub.ReportLoad(iter([worker_frame("d9")]), timeout=2)
            assert info.value.code() == C.ALREADY_EXISTS
            await asyncio.sleep(0.5)  # silent past the report timeout (a stalled connection)
            second = c.stub.ReportLoad(timeout=10)
            await second.write(worker_frame("d9"))
            await second.write(load_frame(free=70, used=30))
            await until(lambda: _free(c.stub, "d9", 70))
            with pytest.raises(grpc.aio.AioRpcError) as ended:  # the old call ended here
                await asyncio.wait_for(first, 5)
            assert ended.value.code() == C.ABORTED
            assert "replaced by the worker's new call" in ended.value.details()
            await asyncio.sleep(0.1)
            assert set(await workers(c.stub)) == {"d9"}  # its end removed nothing
            await second.write(load_frame(free=60, used=40))  # the new call goes on
            await until(lambda: _free(c.stub, "d9", 60))
            await second.done_writing()
            await second
            assert await workers(c.stub) == {}

    asyncio.run(main())


@pytest.mark.parametrize(
    "other",
    [worker_frame("d8"), worker_frame("d9", address="127.0.0.1:9998")],
    ids=["another id at its address", "its id at another address"],
)
def test_another_worker_never_replaces_a_silent_call(other):
    """Found by a probe: a worker told to ``--advertise`` another's address (or to use its
    ``--worker-id``) took that worker's place as soon as it paused past the report timeout (a
    SIGSTOP of 4 s), and the rightful worker was refused from then on. Only the same worker
    (id and address) replaces its own silent call."""

    async def main():
        async with cluster(prefill=0, decode=0, report_timeout_s=0.3) as c:
            first = await reporting(c.stub)
            await asyncio.sleep(0.5)  # silent past the report timeout
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.stub.ReportLoad(iter([other, load_frame()]), timeout=2)
            assert info.value.code() == C.ALREADY_EXISTS
            await first.write(load_frame(free=50, used=50))  # the paused worker goes on
            await until(lambda: _free(c.stub, "d9", 50))
            assert set(await workers(c.stub)) == {"d9"}
            first.cancel()

    asyncio.run(main())


async def reporting(stub, worker_id="d9"):
    """A ReportLoad call that registered ``worker_id`` and sent one report; listed."""
    call = stub.ReportLoad(timeout=10)
    await call.write(worker_frame(worker_id))
    await call.write(load_frame())
    await until(lambda: _has(stub, worker_id))
    return call


async def _free(stub, worker_id, n):
    w = (await workers(stub)).get(worker_id)
    return w is not None and w.last_load.num_kv_blocks_free == n


def test_different_model_is_rejected():
    async def main():
        async with cluster(prefill=0, decode=0) as c:
            first = c.stub.ReportLoad(timeout=5)
            await first.write(worker_frame(model="a"))
            await until(lambda: _has(c.stub, "d9"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                frame = worker_frame("d8", model="b", address="127.0.0.1:9998")
                await c.stub.ReportLoad(iter([frame]), timeout=2)
            assert info.value.code() == C.INVALID_ARGUMENT
            assert "serves model 'b'; this router serves 'a'" in info.value.details()
            first.cancel()

    asyncio.run(main())


def test_client_library_generates_lists_and_raises_with_the_status():
    async def main():
        async with cluster() as c:
            address = c.stub._router_address  # set by the fixture
            async with AsyncBanaServeClient(address) as client:
                stream = client.generate([1, 2, 3], max_tokens=4, temperature=0.0, timeout_s=5)
                deltas = [d async for d in stream]
                assert [d.token_ids for d in deltas] == [(7,), (8,), (9,), (10,)]
                result = stream.result
                assert result.token_ids == (7, 8, 9, 10)
                assert result.text == "<7><8><9><10>"
                assert result.finish_reason == "length"
                assert (result.prefill_worker_id, result.decode_worker_id) == ("p0", "d0")
                assert 0 < result.ttft_s <= result.total_s and result.tokens_per_s > 0
                with pytest.raises(BanaServeClientError) as info:
                    await client.complete([1], top_p=2.0, timeout_s=5)
                assert info.value.code == C.INVALID_ARGUMENT
                assert "top_p must be in (0, 1]" in info.value.message
                with pytest.raises(BanaServeClientError) as info:
                    await client.abort("nope")
                assert info.value.code == C.NOT_FOUND
                # Fake workers are registered on the core directly, with no ReportLoad call.
                assert await client.list_workers() == []

    asyncio.run(main())
