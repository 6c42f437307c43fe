"""banaserve's global KV store in the simulator: what it holds, and a prefix fetched from it."""

from __future__ import annotations

import pytest

from services.launcher import Mode
from services.prefill.write_backs import WritePolicy
from services.router.registry import WorkerRole
from services.sim.cluster import SimCluster, SimSpec
from services.sim.events import EventLoop
from services.sim.store import SimStore
from services.sim.worker import SimWorker
from tests.sim.factories import assert_no_leaks, make_profile, request


def test_the_store_holds_a_chain_least_recently_used_first():
    store = SimStore(capacity_blocks=3)
    a, b, c, d = (bytes([i]) * 16 for i in range(1, 5))
    store.write([a, b, c])
    assert store.lookup([a, b, d]) == 2 and store.lookup([d, a]) == 0  # from the first only
    store.write([d])  # c is the least recently used (a, b were just looked up): evicted
    assert [h in store for h in (a, b, c, d)] == [True, True, False, True]
    store.write([a])  # held already: used, not written twice
    store.write([c])  # b is the least recently used now
    assert [h in store for h in (a, b, c, d)] == [True, False, True, True]
    assert (store.num_written_blocks, store.num_evicted_blocks, store.num_hit_blocks) == (5, 2, 2)
    with pytest.raises(ValueError):
        SimStore(0)


def test_asked_for_blocks_are_marked_as_the_real_lookup_marks_them():
    store = SimStore(capacity_blocks=8)
    a, b, c, d = (bytes([i]) * 16 for i in range(1, 5))
    assert store.mark_asked([a, b, c], 0) == 0  # first sight
    assert store.mark_asked([a, b, d], 0) == 2 and store.mark_asked([a, b, d], 0) == 3
    assert store.mark_asked([d, a], 1) == 2  # the held first, then asked-for ones
    assert store.mark_asked([], 0) == 0


def two_prefill_workers(store: SimStore | None, n: int = 2, policy: WritePolicy = WritePolicy.ALL):
    """``n`` prefill workers of one loop (10 ms a prompt token; tcp 10 ms + 200 kB/s; 2 layers
    of 1,000 B a block), sharing ``store`` and writing to it by ``policy``; the first tokens'
    times by request."""
    loop, profile = EventLoop(), make_profile()
    workers = [SimWorker(f"prefill-{i}", WorkerRole.PREFILL, profile, loop, 2048) for i in range(n)]
    firsts: dict[str, float] = {}
    for w in workers:
        w.store, w.write_policy = store, policy
        w.on_prefilled = lambda seq: firsts.setdefault(seq.request_id, loop.now)
    return loop, workers, firsts


def test_a_prefix_one_worker_wrote_is_fetched_by_the_other_while_its_suffix_computes():
    # A: 49 tokens on worker 0, 0.49 s; its 3 full blocks go to the store. B, the same prompt
    # on worker 1 at 1.0: 48 tokens (3 blocks x 2 layers x 1,000 B) fetched, 10 ms + 30 ms,
    # while its last token computes (10 ms): max(40, 10) + 10 / 2 layers = 45 ms.
    prompt = list(request(0, 0.0, 49, 1).prompt)
    store = SimStore(capacity_blocks=100)
    loop, (w0, w1), firsts = two_prefill_workers(store)
    w0.add("a", prompt, 1)
    loop.run(1.0)
    assert firsts["a"] == pytest.approx(0.49) and len(store) == 3
    w1.add("b", prompt, 1)
    loop.run(2.0)
    assert firsts["b"] == pytest.approx(1.045)
    assert (w0.num_store_hit_tokens, w1.num_store_hit_tokens) == (0, 48)
    # Worker 1 now holds the 3 blocks itself: its own prefix cache, no fetch (0.01 s).
    w1.add("c", prompt, 1)
    loop.run(3.0)
    assert firsts["c"] == pytest.approx(2.01) and w1.num_store_hit_tokens == 48
    for w in (w0, w1):
        assert w.block_manager.num_free_blocks == w.block_manager.num_blocks and not w.busy


def test_by_default_a_prefix_is_written_once_asked_for_twice_and_fetched_by_a_third():
    prompt = list(request(0, 0.0, 49, 1).prompt)
    store = SimStore(capacity_blocks=100)
    loop, workers, firsts = two_prefill_workers(store, 3, WritePolicy.REUSED)
    for i, w in enumerate(workers):
        w.add(f"r{i}", prompt, 1)
        loop.run(1.0 + i)
        # Written after the second sight (its 3 full blocks), fetched by the third (45 ms).
        assert len(store) == (0, 3, 3)[i]
    assert [firsts[f"r{i}"] for i in range(3)] == pytest.approx([0.49, 1.49, 2.045])
    assert [w.num_store_hit_tokens for w in workers] == [0, 0, 48]
    assert store.num_written_blocks == 3


def test_without_a_store_the_other_worker_computes_it_all():
    prompt = list(request(0, 0.0, 49, 1).prompt)
    loop, (w0, w1), firsts = two_prefill_workers(None)
    w0.add("a", prompt, 1)
    loop.run(1.0)
    w1.add("b", prompt, 1)
    loop.run(2.0)
    assert firsts["b"] == pytest.approx(1.49) and w1.num_store_hit_tokens == 0


def test_only_banaserve_has_a_store_and_its_prefill_workers_share_it():
    profile = make_profile()
    for mode, has_store in ((Mode.COLOCATED, False), (Mode.STATIC_PD, False),
                            (Mode.BANASERVE, True)):  # fmt: skip
        cluster = SimCluster(SimSpec(mode, 4), profile)
        assert (cluster.store is not None) is has_store, mode
        prefill = [w for w in cluster.workers.values() if w.role is WorkerRole.PREFILL]
        assert all(w.store is cluster.store for w in prefill)
    # 1 GiB of 2,000-byte blocks (2 layers x 1,000 B).
    assert cluster.store.capacity_blocks == (1 << 30) // 2000
    # Requests through the router, writing every new block: every block a prefill worker
    # computed is in the store.
    cluster = SimCluster(SimSpec(Mode.BANASERVE, 4, store_write_policy=WritePolicy.ALL), profile)
    cluster.run([request(i, 0.1 * i, 40, 2) for i in range(6)])
    assert len(cluster.store) == 6 * 2 and cluster.num_store_hit_tokens == 0
    # Load routing (the shortest prompt queue, then U) put r0, r3, r5 on the first prefill
    # worker and r1, r2, r4 on the second (r2 ties on 40 queued tokens each and goes to the
    # less busy second). The same prompts again in swapped pairs (r1, r0, r3, r2, r5, r4),
    # 0.1 s apart, alternate over the two idle workers from the first: r1 to the first and r0
    # to the second — the worker that did not compute it: each fetches its 2 full blocks (32
    # tokens) from the store — and r3, r2, r5, r4 each back to the worker that computed it
    # (its own prefix cache: no lookup reaches the store).
    again = [request(i ^ 1, 5.0 + 0.1 * j, 40, 2) for j, i in enumerate(range(6))]
    for r in again:
        r.request_id += "-again"
    cluster.run(again, start_s=5.0)
    prefill = [w for w in cluster.workers.values() if w.role is WorkerRole.PREFILL]
    assert [w.num_store_hit_tokens for w in prefill] == [32, 32]
    assert cluster.num_store_hit_tokens == 2 * 32 and cluster.store.num_hit_blocks == 4
    assert all(r.status == "OK" for r in cluster.requests.values())
    assert_no_leaks(cluster)
