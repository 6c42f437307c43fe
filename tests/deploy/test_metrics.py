"""Every service's ``/metrics`` (real processes: Redis, kvstore, router, prefill, decode on
tiny-llama): the documented names are served, and the counters move with traffic by exactly
what the requests did."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from services.client.client import BanaServeClient
from services.kvstore.redis_server import free_port
from services.launcher import ClusterSpec, LocalCluster
from tests.clusters import scrape, value

pytestmark = pytest.mark.integration

MAX_TOKENS = 6
PROMPT = list(range(10, 10 + 40))  # 40 tokens: 2 full blocks of 16
NUM_KV_BLOCKS = 64

# The names docs/deploy.md documents, per service (counters without their _total suffix, as
# the parser names a family; histograms by their family name).
DOCUMENTED = {
    "router": {
        "banaserve_router_requests",
        "banaserve_router_ttft_seconds",
        "banaserve_router_tpot_seconds",
        "banaserve_router_e2e_seconds",
        "banaserve_router_kv_transfer_seconds",
        "banaserve_router_kv_transfer_bytes",
        "banaserve_router_tokens",
        "banaserve_router_resumes",
        "banaserve_router_workers",
        "banaserve_router_inflight_assignments",
        "banaserve_router_requests_waiting_for_room",
        "banaserve_router_worker_waiting_for_room",
        "banaserve_router_worker_queued_tokens",
        "banaserve_router_worker_kv_blocks_free",
        "banaserve_router_worker_kv_blocks_used",
        "banaserve_router_worker_utilisation_ratio",
        "process_resident_memory_bytes",
    },
    "prefill": {
        "banaserve_worker_kv_blocks",
        "banaserve_worker_running_seqs",
        "banaserve_worker_waiting_seqs",
        "banaserve_worker_hosted_kv_blocks",
        "banaserve_worker_hosted_layers",
        "banaserve_worker_preemptions",
        "banaserve_worker_overlapped_steps",
        "process_resident_memory_bytes",
    },
    "kvstore": {
        "banaserve_kvstore_memory_used_bytes",
        "banaserve_kvstore_blocks",
        "banaserve_kvstore_committed_blocks",
        "banaserve_kvstore_evictions",
        "banaserve_kvstore_promotions",
        "banaserve_kvstore_duplicates_dropped",
        "banaserve_kvstore_lookup_hit_blocks",
        "banaserve_kvstore_lookup_miss_blocks",
        "process_resident_memory_bytes",
    },
}
DOCUMENTED["decode"] = DOCUMENTED["prefill"]


@pytest.fixture(scope="module")
def cluster(banaserve_home, tiny_llama, tmp_path_factory):
    ports = {name: free_port() for name in DOCUMENTED}
    spec = ClusterSpec(
        num_kv_blocks=NUM_KV_BLOCKS,
        kvstore_transport="tcp",
        kv_transport="tcp",
        extra_env={"BANASERVE_HOME": str(banaserve_home)},
        service_args={name: ("--metrics-port", str(port)) for name, port in ports.items()},
    )
    with open(tmp_path_factory.mktemp("logs") / "cluster.log", "w") as log:
        cluster = LocalCluster(spec, log)
        cluster.start()
        try:
            yield cluster, ports
        finally:
            cluster.stop()


def test_every_service_serves_the_documented_names(cluster):
    _, ports = cluster
    for name, port in ports.items():
        assert DOCUMENTED[name] <= set(scrape(port)), name


def test_counters_move_with_traffic(cluster):
    c, ports = cluster
    before = {name: scrape(port) for name, port in ports.items()}
    assert (
        value(
            before["router"],
            "banaserve_router_workers",
            "banaserve_router_workers",
            role="prefill",
            status="healthy",
        )
        == 1
    )
    with BanaServeClient(c.router.address) as client:
        for _ in range(2):
            result = client.complete(
                PROMPT, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, timeout_s=60
            )
            assert len(result.token_ids) == MAX_TOKENS
    after = {name: scrape(port) for name, port in ports.items()}

    def moved(service: str, family: str, sample: str, **labels: str) -> float:
        return value(after[service], family, sample, **labels) - value(
            before[service], family, sample, **labels
        )

    router = "banaserve_router_"
    assert moved("router", router + "requests", router + "requests_total", outcome="length") == 2
    for hist in ("ttft", "e2e", "tpot", "kv_transfer"):
        assert moved("router", f"{router}{hist}_seconds", f"{router}{hist}_seconds_count") == 2
    tokens = router + "tokens"
    assert moved("router", tokens, tokens + "_total", kind="prompt") == 2 * len(PROMPT)
    assert moved("router", tokens, tokens + "_total", kind="completion") == 2 * MAX_TOKENS
    assert moved("router", router + "kv_transfer_bytes", router + "kv_transfer_bytes_total") > 0
    # The first request asks the store for the prompt's 2 full blocks and misses both; the
    # second finds them in the prefill worker's own prefix cache and asks the store nothing.
    kv = "banaserve_kvstore_lookup_"
    assert moved("kvstore", kv + "miss_blocks", kv + "miss_blocks_total") == len(PROMPT) // 16
    assert moved("kvstore", kv + "hit_blocks", kv + "hit_blocks_total") == 0
    for role in ("prefill", "decode"):
        blocks = {
            state: value(
                after[role],
                "banaserve_worker_kv_blocks",
                "banaserve_worker_kv_blocks",
                role=role,
                model="tiny-llama",
                state=state,
            )
            for state in ("used", "free")
        }
        assert blocks["used"] + blocks["free"] == NUM_KV_BLOCKS, role
        running = value(
            after[role],
            "banaserve_worker_running_seqs",
            "banaserve_worker_running_seqs",
            role=role,
            model="tiny-llama",
        )
        assert running == 0, role
    # Nothing the router sent is still counted on top of the workers' reports.
    inflight = "banaserve_router_inflight_assignments"
    assert value(after["router"], inflight, inflight) == 0


def test_metrics_are_off_unless_asked_and_unknown_paths_are_404(cluster):
    _, ports = cluster
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{ports['router']}/other", timeout=5)
    assert err.value.code == 404


def test_a_cancelled_call_counts_cancelled_with_the_tokens_it_delivered(cluster):
    """A real router and workers: a gRPC call cancelled mid-stream ends in one outcome,
    ``cancelled``, with the tokens its caller got (session 44's probe: none were counted)."""
    import grpc

    from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2, router_pb2_grpc

    c, ports = cluster
    router = "banaserve_router_"
    before = scrape(ports["router"])
    request = router_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(max_tokens=200, ignore_eos=True),
    )
    with grpc.insecure_channel(c.router.address) as channel:
        call = router_pb2_grpc.RouterServiceStub(channel).Generate(request, timeout=60)
        frames = [next(call) for _ in range(4)]  # started, then three deltas
        assert [f.WhichOneof("frame") for f in frames] == ["started", "delta", "delta", "delta"]
        call.cancel()
    after = scrape(ports["router"])
    for _ in range(50):  # the router sees the cancel a moment later
        after = scrape(ports["router"])
        if value(after, router + "requests", router + "requests_total", outcome="cancelled"):
            break
        time.sleep(0.1)

    def moved(family: str, sample: str, **labels: str) -> float:
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    requests = router + "requests"
    outcomes = ("stop", "length", "abort", "cancelled", "error", "refused")
    counts = {o: moved(requests, requests + "_total", outcome=o) for o in outcomes}
    assert {o: n for o, n in counts.items() if n} == {"cancelled": 1}
    tokens = router + "tokens"
    assert moved(tokens, tokens + "_total", kind="prompt") == len(PROMPT)
    assert 3 <= moved(tokens, tokens + "_total", kind="completion") < 200
    assert moved(router + "ttft_seconds", router + "ttft_seconds_count") == 1
