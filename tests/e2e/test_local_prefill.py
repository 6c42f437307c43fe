"""Conditional disaggregation across real processes: router (``--local-prefill-max-tokens 32``)
+ 1 prefill + 1 decode worker on tiny-llama. A prompt whose prefix the decode worker holds,
with at most 32 more tokens, is prefilled by the decode worker itself (no prefill worker, no
KV handoff); others go through the prefill worker. Greedy outputs equal the in-process engine's
and every block is free afterwards."""

from __future__ import annotations

import pytest

from services.launcher import ClusterSpec
from tests.clusters import running_cluster
from tests.e2e.test_cluster import assert_workers_idle, greedy_as_the_engine, prompt_ids

pytestmark = pytest.mark.e2e


def pd_cluster(banaserve_home, tmp_path_factory, *router_args: str, decode_args=()):
    """Router (with ``router_args``) + 1 prefill + 1 decode worker (``decode_args``), TCP
    handoff, no store."""
    env = {"BANASERVE_HOME": str(banaserve_home)}
    spec = ClusterSpec(num_kv_blocks=512, num_kvstore=0, kv_transport="tcp", extra_env=env,
                       service_args={"router": router_args, "decode": tuple(decode_args)})  # fmt: skip
    with running_cluster(spec, tmp_path_factory.mktemp("logs") / "cluster.log") as cluster:
        yield {
            "router": cluster.router,
            "prefill": cluster.child("prefill-0"),
            "decode": cluster.child("decode-0"),
        }


@pytest.fixture(scope="module")
def cluster(banaserve_home, tmp_path_factory):
    yield from pd_cluster(banaserve_home, tmp_path_factory, "--local-prefill-max-tokens", "32")


def test_short_suffixes_on_a_held_prefix_are_prefilled_by_the_decode_worker(cluster, tiny_llama):
    prefix = prompt_ids(5 * 16, 1201)
    prompts = [prefix + prompt_ids(n, 1202 + n) for n in (7, 20, 31, 60, 3)]
    # the first alone: nothing is held yet, it goes through the prefill worker
    results = greedy_as_the_engine(cluster["router"].address, tiny_llama, prompts, 6, alone=1)
    decode_id = results[0].decode_worker_id
    where = [(r.prefill_worker_id == decode_id, r.server_timings.kv_bytes > 0) for r in results]
    # 87 tokens first (no prefix held); then 20, 31, 3 tokens after the prefix: on D, no KV;
    # 60 after it: the prefill worker, sending only the blocks after the prefix.
    assert where == [(False, True), (True, False), (True, False), (False, True), (True, False)]
    assert_workers_idle(cluster)


@pytest.fixture(scope="module")
def queue_cluster(banaserve_home, tmp_path_factory):
    # the decode worker prefills in chunks of 16 tokens, as banaserve's of 256 (up --mode)
    yield from pd_cluster(banaserve_home, tmp_path_factory, "--local-prefill-queue-tokens", "1",
                          decode_args=("--max-num-batched-tokens", "16"))  # fmt: skip


def test_while_the_prefill_worker_has_a_queue_the_decode_worker_prefills(queue_cluster, tiny_llama):
    """``--local-prefill-queue-tokens 1``: a prompt routed while the prefill worker has any
    queued (by the router's estimate) is prefilled by the decode worker, whatever its cache
    holds: of concurrent cold prompts, the first goes to the prefill worker, later ones to D —
    in 16-token chunks there (4-6 steps a prompt, beside the others' decodes), the same tokens."""
    prompts = [prompt_ids(60 + 7 * i, 1300 + i) for i in range(6)]
    results = greedy_as_the_engine(queue_cluster["router"].address, tiny_llama, prompts, 4)
    on_decode = [r.prefill_worker_id == r.decode_worker_id for r in results]
    assert any(on_decode) and not all(on_decode), on_decode
    assert all(r.server_timings.kv_bytes == 0 for r, d in zip(results, on_decode, strict=True) if d)
    assert_workers_idle(queue_cluster)
