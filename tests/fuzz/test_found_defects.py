"""One focused test per defect the fuzzer found (docs/reliability.md), each on an in-process
server or the function at fault, so it runs in seconds and names the input that failed:

1. DecodeService.Release with a ReleaseReason this build does not know (proto3 enums are open)
   answered INTERNAL: the servicer's log line called ``ReleaseReason.Name``, which raises.
2. KVStoreService.Pin of nothing answered a non-zero pin_id and kept an empty pin until its TTL
   (kvstore.proto: "0 when nothing was pinned"), so a caller trusting the contract left one
   behind per miss.
3. A Prefill whose target address was not HOST:PORT answered INTERNAL (the data plane's
   address parser raised ValueError, a port over 65535 OverflowError), and a worker registering
   with the port "²" made ReportLoad answer INTERNAL (``str.isdigit`` takes it, ``int`` does not).
4. A Generate whose deadline had passed by the time the router read it (grpc-aio says 0 s
   left) ran with the driver's default timeout of 600 s instead; its client was long gone, so
   the router cancelled it, and a cancel that arrived while the decode worker was reserving
   left the reservation (blocks included) held for the whole 30 s lease. Both halves are fixed:
   such a request is refused with DEADLINE_EXCEEDED before it reserves, and a request cancelled
   during ReserveKV releases what the call may have reserved.
5. A decode worker's Release cancelled while its abort waited for the engine thread (a step
   in progress; the router gives up on a slow Release) cancelled the queued abort with it: the
   entry was gone, so nothing freed its blocks ever again (1 block per occurrence, found by
   the leak check after ~500 router inputs with deadlines of a few milliseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from contextlib import asynccontextmanager

import grpc
import pytest

from services.common.errors import InvalidRequestError
from services.common.limits import check_address
from services.decode.core import DecodeWorker
from services.prefill.servicer import request_from_proto
from services.router.clients import GrpcWorkerClients
from services.router.core import Router, RouterConfig
from services.router.driver import DriverConfig, RequestDriver
from services.router.registry import WorkerRole
from services.router.servicer import RouterServicer
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    decode_pb2,
    kvstore_pb2,
    prefill_pb2,
    router_pb2,
    router_pb2_grpc,
)
from services.rpc.server import start_server
from tests.decode.helpers import GREEDY, assert_clean, decode_server
from tests.engine.helpers import make_engine
from tests.kvstore.conftest import kv_prefix, redis_server  # noqa: F401 (fixtures)
from tests.kvstore.test_servicer import HASHES, LAYER_BYTES, served_node
from tests.router.factories import capacity, load
from tests.router.grpc_fakes import (
    RPC,
    CallLog,
    FakeWorker,
    cluster,
    router_service,
    worker_services,
)

C = grpc.StatusCode


def test_release_with_an_unknown_reason_answers_ok(tiny_llama):
    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            request = decode_pb2.ReleaseRequest(request_id="r", reason=32230408)
            reply = await stub.Release(request, timeout=5)
            assert (reply.found, reply.num_blocks_freed) == (False, 0)
            await assert_clean(stub)

    asyncio.run(main())


def test_pin_of_nothing_holds_no_pin_and_answers_id_zero(redis_server, kv_prefix):  # noqa: F811
    async def main():
        async with served_node(redis_server.url, kv_prefix, 8 * LAYER_BYTES) as (stub, _):
            for hashes in ([], HASHES[:2]):  # nothing asked; nothing committed
                pin = await stub.Pin(kvstore_pb2.PinRequest(block_hashes=hashes))
                assert (pin.pin_id, pin.num_pinned, pin.num_layers) == (0, 0, 0)
            stats = await stub.Stats(kvstore_pb2.KVStoreServiceStatsRequest())
            assert (stats.num_pins, stats.num_reservations) == (0, 0)

    asyncio.run(main())


@pytest.mark.parametrize(
    "address",
    ["\x01\x1c\x05\x01\x0c\t", "localhost", "host:99999", "host:0", "host:\u00b2", ":80", "a b:1"],
)
def test_a_prefill_target_that_is_not_host_port_is_invalid(address):
    for field in ("address", "data_address"):
        target = prefill_pb2.KVTarget(worker_id="d", address="127.0.0.1:1", reservation_id="r")
        setattr(target, field, address)
        request = prefill_pb2.PrefillRequest(request_id="q", prompt_token_ids=[5], target=target)
        with pytest.raises(InvalidRequestError) as info:
            request_from_proto(request)
        assert str(info.value) == (
            f"target.{field} {address!r} is not HOST:PORT (a port in 1..65535)"
        )


@pytest.mark.parametrize(
    "address", ["", "127.0.0.1:50051", "[::1]:1", "decode-0.banaserve.svc:65535", "H_1:7"]
)
def test_well_formed_addresses_pass(address):
    check_address(address, "address")


def test_report_load_with_a_port_int_refuses_is_invalid_not_internal():
    async def main():
        async with cluster(prefill=0, decode=0) as c:
            info = router_pb2.WorkerInfo(
                worker_id="w",
                address="127.0.0.1:\u00b2",
                role=common_pb2.WORKER_ROLE_DECODE,
                model="m",
            )
            call = c.stub.ReportLoad(timeout=5)
            await call.write(router_pb2.ReportLoadRequest(worker=info))
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert (err.value.code(), err.value.details()) == (
                C.INVALID_ARGUMENT,
                "address '127.0.0.1:²' is not HOST:PORT (a port in 1..65535)",
            )

    asyncio.run(main())


class SlowReserve(FakeWorker):
    """A decode worker that takes its time to reserve (``reserving`` is set meanwhile), and
    reserves all the same."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reserving = asyncio.Event()

    async def ReserveKV(self, request, context):
        self.reserving.set()
        await asyncio.sleep(0.5)
        return await super().ReserveKV(request, context)


class ExpiredContext:
    """What a servicer sees of a call whose deadline has passed: 0 s left."""

    def time_remaining(self) -> float:
        return 0.0

    def add_done_callback(self, callback) -> None:
        pass

    def cancelled(self) -> bool:
        return False

    def invocation_metadata(self) -> tuple:
        return ()

    def auth_context(self) -> dict:
        return {}


@asynccontextmanager
async def router_over_fakes(log: CallLog):
    """The real router servicer and driver over a fake prefill worker p0 and a slow-reserving
    fake decode worker d0."""
    router = Router(RouterConfig())
    clients = GrpcWorkerClients(RPC)
    driver = RequestDriver(router, clients, DriverConfig(release_timeout_s=1.0))
    servicer = RouterServicer(driver)
    workers = {"p0": FakeWorker("p0", log), "d0": SlowReserve("d0", log)}
    servers = [await start_server(worker_services(w), RPC) for w in workers.values()]
    for (worker_id, role), server in zip(
        [("p0", WorkerRole.PREFILL), ("d0", WorkerRole.DECODE)], servers, strict=True
    ):
        router.register(worker_id, server.address, role, capacity())
        router.report(worker_id, load(), 1.0)
    router_server = await start_server([router_service(servicer)], RPC)
    channel = open_channel(router_server.address, RPC)
    try:
        yield servicer, router_pb2_grpc.RouterServiceStub(channel), workers["d0"]
    finally:
        await channel.close()
        await clients.close()
        for server in (router_server, *servers):
            await server.stop(0)


def generate_request(request_id: str) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(
        request_id=request_id, token_ids=common_pb2.TokenIds(ids=[5, 6, 7])
    )


def test_a_generate_past_its_deadline_is_refused_before_it_reserves():
    async def main():
        log = CallLog()
        async with router_over_fakes(log) as (servicer, _, _):
            events = servicer.Generate(generate_request("late"), ExpiredContext())
            with pytest.raises(TimeoutError) as info:
                await anext(events)
            assert str(info.value) == "the request's deadline passed before it was routed"
            assert log.calls == []

    asyncio.run(main())


def test_a_generate_cancelled_while_reserving_releases_the_reservation():
    async def main():
        log = CallLog()
        async with router_over_fakes(log) as (_, stub, d0):
            call = stub.Generate(generate_request("q"), timeout=10)
            frames = asyncio.ensure_future(call.read())  # starts the call
            await asyncio.wait_for(d0.reserving.wait(), 5)  # the router waits on ReserveKV
            call.cancel()
            await asyncio.gather(frames, return_exceptions=True)
            # Released, whether or not d0's ReserveKV got as far as reserving (here the cancel
            # reaches d0 first; a real decode worker frees a reservation in progress too).
            await asyncio.wait_for(log.released.wait(), 5)
            assert ("release", "d0", "q", "RELEASE_REASON_ABORTED") in log.calls

    asyncio.run(main())


def test_a_release_cancelled_while_the_engine_thread_is_busy_still_frees_the_blocks(tiny_llama):
    async def main():
        worker = DecodeWorker(make_engine(tiny_llama))
        await worker.start()
        try:
            await worker.reserve("r", [5, 6, 7], GREEDY)
            assert (await worker.stats()).num_blocks_used == 1
            busy = threading.Event()
            worker._loop.submit(lambda _: busy.wait())  # the engine thread is in a long step
            release = asyncio.ensure_future(worker.release("r"))
            await asyncio.sleep(0)  # one turn: the release queues its abort and waits on it
            release.cancel()  # the caller gives up
            with contextlib.suppress(asyncio.CancelledError):
                await release  # the cancellation has gone as far as it goes
            assert release.cancelled()
            busy.set()
            stats = await worker.stats()  # queued behind the abort on the engine thread
            assert (stats.num_blocks_used, stats.reservations) == (0, [])
        finally:
            await worker.stop()

    asyncio.run(main())
