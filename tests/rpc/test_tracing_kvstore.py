"""A prefill worker's kvstore calls are spans of the request they serve (probe, session 44: every
Lookup, Pin, Unpin, Reserve and Commit was a trace of its own), also when they run later from a
task of no request, or of another one (the write-back queue's task)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.common.config import RpcConfig
from services.prefill.kvstore_client import KVStoreClient
from services.rpc.tracing import tracing_with_exporter
from tests.kvstore.conftest import kv_prefix, redis_server  # noqa: F401 - the session's Redis
from tests.kvstore.test_prefill_store import committed, kvstore_node
from tests.prefill.helpers import wait_for

RPC = RpcConfig(grace_s=0.2)
pytestmark = pytest.mark.timeout(60)
STORE = "/banaserve.v1.KVStoreService/"


def test_store_calls_are_spans_of_their_request(redis_server, kv_prefix):  # noqa: F811
    hashes = [bytes([i]) * 16 for i in range(1, 4)]
    other = [bytes([i]) * 16 for i in range(10, 12)]
    layers = [torch.randn(2, 3, 16, 2, 8) for _ in range(2)]
    exporter = InMemorySpanExporter()
    tracing = tracing_with_exporter(exporter, "banaserve-prefill")
    tracer = tracing.provider.get_tracer("test")

    async def main():
        async with kvstore_node(redis_server.url, kv_prefix, "tcp") as store:
            client = KVStoreClient(store.address, RPC, timeout_s=1.0, tracing=tracing)
            with tracer.start_as_current_span("first"):
                assert (await client.lookup(hashes)).prefix is None
            # The write-back queue's task runs under whichever request started it.
            with tracer.start_as_current_span("stale"):
                assert await client.write_back(hashes, layers) == 3
                assert await client.write_back(other, [x[:, :2] for x in layers]) == 2
            await wait_for(lambda: committed(store) == 5)
            with tracer.start_as_current_span("second"):
                found = await client.lookup(hashes)
            # An unpin from a task of no request (a fetch the engine thread started).
            await asyncio.ensure_future(client.release(found.prefix))
            await client.close()

    asyncio.run(main())
    spans = exporter.get_finished_spans()
    roots = {s.name: s for s in spans if s.parent is None}

    def calls_under(name):
        root = roots[name]
        return sorted(
            s.name.removeprefix(STORE)
            for s in spans
            if s.kind is SpanKind.CLIENT
            and s.context.trace_id == root.context.trace_id
            and s.parent.span_id == root.context.span_id
        )

    assert calls_under("first") == ["Commit", "Lookup", "Reserve"]
    assert calls_under("second") == ["Lookup", "Pin", "Unpin"]
    assert calls_under("stale") == []
    # Blocks no traced request looked up: no request's (their own traces, as before).
    alone = [s.name.removeprefix(STORE) for s in spans if s.parent is None]
    assert sorted(alone) == ["Commit", "Reserve", "first", "second", "stale"]
