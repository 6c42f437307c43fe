"""A request's trace, through the router's gRPC and HTTP APIs, against fake workers that trace
too (all with one in-memory exporter): one trace from the router's span to the workers'
(docs/deploy.md, "Traces"), under a client's own ``traceparent``; a request that ends with an
error status marks its spans ERROR with the code it ended with; the coordinator's periodic
``ListWorkers`` starts no trace (services/rpc/tracing.py)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import grpc
import httpx2
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.common.config import RpcConfig
from services.router.clients import GrpcWorkerClients
from services.router.core import Router, RouterConfig
from services.router.driver import DriverConfig, RequestDriver
from services.router.openai_api import OpenAIApi
from services.router.openai_server import HttpServer
from services.router.prompts import PromptEncoder
from services.router.registry import WorkerRole
from services.router.servicer import RouterServicer
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.rpc.server import start_server
from services.rpc.tracing import tracing_with_exporter
from tests.router.grpc_fakes import CallLog, Cluster, FakeWorker, router_service, worker_services
from tests.router.test_openai_api import LIMITS, MODEL, PROMPT, completion

pytestmark = pytest.mark.timeout(60)
RPC = RpcConfig(grace_s=0.1)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
WORKER_CALLS = {"ReserveKV", "Prefill", "StreamTokens"}


@asynccontextmanager
async def traced(**behaviour):
    """(cluster, HTTP client, exporter): a router (gRPC and HTTP) and workers p0, d0, every one
    traced into ``exporter``; the cluster's stub is an untraced client's."""
    exporter = InMemorySpanExporter()
    tracing = tracing_with_exporter(exporter)
    router = Router(RouterConfig(policy="load", report_timeout_s=60.0))
    clients = GrpcWorkerClients(RPC, tracing)
    driver = RequestDriver(router, clients, DriverConfig(release_timeout_s=1.0))
    prompts = PromptEncoder(lambda text, chat: [ord(c) for c in text])
    servicer = RouterServicer(driver, prompts=prompts)
    servers = [await start_server([router_service(servicer)], RPC, tracing=tracing)]
    channel = open_channel(servers[0].address, RPC)
    c = Cluster(router, driver, router_pb2_grpc.RouterServiceStub(channel), CallLog(), {})
    api = OpenAIApi(driver, MODEL, LIMITS, tracer=tracing.provider.get_tracer("test"))
    http = HttpServer(api.app, "127.0.0.1", 0, grace_s=0.1, on_stop=api.close)
    try:
        for worker_id, role in (("p0", WorkerRole.PREFILL), ("d0", WorkerRole.DECODE)):
            worker = FakeWorker(worker_id, c.log, **behaviour)
            servers.append(await start_server(worker_services(worker), RPC, tracing=tracing))
            c.workers[worker_id] = worker
            c.add(worker_id, role, servers[-1].address)
        await http.start()
        async with httpx2.AsyncClient(base_url=f"http://{http.address}", timeout=10) as client:
            yield c, client, exporter
    finally:
        await http.stop()
        await channel.close()
        await clients.close()
        for server in servers:
            await server.stop(0)


def run(test, **behaviour) -> list:
    async def main():
        async with traced(**behaviour) as (c, client, exporter):
            await test(c, client, exporter)
            await asyncio.sleep(0.2)  # the last server spans end as their handlers unwind
            return exporter.get_finished_spans()

    return asyncio.run(main())


def method(span) -> str:
    return span.name.rsplit("/", 1)[-1]


def request_tree(spans, root) -> None:
    """Every span in ``root``'s trace; the router's worker calls its children, each worker's
    server span the child of the router's call."""
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}
    by_id = {s.context.span_id: s for s in spans}
    calls = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert {method(s) for s in calls} >= WORKER_CALLS
    for call in calls:
        assert call.parent.span_id == root.context.span_id, call.name
    for served in (s for s in spans if s.kind is SpanKind.SERVER and s is not root):
        assert by_id[served.parent.span_id].kind is SpanKind.CLIENT, served.name
        assert method(by_id[served.parent.span_id]) == method(served)


def test_an_http_request_is_one_trace_under_the_clients_traceparent():
    async def test(c, client, exporter):
        headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
        r = await client.post("/v1/completions", json=completion(), headers=headers)
        assert r.status_code == 200

    spans = run(test)
    (root,) = [s for s in spans if s.name == "POST /v1/completions"]
    assert root.kind is SpanKind.SERVER
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{root.parent.span_id:016x}" == PARENT_ID and root.parent.is_remote
    assert root.context.trace_state.get("vendor") == "1"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["banaserve.request_id"].startswith("cmpl-")
    assert root.status.status_code is StatusCode.UNSET
    request_tree(spans, root)


def test_a_streamed_http_request_without_traceparent_is_a_trace_of_its_own():
    async def test(c, client, exporter):
        r = await client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        })  # fmt: skip
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")

    spans = run(test)
    (root,) = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert root.parent is None
    assert root.attributes["http.response.status_code"] == 200
    assert root.status.status_code is StatusCode.UNSET
    request_tree(spans, root)


def test_an_http_request_past_its_deadline_is_an_error():
    async def test(c, client, exporter):
        headers = {"X-Request-Timeout": "0.3"}
        r = await client.post("/v1/completions", json=completion(), headers=headers)
        assert r.status_code == 504

    spans = run(test, hang_decode=True)
    (root,) = [s for s in spans if s.name == "POST /v1/completions"]
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description.startswith("504: ")
    assert root.attributes["http.response.status_code"] == 504


def test_a_streaming_http_client_that_goes_away_ends_its_span_in_error():
    async def test(c, client, exporter):
        async with client.stream("POST", "/v1/completions", json=completion(stream=True)) as r:
            tokens = 0
            async for line in r.aiter_lines():  # the second comes from the decode stream
                tokens += line.startswith("data: ")
                if tokens == 2:
                    break
        await asyncio.wait_for(c.log.stream_cancelled.wait(), 10)

    spans = run(test, hang_decode=True)
    (root,) = [s for s in spans if s.name == "POST /v1/completions"]
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes["error.type"] == "client_disconnected"


def generate_request(request_id: str) -> router_pb2.GenerateRequest:
    request = router_pb2.GenerateRequest(
        request_id=request_id, token_ids=common_pb2.TokenIds(ids=PROMPT)
    )
    request.sampling.max_tokens = 4
    return request


def test_a_generate_past_its_grpc_deadline_is_deadline_exceeded():
    async def test(c, client, exporter):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in c.stub.Generate(generate_request("late"), timeout=0.5):
                pass
        assert failed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(c.log.stream_cancelled.wait(), 10)

    spans = run(test, hang_decode=True)
    (generate,) = [s for s in spans if s.name.endswith("/Generate")]
    assert generate.status.status_code is StatusCode.ERROR
    assert generate.attributes["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    # The router's StreamTokens (cut short by the deadline) and the decode worker's.
    streams = [s for s in spans if method(s) == "StreamTokens"]
    assert {s.kind for s in streams} == {SpanKind.CLIENT, SpanKind.SERVER}
    for stream in streams:
        assert stream.status.status_code is StatusCode.ERROR, stream.kind
        assert stream.attributes["rpc.grpc.status_code"] in (1, 4), stream.kind


def test_a_generate_its_client_cancels_is_cancelled():
    async def test(c, client, exporter):
        call = c.stub.Generate(generate_request("gone"))
        deltas = 0
        async for response in call:  # the first delta is the prefill worker's, the second the
            deltas += response.HasField("delta")  # decode stream's: cancelled before that one,
            if deltas == 2:  # no stream was open to cancel (1 run in 2 under load failed so)
                call.cancel()
                break
        await asyncio.wait_for(c.log.stream_cancelled.wait(), 10)

    spans = run(test, hang_decode=True)
    (generate,) = [s for s in spans if s.name.endswith("/Generate")]
    assert generate.status.status_code is StatusCode.ERROR
    assert generate.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    for stream in (s for s in spans if method(s) == "StreamTokens"):
        assert stream.status.status_code is StatusCode.ERROR, stream.kind
        assert stream.attributes["rpc.grpc.status_code"] == 1, stream.kind


def test_a_list_workers_poll_starts_no_trace_unless_its_caller_samples_one():
    async def test(c, client, exporter):
        for _ in range(3):  # as the coordinator's load feed, every 0.25 s
            await c.stub.ListWorkers(router_pb2.ListWorkersRequest())
        await c.stub.ListWorkers(router_pb2.ListWorkersRequest(), metadata=[
            ("traceparent", TRACEPARENT),
        ])  # fmt: skip

    spans = run(test)
    (listed,) = [s for s in spans if method(s) == "ListWorkers"]
    assert f"{listed.context.trace_id:032x}" == TRACE_ID
