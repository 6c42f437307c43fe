"""A worker registers again with a router restarted on the same port within about a second.

``banaserve up`` restarts a dead router on its old port; the workers' load-report channel must
notice it soon, not when gRPC's own reconnect backoff (which grows towards 2 minutes) next
allows a connection attempt.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.config import RpcConfig
from services.common.load import LoadReport
from services.rpc.gen.banaserve.v1 import router_pb2, router_pb2_grpc
from services.rpc.load_reports import LoadReporter, reporting_to, router_channel, worker_info
from services.rpc.server import Service, start_server

pytestmark = pytest.mark.integration

# gRPC's default reconnect backoff (1 s, x1.6 per failed attempt, +-20% jitter) makes its
# attempts at about 1, 2.6, 5.2, 9.3, 15.8 s: after 12 s down the next one comes ~4 s (at
# least ~1 s, rarely) after the router is back; measured without the fix: 4.9, 6.3, 8.1 s.
DOWN_S = 12.0


class RegistrationRouter(router_pb2_grpc.RouterServiceServicer):
    def __init__(self) -> None:
        self.worker_ids: list[str] = []
        self.registered = asyncio.Event()

    async def ReportLoad(self, request_iterator, context):
        async for frame in request_iterator:
            if frame.HasField("worker"):
                self.worker_ids.append(frame.worker.worker_id)
                self.registered.set()
        return router_pb2.ReportLoadResponse()


def router_service(router: RegistrationRouter) -> Service:
    return Service.bind(
        router,
        router_pb2_grpc.add_RouterServiceServicer_to_server,
        router_pb2.DESCRIPTOR.services_by_name["RouterService"],
    )


async def load() -> LoadReport:
    return LoadReport(0, 0, 0, 0, 32, 0.0, 0.0, 1.0)


def test_a_worker_registers_again_within_a_second_of_the_router_coming_back():
    async def main() -> float:
        rpc = RpcConfig(grace_s=0.1)
        first, second = RegistrationRouter(), RegistrationRouter()
        server = await start_server([router_service(first)], rpc)
        info = worker_info("prefill-0", "127.0.0.1:1", "prefill", "tiny-llama", "fp", 16, 32, 64)
        async with reporting_to(server.address, info, load, rpc, interval_s=0.05):
            await asyncio.wait_for(first.registered.wait(), 10)
            await server.stop(0)
            await asyncio.sleep(DOWN_S)  # the router is down: the scenario, not a sync
            restarted = RpcConfig(port=server.port, grace_s=0.1)
            server = await start_server([router_service(second)], restarted)
            back = asyncio.get_running_loop().time()
            await asyncio.wait_for(second.registered.wait(), 30)
            took = asyncio.get_running_loop().time() - back
        await server.stop(0)
        assert (first.worker_ids, second.worker_ids) == (["prefill-0"], ["prefill-0"])
        return took

    # The reporter retries every second and the channel reconnects at most 1 s (+20% jitter)
    # after a failed attempt.
    assert asyncio.run(main()) < 2.5


def test_a_worker_whose_report_stream_was_stranded_registers_again_within_seconds():
    """The report stream's connection dies without closing (a middlebox dropped it): only the
    channel's keepalive can find it, 1 s + 2 s (load_reports.REPORT_KEEPALIVE_*); the services'
    10 s + 5 s kept a worker out of routing ~13 s in the chaos suite (session 26)."""
    from tests.chaos.proxy import FaultProxy, Mode

    async def main() -> float:
        rpc = RpcConfig(grace_s=0.1)
        router = RegistrationRouter()
        server = await start_server([router_service(router)], rpc)
        proxy = FaultProxy("reports", lambda: server.address)
        proxy.start()
        info = worker_info("prefill-0", "127.0.0.1:1", "prefill", "tiny-llama", "fp", 16, 32, 64)
        try:
            async with reporting_to(proxy.address, info, load, rpc, interval_s=0.05):
                await asyncio.wait_for(router.registered.wait(), 10)
                router.registered.clear()
                proxy.set(Mode.STRAND)
                stranded = asyncio.get_running_loop().time()
                await asyncio.wait_for(router.registered.wait(), 20)
                took = asyncio.get_running_loop().time() - stranded
        finally:
            proxy.stop()
            await server.stop(0)
        assert router.worker_ids == ["prefill-0", "prefill-0"]
        return took

    # ping after 1 s, dead 2 s later, a reconnect within ~1 s
    assert asyncio.run(main()) < 5.5


class RefusingRouter(router_pb2_grpc.RouterServiceServicer):
    """Refuses every registration at once, as the router refuses an id another worker holds."""

    def __init__(self) -> None:
        self.tries = 0

    async def ReportLoad(self, request_iterator, context):
        async for _ in request_iterator:
            self.tries += 1
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "worker id taken")


def test_a_worker_the_router_refuses_says_so_once_and_never_that_it_is_back(caplog):
    """Probe, session 45: a worker refused at once logged "load reports to the router again
    after 1 failed tries" and a new failure warning every second (its registration had only
    gone out). Now one warning; "again" only once a stream outlives a report interval."""

    async def main() -> int:
        rpc = RpcConfig(grace_s=0.1)
        refusing = RefusingRouter()
        server = await start_server([router_service(refusing)], rpc)
        info = worker_info("prefill-0", "127.0.0.1:1", "prefill", "tiny-llama", "fp", 16, 32, 64)
        channel = router_channel(server.address, rpc)
        reporter = LoadReporter(channel, info, load, interval_s=0.05, retry_s=0.1)
        task = asyncio.create_task(reporter.run())
        with caplog.at_level("DEBUG", logger="services.rpc.load_reports"):
            try:
                await asyncio.sleep(1.5)
                refused = [r.getMessage() for r in caplog.records]
                assert sum(r.levelname == "WARNING" for r in caplog.records) == 1, refused
                assert not any("again after" in m for m in refused), refused
                await server.stop(0)
                accepting = RegistrationRouter()
                server = await start_server(
                    [router_service(accepting)], RpcConfig(port=server.port, grace_s=0.1)
                )
                await asyncio.wait_for(accepting.registered.wait(), 10)
                await asyncio.sleep(0.5)
            finally:
                reporter.stop()
                await asyncio.wait({task}, timeout=2.0)
                task.cancel()
                await channel.close()
        await server.stop(0)
        [back] = [r.getMessage() for r in caplog.records if "again after" in r.getMessage()]
        assert back.startswith("load reports to the router again after ")
        return refusing.tries

    assert asyncio.run(main()) >= 5  # it kept trying, quietly
