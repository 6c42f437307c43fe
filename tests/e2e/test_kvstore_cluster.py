"""End to end, real processes: Redis, a kvstore node (UCX data plane), router, 2-3 prefill and
1 decode worker on tiny-llama.

A prefix asked for twice is written to the store and reused by a third prefill worker, token
for token the same as the in-process engine (the default write policy: only reused blocks are
written); killing the kvstore node or Redis mid-run only makes requests recompute, never changes
or fails them.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from services.client.client import BanaServeClient
from services.common.types import SamplingParams
from services.launcher import ClusterSpec, LocalCluster
from services.rpc.gen.banaserve.v1 import kvstore_pb2, kvstore_pb2_grpc
from tests.engine.helpers import make_engine

pytestmark = pytest.mark.e2e

MAX_TOKENS = 8
PREFIX = torch.randint(5, 4000, (96,), generator=torch.Generator().manual_seed(7)).tolist()


def suffix(seed: int, n: int = 20) -> list[int]:
    return torch.randint(5, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def cluster(banaserve_home, tiny_llama, tmp_path, request):
    num_prefill, write_policy = getattr(request, "param", (2, "all"))
    spec = ClusterSpec(
        num_prefill=num_prefill,
        policy="round_robin",  # consecutive requests land on different prefill workers
        num_kv_blocks=512,
        store_write_policy=write_policy,  # None: the workers' default
        extra_env={"BANASERVE_HOME": str(banaserve_home)},
    )
    with open(tmp_path / "cluster.log", "w") as log:
        cluster = LocalCluster(spec, log)
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()


def store_blocks(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = kvstore_pb2_grpc.KVStoreServiceStub(channel)
        stats = stub.Stats(kvstore_pb2.KVStoreServiceStatsRequest(), timeout=5)
    return stats.num_blocks if stats.num_reservations == 0 else -1


def wait_for_blocks(address: str, n: int, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while store_blocks(address) < n:
        assert time.monotonic() < deadline, "the write-back did not land in time"
        time.sleep(0.05)


def expected(model, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [c.token_ids for c in make_engine(model).generate(prompts, params)]


def complete(client: BanaServeClient, prompt: list[int]):
    return client.complete(
        prompt, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, timeout_s=60
    )


@pytest.mark.parametrize("cluster", [(3, None)], indirect=True)
def test_a_prefix_asked_for_twice_is_written_and_reused_by_a_third_worker(cluster, tiny_llama):
    prompts = [PREFIX + suffix(seed) for seed in (1, 2, 3)]
    kvstore = cluster.child("kvstore-0").address
    with BanaServeClient(cluster.router.address) as client:
        first = complete(client, prompts[0])  # its first sight: nothing written
        second = complete(client, prompts[1])  # asked for before: the 6 prefix blocks
        wait_for_blocks(kvstore, 6)
        third = complete(client, prompts[2])
        time.sleep(0.5)  # the third's write-back (nothing new is reused) would have landed
        num_blocks = store_blocks(kvstore)
    got = [first, second, third]
    assert len({r.prefill_worker_id for r in got}) == 3
    assert [r.num_cached_tokens for r in got] == [0, 0, 96]
    # 116 tokens: 7 full blocks each, but the 7th (with the suffix) was never asked for twice.
    assert num_blocks == 6
    assert [list(r.token_ids) for r in got] == expected(tiny_llama, prompts)


def test_killing_the_kvstore_or_redis_only_makes_requests_recompute(cluster, tiny_llama):
    prompts = [PREFIX + suffix(seed) for seed in range(10, 16)]
    want = expected(tiny_llama, prompts)
    kvstore = cluster.child("kvstore-0")
    with BanaServeClient(cluster.router.address) as client:
        got = [complete(client, prompts[0])]
        wait_for_blocks(kvstore.address, 7)
        got.append(complete(client, prompts[1]))
        assert got[-1].num_cached_tokens == 96  # the store served the other worker
        # Redis gone: the node answers lookups with UNAVAILABLE; the workers compute.
        redis = cluster.child("redis")
        redis.proc.kill()
        redis.proc.wait(10)
        started = time.monotonic()
        got += [complete(client, p) for p in prompts[2:4]]
        assert time.monotonic() - started < 20  # bounded lookups, not a hang per request
        # The node gone too: lookups are refused at once.
        kvstore.proc.kill()
        kvstore.proc.wait(10)
        got += [complete(client, p) for p in prompts[4:]]
    assert [list(r.token_ids) for r in got] == want
    # Without the store each prefill worker still has its own prefix cache.
    assert all(r.num_cached_tokens in (0, 96) for r in got[2:])
