"""The coordinator's ATTENTION kind over fake workers: the same states, worker calls and trace as a
layer migration (tests/coordinator/test_tracing.py), with every layer ([0, L)) and the blocks
moved; the plan each worker gets carries the selection; the record survives Redis; refusals."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.errors import InvalidRequestError, PreconditionError
from services.coordinator.migration import MigrationKind, MigrationState
from services.coordinator.ports import Switched
from services.coordinator.store import RedisMigrationStore
from services.rpc.tracing import tracing_with_exporter
from tests.coordinator.conftest import store_prefix  # noqa: F401 - fixture
from tests.coordinator.factories import CONFIG, coordinator
from tests.coordinator.fakes import KV_BYTES, FakeClock, FakeCluster
from tests.kvstore.conftest import redis_server  # noqa: F401 - fixture

D, P = "decode-0", "prefill-0"
NUM_BLOCKS = 6
pytestmark = pytest.mark.timeout(60)


def children(spans, parent) -> list[str]:
    return [
        s.name for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


class AttentionCluster(FakeCluster):
    """Fake workers whose switch answers blocks located (as the real agents do), recording
    every plan they are given."""

    def __init__(self) -> None:
        super().__init__()
        self.plans = []
        for port in self.ports.values():
            self._wrap(port)

    def _wrap(self, port) -> None:
        for name in ("prepare_donor", "prepare_helper", "copy", "switch", "revert", "release"):
            inner = getattr(port, name)

            async def call(plan, *args, _inner=inner, _name=name):
                self.plans.append((port.worker_id, _name, plan))
                out = await _inner(plan, *args)
                if _name == "switch":
                    return Switched(0, 2, out.pause_s, 0, NUM_BLOCKS)
                return out

            setattr(port, name, call)


def test_an_attention_migration_is_one_trace_with_a_span_per_state(redis_server, store_prefix):  # noqa: F811
    exporter = InMemorySpanExporter()
    tracer = tracing_with_exporter(exporter, "banaserve-coordinator").provider.get_tracer("test")
    cluster, clock = AttentionCluster(), FakeClock(1000.0)

    # every round however little it moved: an attention migration's rounds choose sequences
    # as they grow (a layer migration's stop at the first small one, test_core.py)
    config = replace(CONFIG, copy_converged_bytes=1 << 40)

    async def main():
        async with coordinator(
            redis_server.url, store_prefix, cluster, clock, tracer=tracer, config=config
        ) as coord:
            m = await coord.start_attention(D, P, max_sequences=2, max_blocks_per_sequence=3)
            await coord.wait("m-1")
            assert m.state is MigrationState.ACTIVE
            clock.advance(5.0)
            await coord.revert("m-1")
            await coord.wait("m-1")
        store = RedisMigrationStore.from_url(redis_server.url, store_prefix)
        try:
            return m, await store.load_all()
        finally:
            await store.close()

    m, stored = asyncio.run(main())
    assert (m.kind, m.state, m.start_layer, m.end_layer) == (
        MigrationKind.ATTENTION,
        MigrationState.DONE,
        0,
        4,
    )
    assert (m.num_blocks, m.num_sequences, m.max_sequences, m.max_blocks_per_sequence) == (
        NUM_BLOCKS,
        2,
        2,
        3,
    )
    [loaded] = stored
    assert (loaded.kind, loaded.num_blocks, loaded.max_blocks_per_sequence) == (
        MigrationKind.ATTENTION,
        NUM_BLOCKS,
        3,
    )
    assert cluster.steps() == [
        f"{D} prepare donor",
        f"{P} prepare helper for [0, 1, 2, 3]",
        f"{D} copy to 127.0.0.1:9000",
        f"{D} copy to 127.0.0.1:9000",
        f"{D} switch micro-batches=1",
        f"{D} activate drop=False",
        f"{D} revert",
        f"{D} release",
        f"{P} release",
    ]
    assert {(p.kind, p.max_sequences, p.max_blocks_per_sequence) for *_, p in cluster.plans} == {
        (MigrationKind.ATTENTION, 2, 3)
    }
    assert cluster.held() == {D: set(), P: set()}

    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    root = by_name["migration"]
    assert {s.context.trace_id for s in spans} == {root.context.trace_id} == {m.trace_id}
    states = ["planned", "copying", "switching", "active", "reverting", "done"]
    assert children(spans, root) == [f"migration.{s}" for s in states]
    assert children(spans, by_name["migration.copying"]) == [
        "migration.prepare",
        "migration.prepare",
        "migration.copy",
        "migration.copy",
    ]
    assert children(spans, by_name["migration.switching"]) == ["migration.switch"]
    assert children(spans, by_name["migration.reverting"]) == [
        "migration.revert",
        "migration.release",
        "migration.release",
    ]
    identity = {
        "migration.id": "m-1",
        "migration.kind": "attention",
        "migration.donor": D,
        "migration.helper": P,
        "migration.layers.start": 0,
        "migration.layers.end": 4,
        "migration.num_layers": 4,
    }
    switching = dict(by_name["migration.switching"].attributes)
    assert {k: switching[k] for k in identity} == identity
    assert (switching["migration.num_blocks"], switching["migration.num_sequences"]) == (
        NUM_BLOCKS,
        2,
    )
    assert by_name["migration.copying"].attributes["migration.copy.0.bytes.kv"] == KV_BYTES
    assert root.attributes["migration.outcome"] == "done"
    assert root.attributes["migration.duration_s"] == 5.0


def test_attention_refusals_come_before_any_work(redis_server, store_prefix):  # noqa: F811
    cluster = FakeCluster()
    cluster.ports[P].digest = b"\x02"  # another model: its fingerprint differs

    async def main():
        async with coordinator(redis_server.url, store_prefix, cluster, FakeClock()) as coord:
            with pytest.raises(InvalidRequestError, match="same worker"):
                await coord.start_attention(D, D)
            with pytest.raises(InvalidRequestError, match=">= 0"):
                await coord.start_attention(D, P, max_sequences=-1)
            with pytest.raises(InvalidRequestError, match="refill moves the longest"):
                await coord.start_attention(D, P, ("r1",), refill=True)
            with pytest.raises(PreconditionError, match="different models"):
                await coord.start_attention(D, P)
            return coord.list()

    assert asyncio.run(main()) == []
    assert cluster.steps() == []
