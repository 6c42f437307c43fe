"""How a migration's trace says it ended (services/coordinator/spans.py): a reverted one stays
UNSET and its reverting state links to the Revert call's span (an aborted one's ERROR and link:
tests/coordinator/test_tracing.py, session 44)."""

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
