"""One trace per migration, with the in-memory exporter: a root span, a span per state under it,
the worker calls under their state's span, and the attributes each carries."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from services.rpc.tracing import tracing_with_exporter
from tests.coordinator.factories import coordinator
from tests.coordinator.fakes import DELTA_BYTES, KV_BYTES, FakeClock, FakeCluster

D, P = "decode-0", "prefill-0"
pytestmark = pytest.mark.timeout(60)


def children(spans, parent) -> list[str]:
    return [
        s.name for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def test_a_migration_is_one_trace_with_a_span_per_state(redis_server, store_prefix):
    exporter = InMemorySpanExporter()
    tracer = tracing_with_exporter(exporter, "banaserve-coordinator").provider.get_tracer("test")
    cluster, clock = FakeCluster(), FakeClock(1000.0)

    async def main():
        async with coordinator(
            redis_server.url, store_prefix, cluster, clock, tracer=tracer
        ) as coord:
            m = await coord.start_layers(D, P, 2)
            await coord.wait("m-1")
            clock.advance(7.0)
            await coord.revert("m-1")
            await coord.wait("m-1")
            return m

    m = asyncio.run(main())
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    root = by_name["migration"]
    assert root.parent is None
    assert {s.context.trace_id for s in spans} == {root.context.trace_id} == {m.trace_id}
    assert m.root_span_id == root.context.span_id
    states = ["planned", "copying", "switching", "active", "reverting", "done"]
    assert children(spans, root) == [f"migration.{s}" for s in states]
    assert children(spans, by_name["migration.copying"]) == [
        "migration.prepare",
        "migration.prepare",
        "migration.copy",
        "migration.copy",
    ]
    assert children(spans, by_name["migration.switching"]) == ["migration.switch"]
    assert children(spans, by_name["migration.active"]) == ["migration.activate"]
    assert children(spans, by_name["migration.reverting"]) == [
        "migration.revert",
        "migration.release",
        "migration.release",
    ]
    prepares = [s for s in spans if s.name == "migration.prepare"]
    assert [(s.attributes["worker.id"], s.attributes["worker.role"]) for s in prepares] == [
        (D, "donor"),
        (P, "helper"),
    ]
    identity = {
        "migration.id": "m-1",
        "migration.kind": "layers",
        "migration.donor": D,
        "migration.helper": P,
        "migration.layers.start": 2,
        "migration.layers.end": 4,
        "migration.num_layers": 2,
    }
    copying = dict(by_name["migration.copying"].attributes)
    assert copying == {
        **identity,
        "migration.state": "copying",
        "migration.weights_skipped": True,
        "migration.helper_data_address": "127.0.0.1:9000",
        "migration.copy.0.bytes.kv": KV_BYTES,
        "migration.copy.0.num_sequences": 3,
        "migration.copy.1.bytes.kv": DELTA_BYTES,
        "migration.copy.1.num_sequences": 3,
        "migration.bytes.kv": KV_BYTES + DELTA_BYTES,
        "migration.outcome": "ok",
        "migration.duration_s": 0.0,
    }
    switching = by_name["migration.switching"].attributes
    assert (switching["migration.bytes.kv"], switching["migration.pause_s"]) == (DELTA_BYTES, 0.004)
    active = by_name["migration.active"]
    assert (active.attributes["migration.duration_s"], active.attributes["migration.outcome"]) == (
        7.0,
        "ok",
    )
    assert (active.start_time, active.end_time) == (1000 * 10**9, 1007 * 10**9)
    assert root.attributes["migration.outcome"] == "done"
    assert root.attributes["migration.bytes.kv"] == 2 * (KV_BYTES + 2 * DELTA_BYTES)
    assert root.attributes["migration.duration_s"] == 7.0


def test_an_aborted_migration_ends_its_trace_with_the_reason(redis_server, store_prefix):
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
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    # ERROR with the reason: the root, the state it was aborted in, its end (session 44: all
    # UNSET, only ``migration.outcome`` said it); the aborted state links to the Abort call.
    for name in ("migration", "migration.switching", "migration.aborted"):
        status = by_name[name].status
        assert (status.status_code, status.description) == (StatusCode.ERROR, "operator"), name
    for name in ("migration.planned", "migration.copying"):
        assert by_name[name].status.status_code is StatusCode.UNSET, name
    assert [link.context for link in by_name["migration.aborted"].links] == [call]
    root = by_name["migration"]
    assert children(spans, root) == [
        "migration.planned",
        "migration.copying",
        "migration.switching",
        "migration.aborted",
    ]
    switching = by_name["migration.switching"]
    assert children(spans, switching) == ["migration.switch", "migration.abort", "migration.abort"]
    assert switching.attributes["migration.outcome"] == "aborted"
    assert (root.attributes["migration.outcome"], root.attributes["migration.reason"]) == (
        "aborted",
        "operator",
    )
    # The cancelled switch call records the cancellation as its error.
    switch = by_name["migration.switch"]
    assert (switch.status.description, switch.attributes["migration.outcome"]) == (
        "cancelled",
        "cancelled",
    )


def test_a_resumed_migration_stays_in_its_trace(redis_server, store_prefix):
    exporter = InMemorySpanExporter()
    tracer = tracing_with_exporter(exporter).provider.get_tracer("test")
    cluster, clock = FakeCluster(), FakeClock()

    async def life(body):
        async with coordinator(
            redis_server.url, store_prefix, cluster, clock, tracer=tracer
        ) as coord:
            return await body(coord)

    async def first(coord):
        m = await coord.start_layers(D, P, 2)
        await coord.wait("m-1")
        return m.trace_id

    async def second(coord):
        await coord.revert("m-1")
        await coord.wait("m-1")

    trace_id = asyncio.run(life(first))
    asyncio.run(life(second))
    spans = exporter.get_finished_spans()
    assert {s.context.trace_id for s in spans} == {trace_id}
    suspended = [s for s in spans if s.attributes.get("migration.outcome") == "suspended"]
    assert [s.name for s in suspended] == ["migration.active", "migration"]
    resumed = [s for s in spans if s.attributes.get("migration.resumed")]
    assert [s.name for s in resumed] == ["migration.active"]
    root_id = next(s for s in spans if s.name == "migration").context.span_id
    later = [s.name for s in spans if s.parent is not None and s.parent.span_id == root_id]
    assert later[-3:] == ["migration.active", "migration.reverting", "migration.done"]


def test_a_revert_for_a_stopping_worker_says_so_on_its_span(redis_server, store_prefix):
    exporter = InMemorySpanExporter()
    tracer = tracing_with_exporter(exporter).provider.get_tracer("test")
    cluster = FakeCluster()

    async def main():
        async with coordinator(
            redis_server.url, store_prefix, cluster, FakeClock(), tracer=tracer
        ) as coord:
            await coord.start_layers(D, P, 2)
            await coord.wait("m-1")
            cluster.ports[P].draining = True
            await coord.renew_leases()
            await asyncio.gather(*coord._background)
            await coord.wait("m-1")

    asyncio.run(main())
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    reverting = by_name["migration.reverting"]
    assert reverting.attributes["migration.reverted_for"] == "prefill-0 is stopping"
    assert by_name["migration"].attributes["migration.outcome"] == "done"
