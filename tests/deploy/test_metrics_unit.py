"""The metric collectors and ``--host`` resolution, in process: exact values from fakes."""

from __future__ import annotations

import asyncio
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.common.errors import ConfigError
from services.common.metrics import EngineCollector, KVStoreCollector, RequestMetrics
from services.common.metrics_endpoint import MetricsEndpoint
from services.common.network import default_id, resolve_host
from services.common.types import FinishReason
from services.kvstore.core import LookupResult
from services.prefill.write_backs import WriteBackStats
from services.router.driver import Finished, Outcome, Timings


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def finished(reason: FinishReason, num_completion: int, ttft: float, total: float, kv: int):
    timings = Timings(ttft_s=ttft, total_s=total, kv_transfer_s=0.002, kv_bytes=kv)
    return Finished(reason, 40, num_completion, 16, timings)


def test_request_metrics_count_outcomes_tokens_and_latencies():
    m = RequestMetrics()
    m.ended(Outcome.LENGTH, finished(FinishReason.LENGTH, 5, ttft=0.04, total=0.08, kv=1024))
    m.ended(Outcome.STOP, finished(FinishReason.STOP, 1, ttft=0.5, total=0.5, kv=0))
    m.ended(Outcome.ERROR, None)
    r = m.registry
    assert [
        sample(r, "banaserve_router_requests_total", outcome=o) for o in ("length", "stop", "error")
    ] == [1, 1, 1]
    assert sample(r, "banaserve_router_tokens_total", kind="prompt") == 80
    assert sample(r, "banaserve_router_tokens_total", kind="completion") == 6
    assert sample(r, "banaserve_router_tokens_total", kind="cached") == 32
    assert sample(r, "banaserve_router_ttft_seconds_count") == 2
    assert sample(r, "banaserve_router_ttft_seconds_bucket", le="0.05") == 1
    # TPOT only where a token followed the first: (0.08 - 0.04) / 4 = 0.01.
    assert sample(r, "banaserve_router_tpot_seconds_count") == 1
    assert sample(r, "banaserve_router_tpot_seconds_sum") == pytest.approx(0.01)
    assert sample(r, "banaserve_router_kv_transfer_bytes_total") == 1024
    assert sample(r, "banaserve_router_kv_transfer_seconds_count") == 1


def test_engine_collector_reads_the_engine_at_scrape_time():
    stats = {
        "num_blocks": 64,
        "num_free_blocks": 60,
        "num_cached_blocks": 3,
        "num_running": 2,
        "num_waiting": 1,
        "num_hosted_blocks": 0,
    }
    engine = SimpleNamespace(
        stats=lambda: dict(stats), snapshot=SimpleNamespace(num_hosted_layers=3)
    )
    meter = SimpleNamespace(snapshot=lambda: (0.02, 0.5))
    registry = CollectorRegistry()
    registry.register(EngineCollector("decode", "tiny-llama", engine, SimpleNamespace(meter=meter)))
    labels = {"role": "decode", "model": "tiny-llama"}
    assert sample(registry, "banaserve_worker_kv_blocks", state="used", **labels) == 4
    stats["num_free_blocks"] = 10
    assert sample(registry, "banaserve_worker_kv_blocks", state="used", **labels) == 54
    assert sample(registry, "banaserve_worker_waiting_seqs", **labels) == 1
    assert sample(registry, "banaserve_worker_busy_ratio", **labels) == 0.5
    assert sample(registry, "banaserve_worker_hosted_layers", **labels) == 3
    # A key the engine does not report is left out, not invented.
    assert sample(registry, "banaserve_worker_hosted_seqs", **labels) is None
    assert (
        sample(registry, "banaserve_prefill_store_write_backs_total", outcome="done", **labels)
        is None
    )
    # A prefill worker with a store: its write-backs, done, dropped, evicted, not reused and
    # pending.
    write_backs = WriteBackStats(
        num_done=5, num_dropped=2, num_evicted=3, num_bytes_pending=1 << 20, num_not_reused=4
    )
    registry = CollectorRegistry()
    worker = SimpleNamespace(meter=meter, write_back_stats=write_backs)
    registry.register(EngineCollector("prefill", "tiny-llama", engine, worker))
    labels = {"role": "prefill", "model": "tiny-llama"}
    name = "banaserve_prefill_store_write_backs_total"
    assert sample(registry, name, outcome="done", **labels) == 5
    assert sample(registry, name, outcome="dropped", **labels) == 2
    assert sample(registry, name, outcome="evicted", **labels) == 3
    assert sample(registry, name, outcome="not_reused", **labels) == 4
    assert sample(registry, "banaserve_prefill_store_write_back_pending_bytes", **labels) == 1 << 20


def test_kvstore_collector_counts_lookup_hits_and_misses():
    async def lookup(hashes):
        return LookupResult(["node-a"] * (len(hashes) // 2), [], len(hashes) // 2)

    pool = SimpleNamespace(
        num_bytes_used=4096,
        num_blocks=2,
        num_committed_blocks=2,
        num_pinned_blocks=0,
        num_reservations=0,
        num_disk_blocks=0,
        num_disk_bytes=0,
        num_evicted=3,
        num_promoted=0,
    )
    node = SimpleNamespace(lookup=lookup, stats=lambda: pool, num_duplicates_dropped=1)
    registry = CollectorRegistry()
    registry.register(KVStoreCollector(node))
    asyncio.run(node.lookup([b"1", b"2", b"3", b"4", b"5"]))
    assert sample(registry, "banaserve_kvstore_duplicates_dropped_total") == 1
    assert sample(registry, "banaserve_kvstore_lookup_hit_blocks_total") == 2
    assert sample(registry, "banaserve_kvstore_lookup_miss_blocks_total") == 3
    assert sample(registry, "banaserve_kvstore_evictions_total") == 3
    assert sample(registry, "banaserve_kvstore_memory_used_bytes") == 4096


def test_endpoint_serves_metrics_and_refuses_other_paths():
    registry = CollectorRegistry()
    m = RequestMetrics(registry)
    m.ended(Outcome.ERROR, None)

    async def main():
        endpoint = MetricsEndpoint(registry)
        await endpoint.start("127.0.0.1", 0)
        url = f"http://{endpoint.address}"
        try:
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url + "/metrics").read())
            with pytest.raises(urllib.error.HTTPError) as err:
                await asyncio.to_thread(urllib.request.urlopen, url + "/")
        finally:
            await endpoint.stop()
        return body, err.value.code

    body, code = asyncio.run(main())
    assert body == generate_latest(registry) and code == 404
    assert b'banaserve_router_requests_total{outcome="error"} 1.0' in body


def test_host_auto_is_this_hostnames_ip_and_wildcards_are_refused():
    assert resolve_host("auto", resolve={"pod-1": "10.1.2.3"}.get, hostname=lambda: "pod-1") == (
        "10.1.2.3"
    )
    assert resolve_host("127.0.0.1") == "127.0.0.1"
    for bad in ("0.0.0.0", "::", "localhost"):
        with pytest.raises(ConfigError):
            resolve_host(bad)


def test_replicas_on_one_port_in_their_own_containers_get_ids_of_their_own():
    """compose's ``--scale decode=2`` (or a Deployment's replicas): every replica binds the
    same port on its own IP. The default id was ``ROLE-PORT``, the same for all of them: the
    router refused all but one worker, and kvstore nodes took each other's place in Redis."""
    from services.decode.__main__ import _worker_info
    from services.decode.__main__ import parse_args as decode_args
    from services.kvstore.metadata import NodeInfo

    engine = SimpleNamespace(
        fingerprint="f",
        config=SimpleNamespace(block_size=16, max_num_seqs=8),
        block_manager=SimpleNamespace(num_blocks=64),
        max_model_len=2048,
        hosts_only=False,
    )
    args = decode_args(["--host", "auto", "--port", "50065", "--model", "tiny-llama"])
    infos = [_worker_info(args, engine, f"10.88.0.{i}:50065") for i in (5, 6)]
    assert [(w.worker_id, w.address) for w in infos] == [
        ("decode-10.88.0.5-50065", "10.88.0.5:50065"),
        ("decode-10.88.0.6-50065", "10.88.0.6:50065"),
    ]
    # Named after the address peers are told; an id given is kept.
    advertised = decode_args(["--model", "m", "--advertise", "proxy-1.example:7000"])
    assert _worker_info(advertised, engine, "127.0.0.1:50065").worker_id == (
        "decode-proxy-1.example-7000"
    )
    named = decode_args(["--model", "m", "--worker-id", "decode-a"])
    assert _worker_info(named, engine, "10.88.0.5:50065").worker_id == "decode-a"
    # An IPv6 address's colons are not in the kvstore's node-id alphabet.
    assert default_id("kvstore", "[fd00::5]:50070") == "kvstore-fd00-5-50070"
    NodeInfo(default_id("kvstore", "[fd00::5]:50070"), "[fd00::5]:50070", "[fd00::5]:1", "tcp")
    assert default_id("prefill", "10.88.0.5:50060") != default_id("prefill", "10.88.0.6:50060")


def test_coordinator_collector_counts_migrations_bytes_and_state_seconds():
    from services.common.metrics import CoordinatorCollector
    from services.coordinator.config import CoordinatorConfig
    from services.coordinator.core import Coordinator
    from services.coordinator.migration import Migration, MigrationKind, MigrationState, StateTime

    done = Migration("m1", MigrationKind.LAYERS, "decode-a", "decode-b", 0, 4, created_at=100.0)
    done.state, done.num_weight_bytes, done.num_kv_bytes = MigrationState.DONE, 1000, 200
    done.timings = [
        StateTime(MigrationState.PLANNED, 100.0, 101.0),
        StateTime(MigrationState.COPYING, 101.0, 104.0),
        StateTime(MigrationState.DONE, 104.0, None),
    ]
    live = Migration("m2", MigrationKind.ATTENTION, "decode-a", "decode-c", 0, 4, created_at=108.0)
    live.state, live.num_kv_bytes = MigrationState.COPYING, 50
    live.timings = [StateTime(MigrationState.COPYING, 108.0, None)]
    clock = lambda: 110.0  # noqa: E731
    core = Coordinator(None, None, CoordinatorConfig(), clock=clock)  # no store, no workers
    core._migrations = {m.migration_id: m for m in (done, live)}
    coordinator = core
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(coordinator))
    gauge = "banaserve_coordinator_migrations"
    assert sample(registry, gauge, kind="layers", state="done") == 1
    assert sample(registry, gauge, kind="attention", state="copying") == 1
    moved = "banaserve_coordinator_migration_bytes_total"
    assert sample(registry, moved, kind="layers", what="weights") == 1000
    assert sample(registry, moved, kind="layers", what="kv") == 200
    assert sample(registry, moved, kind="attention", what="kv") == 50
    secs = "banaserve_coordinator_migration_state_seconds_total"
    assert sample(registry, secs, kind="layers", state="copying") == 3.0
    assert sample(registry, secs, kind="layers", state="done") == 6.0  # open: up to now
    assert sample(registry, secs, kind="attention", state="copying") == 2.0
    # every kind and state exported, from 0 (probe, session 45: "no data" before a migration)
    assert sample(registry, gauge, kind="attention", state="reverting") == 0
    assert sample(registry, moved, kind="attention", what="weights") == 0
    assert sample(registry, secs, kind="layers", state="switching") == 0
    idle = CollectorRegistry()
    idle.register(CoordinatorCollector(Coordinator(None, None, CoordinatorConfig(), clock=clock)))
    assert sample(idle, gauge, kind="layers", state="active") == 0


def test_request_outcomes_and_token_kinds_are_exported_at_zero_before_any_request():
    from services.common.metrics import REQUEST_OUTCOMES, TOKEN_KINDS
    from services.router.driver import Outcome

    assert tuple(o.value for o in Outcome) == REQUEST_OUTCOMES  # the driver's, every one
    r = RequestMetrics().registry
    for outcome in REQUEST_OUTCOMES:
        assert sample(r, "banaserve_router_requests_total", outcome=outcome) == 0
    for kind in TOKEN_KINDS:
        assert sample(r, "banaserve_router_tokens_total", kind=kind) == 0


def test_request_latencies_only_for_a_first_token_delivered_and_tpot_after_it():
    m = RequestMetrics()
    r = m.registry
    # Cancelled after 20 tokens: counted with its tokens, TTFT as the caller saw it, TPOT
    # (e2e - ttft) / (n - 1).
    m.ended("cancelled", finished(FinishReason.ABORT, 20, ttft=0.065, total=0.5, kv=0))
    # Aborted before a token reached its caller: no TTFT (not a 0 s one), no E2E, no TPOT.
    m.ended("abort", finished(FinishReason.ABORT, 0, ttft=0.0, total=0.3, kv=0))
    m.ended("refused", None)  # refused before any work: no tokens
    assert sample(r, "banaserve_router_requests_total", outcome="cancelled") == 1
    assert sample(r, "banaserve_router_requests_total", outcome="abort") == 1
    assert sample(r, "banaserve_router_requests_total", outcome="refused") == 1
    assert sample(r, "banaserve_router_tokens_total", kind="prompt") == 80
    assert sample(r, "banaserve_router_tokens_total", kind="completion") == 20
    assert sample(r, "banaserve_router_ttft_seconds_count") == 1
    assert sample(r, "banaserve_router_ttft_seconds_sum") == pytest.approx(0.065)
    assert sample(r, "banaserve_router_e2e_seconds_count") == 1
    assert sample(r, "banaserve_router_tpot_seconds_sum") == pytest.approx((0.5 - 0.065) / 19)


def test_router_collector_counts_the_requests_waiting_for_room():
    """Probe, session 44: requests the router held for want of KV room (TTFTs up to 4.5 s)
    appeared in no router metric."""
    from services.common.metrics import RouterCollector
    from services.router.core import NoRoomNowError
    from tests.router.factories import FakeClock, load, make_router, request

    router = make_router("load", prefill=1, decode=2, clock=FakeClock())
    for worker_id in ("p0", "d0", "d1"):
        router.report(worker_id, load(free=2, used=98), 0.0)
    for _ in range(3):
        with pytest.raises(NoRoomNowError):
            router.route(request(40, max_tokens=8))
    registry = CollectorRegistry()
    registry.register(RouterCollector(router))
    assert sample(registry, "banaserve_router_requests_waiting_for_room") == 3
    per_worker = "banaserve_router_worker_waiting_for_room"
    assert sample(registry, per_worker, worker_id="d0", role="decode") == 3
    assert sample(registry, per_worker, worker_id="p0", role="prefill") == 0
