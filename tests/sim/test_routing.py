"""The simulator's cached registry answers exactly what the router's own registry answers."""

from __future__ import annotations

from dataclasses import replace

from services.router.core import Router, RouterConfig, RouteRequest
from services.router.registry import WorkerRole
from services.sim.routing import sim_router
from tests.router.factories import FakeClock, capacity, load


def build(cached: bool) -> tuple[Router, FakeClock]:
    clock = FakeClock()
    router = Router(RouterConfig(policy="load"), clock=clock)
    if cached:
        router = sim_router(router, sweep_s=0.5)
    for i, role in enumerate((WorkerRole.PREFILL, WorkerRole.PREFILL, WorkerRole.DECODE)):
        router.register(f"w{i}", f"127.0.0.1:{9000 + i}", role, capacity())
    return router, clock


def drive(router: Router, clock: FakeClock) -> list[tuple[str, str]]:
    """Reports, routes and a refusal; the pairs chosen."""
    chosen: list[tuple[str, str]] = []
    sent: tuple[str, ...] = ()
    for step in range(6):
        clock.advance(0.1)
        # P workers admit the last step's requests at once; w2 one step later.
        router.report("w0", load(queued=100 * step, busy=0.5, admitted=sent), clock.now)
        router.report("w1", load(queued=50, busy=0.1 * step, admitted=sent), clock.now)
        late = tuple(f"r{step - 2}-{k}" for k in range(3))
        router.report("w2", load(free=100 - 10 * step, used=10 * step, admitted=late), clock.now)
        router.settle(f"r{step - 1}-0")  # one ended before any report named it
        sent = tuple(f"r{step}-{k}" for k in range(3))
        for request_id in sent:
            a = router.route(RouteRequest(request_id, tuple(range(40)), 8))
            chosen.append((a.prefill.worker_id, a.decode.worker_id))
        if step == 3:
            router.mark_full("w2")
            clock.advance(0.05)
            router.report("w2", load(free=60, used=40), clock.now)
    clock.advance(0.05)
    router.report("w2", load(free=50, used=50), clock.now)
    return chosen


def test_the_same_routes_and_snapshots_as_the_real_registry():
    real, real_clock = build(cached=False)
    sim, sim_clock = build(cached=True)
    assert drive(sim, sim_clock) == drive(real, real_clock)
    strip = lambda infos: [replace(i, seconds_since_seen=0.0) for i in infos]  # noqa: E731
    assert strip(sim._registry.healthy()) == strip(real._registry.healthy())
    assert [(w, t) for w, t, _ in sim._registry.last_reports()] == [
        ("w0", real_clock.now - 0.05),
        ("w1", real_clock.now - 0.05),
        ("w2", real_clock.now),
    ]
