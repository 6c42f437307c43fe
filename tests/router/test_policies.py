"""Prefill policies in isolation: exact choices from hand-built worker snapshots."""

from __future__ import annotations

from services.common.hashing import block_hashes
from services.router.policies import (
    LoadPolicy,
    PrefixAffinityPolicy,
    RequestView,
    RoundRobinPolicy,
    least_loaded,
    most_free_blocks,
)
from services.router.registry import WorkerInfo, WorkerRole, WorkerStatus
from tests.router.factories import BLOCK_SIZE, FINGERPRINT, capacity


def worker(
    worker_id: str, queued: int = 0, busy: float = 0.0, used: int = 0, free: int = 100
) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        address="h:1",
        role=WorkerRole.PREFILL,
        status=WorkerStatus.HEALTHY,
        capacity=capacity(100),
        last_report=None,
        num_queued_tokens=queued,
        num_free_blocks=free,
        num_used_blocks=used,
        utilisation_compute=max(busy, queued / 1000),
        utilisation_memory=used / 100,
        seconds_since_seen=0.0,
        removed_reason="",
    )


def view(num_blocks: int, first_token: int = 0) -> RequestView:
    """A request whose prompt is ``num_blocks`` full blocks of 0, 1, 2, ... from first_token."""
    tokens = list(range(first_token, first_token + num_blocks * BLOCK_SIZE))
    hashes = tuple(block_hashes(tokens, BLOCK_SIZE, FINGERPRINT))
    return RequestView("r", len(tokens), 1, hashes, num_blocks + 1)


def test_least_loaded_orders_by_queue_then_utilisation_then_id() -> None:
    # Equal queues (both empty): the lower U, then the lower id.
    assert least_loaded([worker("a", busy=0.5), worker("b", busy=0.4)]).worker_id == "b"
    assert least_loaded([worker("b"), worker("a")]).worker_id == "a"
    # Memory counts in U: a quiet worker with a full KV pool is not the least loaded.
    assert least_loaded([worker("a", used=90), worker("b", busy=0.3)]).worker_id == "b"
    # The shorter queue wins whatever the busy fraction says: a decoding worker (busy 1.0)
    # starts a new prompt within a step; one busy half the last second has 1,600 tokens
    # queued (U = 0.5 here: the busy fraction dominates the queue's 1,600 / 4,096).
    assert (
        least_loaded([worker("a", busy=1.0), worker("b", busy=0.5, queued=1600)]).worker_id == "a"
    )
    assert (
        least_loaded([worker("a", busy=0.5, queued=20), worker("b", busy=0.1, queued=30)]).worker_id
        == "a"
    )


def test_load_policy_ignores_cached_prefixes() -> None:
    policy = LoadPolicy()
    workers = [worker("a", queued=100), worker("b", queued=50)]
    assert [policy.choose(workers, view(4)).worker_id for _ in range(3)] == ["b", "b", "b"]


def test_most_free_blocks_then_id() -> None:
    assert most_free_blocks([worker("a", free=10), worker("b", free=30)]).worker_id == "b"
    assert most_free_blocks([worker("b", free=30), worker("a", free=30)]).worker_id == "a"


def test_round_robin_cycles_by_id_across_membership_changes() -> None:
    policy = RoundRobinPolicy()
    a, b, c, d = worker("a"), worker("b"), worker("c"), worker("d")
    picks = [policy.choose([a, b, c], view(1)).worker_id for _ in range(4)]
    assert picks == ["a", "b", "c", "a"]
    # b leaves: the cycle goes on after a without repeating it.
    assert [policy.choose([a, c], view(1)).worker_id for _ in range(3)] == ["c", "a", "c"]
    # d joins after c: it is next, then the cycle wraps.
    assert [policy.choose([a, c, d], view(1)).worker_id for _ in range(3)] == ["d", "a", "c"]


def test_prefix_affinity_follows_the_longest_cached_prefix() -> None:
    policy = PrefixAffinityPolicy(capacity=100)
    a, b, c = worker("a", busy=0.9), worker("b", busy=0.8), worker("c")
    assert policy.choose([a], view(3)).worker_id == "a"  # blocks 0..2 → a
    assert policy.choose([b], view(1)).worker_id == "b"  # block 0 → b
    # Among b and c only b holds a prefix (block 0): b, not the idle c; blocks 0..1 → b.
    assert policy.choose([b, c], view(2)).worker_id == "b"
    # a holds 3 blocks of the prefix, b two: a wins although it is the busiest.
    assert policy.choose([a, b, c], view(4)).worker_id == "a"
    # No hit at all: least loaded.
    assert policy.choose([a, b, c], view(2, first_token=5000)).worker_id == "c"


def test_prefix_affinity_map_is_a_bounded_lru() -> None:
    policy = PrefixAffinityPolicy(capacity=3)
    a, b = worker("a"), worker("b", busy=0.5)
    policy.choose([a], view(2))  # h0, h1 → a
    policy.choose([b], view(2, first_token=7000))  # g0, g1 → b; evicts h0, the oldest
    assert len(policy) == 3
    # h1 still maps to a; routing refreshes h0, h1 → a, which evicts g0.
    assert policy.choose([a, b], view(2)).worker_id == "a"
    assert len(policy) == 3
    # g0 is gone: a miss, so the least-loaded a, not b.
    assert policy.choose([b, a], view(1, first_token=7000)).worker_id == "a"
