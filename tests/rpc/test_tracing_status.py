"""The status of a call's spans however it ends (services/rpc/tracing.py, "Status"): a deadline
that passes, a caller that cancels. The stock interceptors left both UNSET with
``rpc.grpc.status_code`` 0, read as a success (and never ended a cancelled unary call's client
span)."""

from __future__ import annotations

import asyncio
from contextlib import suppress

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.common.config import RpcConfig
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import decode_pb2, decode_pb2_grpc
from services.rpc.server import start_server
from services.rpc.tracing import tracing_with_exporter
from tests.rpc.helpers import FakeDecode, fake_decode_service

pytestmark = pytest.mark.timeout(60)
STREAM = "/banaserve.v1.DecodeService/StreamTokens"
RESERVE = "/banaserve.v1.DecodeService/ReserveKV"
RPC = RpcConfig(grace_s=0.5)
CANCELLED, DEADLINE_EXCEEDED = grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED


class SlowDecode(FakeDecode):
    """ReserveKV takes longer than its callers wait."""

    async def ReserveKV(self, request, context):
        await asyncio.sleep(5.0)
        return decode_pb2.ReserveKVResponse()


def spans_of(exporter, name):
    spans = {s.kind: s for s in exporter.get_finished_spans() if s.name == name}
    return spans[SpanKind.CLIENT], spans[SpanKind.SERVER]


def assert_error(span, code):
    assert span.status.status_code is StatusCode.ERROR, (span.name, span.kind, span.status)
    assert span.attributes["rpc.grpc.status_code"] == code.value[0], span.kind


async def settled(exporter, name, count=2):
    for _ in range(200):  # the server's span ends as its handler unwinds
        if sum(s.name == name for s in exporter.get_finished_spans()) >= count:
            return
        await asyncio.sleep(0.01)


def run(test, servicer=FakeDecode):
    exporter = InMemorySpanExporter()
    tracing = tracing_with_exporter(exporter)

    async def main():
        fake = servicer()
        server = await start_server([fake_decode_service(fake)], RPC, tracing=tracing)
        channel = open_channel(server.address, RPC, tracing)
        try:
            await test(decode_pb2_grpc.DecodeServiceStub(channel), fake, exporter)
        finally:
            await channel.close()
            await server.stop(0)

    asyncio.run(main())
    return exporter


def test_a_stream_past_its_deadline_is_deadline_exceeded_on_both_sides():
    async def test(stub, fake, exporter):
        call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="slow"), timeout=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in call:
                pass
        assert failed.value.code() is DEADLINE_EXCEEDED
        await settled(exporter, STREAM)

    client, server = spans_of(run(test), STREAM)
    assert_error(client, DEADLINE_EXCEEDED)
    assert_error(server, DEADLINE_EXCEEDED)


def test_a_stream_its_caller_cancels_is_cancelled_on_both_sides():
    async def test(stub, fake, exporter):
        async def read():
            async for _ in stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="slow")):
                pass

        reading = asyncio.ensure_future(read())
        await fake.slow_started.wait()
        reading.cancel()  # as the router's request task is, at its deadline or a disconnect
        with pytest.raises(asyncio.CancelledError):
            await reading
        await settled(exporter, STREAM)

    client, server = spans_of(run(test), STREAM)
    assert_error(client, CANCELLED)
    assert_error(server, CANCELLED)


def test_a_unary_call_its_caller_cancels_still_ends_its_spans_cancelled():
    async def test(stub, fake, exporter):
        reserving = asyncio.ensure_future(stub.ReserveKV(decode_pb2.ReserveKVRequest()))
        await asyncio.sleep(0.2)
        reserving.cancel()
        with suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reserving
        await settled(exporter, RESERVE)

    # (the stock client interceptor never ended this span: it was never exported)
    client, server = spans_of(run(test, SlowDecode), RESERVE)
    assert_error(client, CANCELLED)
    assert_error(server, CANCELLED)


def test_a_unary_call_past_its_deadline_is_deadline_exceeded_on_both_sides():
    async def test(stub, fake, exporter):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.ReserveKV(decode_pb2.ReserveKVRequest(), timeout=0.2)
        assert failed.value.code() is DEADLINE_EXCEEDED
        await settled(exporter, RESERVE)

    client, server = spans_of(run(test, SlowDecode), RESERVE)
    assert_error(client, DEADLINE_EXCEEDED)
    assert_error(server, DEADLINE_EXCEEDED)


def test_a_refused_request_keeps_its_code_and_a_served_one_stays_ok():
    async def test(stub, fake, exporter):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ReserveKV(decode_pb2.ReserveKVRequest())  # max_tokens 0
        await stub.Stats(decode_pb2.DecodeServiceStatsRequest())
        await settled(exporter, "/banaserve.v1.DecodeService/Stats")

    exporter = run(test)
    client, server = spans_of(exporter, RESERVE)
    assert_error(client, grpc.StatusCode.INVALID_ARGUMENT)
    # A caller's mistake is no server error (OpenTelemetry's rule for gRPC server spans).
    assert server.status.status_code is StatusCode.UNSET
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for span in spans_of(exporter, "/banaserve.v1.DecodeService/Stats"):
        assert span.status.status_code is StatusCode.UNSET
        assert span.attributes["rpc.grpc.status_code"] == 0
