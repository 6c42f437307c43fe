"""Small factories for router tests: a hand-driven clock, workers, reports and prompts."""

from __future__ import annotations

import itertools

from services.common.load import LoadReport
from services.router.core import Router, RouterConfig, RouteRequest
from services.router.registry import WorkerCapacity, WorkerRole

BLOCK_SIZE = 16
FINGERPRINT = "test-model"
NUM_BLOCKS = 100


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def capacity(
    num_blocks: int = NUM_BLOCKS, fingerprint: str = FINGERPRINT, hosts_only: bool = False
) -> WorkerCapacity:
    return WorkerCapacity(num_blocks, BLOCK_SIZE, fingerprint, hosts_only=hosts_only)


def load(
    queued: int = 0,
    free: int = NUM_BLOCKS,
    used: int = 0,
    busy: float = 0.0,
    running: int = 0,
    hosted_layers: int = 0,
    hosted_blocks: int = 0,
    admitted: tuple[str, ...] = (),
    draining: bool = False,
) -> LoadReport:
    return LoadReport(
        num_queued_prefill_tokens=queued,
        num_running_seqs=running,
        num_waiting_seqs=0,
        num_blocks_used=used,
        num_blocks_free=free,
        step_time_s=0.01,
        busy_fraction=busy,
        window_s=1.0,
        num_hosted_layers=hosted_layers,
        num_hosted_blocks=hosted_blocks,
        admitted=admitted,
        draining=draining,
    )


def make_router(
    policy: str = "load",
    prefill: int = 0,
    decode: int = 0,
    mixed: int = 0,
    clock: FakeClock | None = None,
) -> Router:
    """A router with workers p0.., d0.., m0.. registered at ports 9000.., 9100.., 9200.."""
    router = Router(RouterConfig(policy=policy), clock=clock or FakeClock())
    for prefix, role, count, port in (
        ("p", WorkerRole.PREFILL, prefill, 9000),
        ("d", WorkerRole.DECODE, decode, 9100),
        ("m", WorkerRole.MIXED, mixed, 9200),
    ):
        for i in range(count):
            router.register(f"{prefix}{i}", f"127.0.0.1:{port + i}", role, capacity())
    return router


_request_ids = itertools.count()


def request(num_tokens: int = 40, max_tokens: int = 8, shared_prefix: int = 0) -> RouteRequest:
    """A request of ``num_tokens`` prompt tokens: the first ``shared_prefix`` are the same in
    every request, the rest unique to this one."""
    n = next(_request_ids)
    start = 100_000 * (n + 1)
    unique = range(start, start + num_tokens - shared_prefix)
    return RouteRequest(f"r{n}", (*range(shared_prefix), *unique), max_tokens)
