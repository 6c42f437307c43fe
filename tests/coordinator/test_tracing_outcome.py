"""How a migration's trace says it ended (services/coordinator/spans.py): an aborted one's root,
the state it was aborted in and its ``migration.aborted`` span are ERROR with the reason (probe,
session 44: all UNSET, only ``migration.outcome`` said it); a reverted one stays UNSET. The
states a Revert or Abort call asked for link to that call's span."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from services.rpc.tracing import tracing_with_exporter
from tests.coordinator.factories import coordinator
from tests.coordinator.fakes import FakeClock, FakeCluster

D, P = "decode-0", "prefill-0"
pytestmark = pytest.mark.timeout(60)


def test_an_aborted_migration_is_an_error_with_its_reason(redis_server, store_prefix):
    exporter = InMemorySpanExporter()
    tracer = tracing_with_exporter(exporter).provider.get_tracer("test")
    cluster = FakeCluster()
    hold = cluster.hold(D, "switch micro-batches=2")

    async def main():
        async with coordinator(
            redis_server.url, store_prefix, cluster, FakeClock(), tracer=tracer
        ) as coord:
            await coord.start_layers(D, P, 2)
            await hold.entered.wait()
            with tracer.start_as_current_span("AbortMigration") as call:
                await coord.abort("m-1", "operator")
            return call.get_span_context()

    call = asyncio.run(main())
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    for name in ("migration", "migration.switching", "migration.aborted"):
        status = by_name[name].status
        assert (status.status_code, status.description) == (StatusCode.ERROR, "operator"), name
    for name in ("migration.planned", "migration.copying"):
        assert by_name[name].status.status_code is StatusCode.UNSET, name
    assert [link.context for link in by_name["migration.aborted"].links] == [call]


def test_a_reverted_migration_stays_ok_and_links_the_revert_call(redis_server, store_prefix):
    exporter = InMemorySpanExporter()
    tracer = tracing_with_exporter(exporter).provider.get_tracer("test")
    cluster, clock = FakeCluster(), FakeClock(1000.0)

    async def main():
        async with coordinator(
            redis_server.url, store_prefix, cluster, clock, tracer=tracer
        ) as coord:
            await coord.start_layers(D, P, 2)
            await coord.wait("m-1")
            with tracer.start_as_current_span("RevertMigration") as call:
                await coord.revert("m-1")
            await coord.wait("m-1")
            return call.get_span_context()

    call = asyncio.run(main())
    spans = [s for s in exporter.get_finished_spans() if s.name.startswith("migration")]
    assert {s.status.status_code for s in spans} == {StatusCode.UNSET}
    by_name = {s.name: s for s in spans}
    assert by_name["migration"].attributes["migration.outcome"] == "done"
    assert [link.context for link in by_name["migration.reverting"].links] == [call]
    assert not by_name["migration.active"].links
