"""A request ends at the context (LENGTH) whatever its max_tokens, so the router reserves no
more than the context for it: max_tokens = 2^31 - 1 is served, not refused (issue 8's fuzz)."""

from __future__ import annotations

import pytest

from services.common.errors import ResourceExhaustedError
from services.common.types import MAX_INT32
from services.router.core import Router, RouterConfig, RouteRequest
from services.router.registry import WorkerCapacity, WorkerRole
from tests.router.factories import BLOCK_SIZE, FINGERPRINT, NUM_BLOCKS, FakeClock, load

PROMPT = tuple(range(1, 11))


def router_with_context(*contexts: int) -> Router:
    """p0 and one decode worker per context (0: not declared), each with NUM_BLOCKS blocks."""
    router = Router(RouterConfig(), clock=FakeClock())
    workers = [("p0", WorkerRole.PREFILL, contexts[0])]
    workers += [(f"d{i}", WorkerRole.DECODE, c) for i, c in enumerate(contexts)]
    for port, (worker_id, role, context) in enumerate(workers, 9000):
        capacity = WorkerCapacity(NUM_BLOCKS, BLOCK_SIZE, FINGERPRINT, context)
        router.register(worker_id, f"127.0.0.1:{port}", role, capacity)
        router.report(worker_id, load(), 1.0)
    return router


def test_the_estimate_stops_at_the_largest_declared_context():
    router = router_with_context(256, 512)
    assignment = router.route(RouteRequest("r1", PROMPT, MAX_INT32))
    assert (assignment.decode.worker_id, assignment.num_kv_blocks) == ("d0", 512 // BLOCK_SIZE)
    short = router.route(RouteRequest("r2", PROMPT, 6))  # under the context: as before
    assert short.num_kv_blocks == 1


def test_without_a_declared_context_a_request_past_every_pool_is_refused():
    router = router_with_context(0)
    with pytest.raises(ResourceExhaustedError, match="more than any decode or mixed worker"):
        router.route(RouteRequest("r1", PROMPT, MAX_INT32))


def test_a_context_must_not_be_negative():
    with pytest.raises(ValueError, match="max_model_len must be >= 0, got -1"):
        WorkerCapacity(NUM_BLOCKS, BLOCK_SIZE, FINGERPRINT, -1)


def test_the_estimate_stops_at_the_decode_workers_context_not_a_prefill_workers():
    """A prefill worker hands the sequence off: its larger pool (context) holds none of it past
    the prompt, so the decode workers' context caps the estimate (probe, session 42: a
    prefill pool of 64 blocks beside a decode pool of 16 refused max_tokens = 2^31 - 1)."""
    router = Router(RouterConfig(), clock=FakeClock())
    for port, (worker_id, role, blocks) in enumerate(
        [("p0", WorkerRole.PREFILL, 64), ("d0", WorkerRole.DECODE, 16)], 9000
    ):
        capacity = WorkerCapacity(blocks, BLOCK_SIZE, FINGERPRINT, blocks * BLOCK_SIZE)
        router.register(worker_id, f"127.0.0.1:{port}", role, capacity)
        router.report(worker_id, load(free=blocks), 1.0)
    assignment = router.route(RouteRequest("r1", PROMPT, MAX_INT32))
    assert (assignment.decode.worker_id, assignment.num_kv_blocks) == ("d0", 16)
