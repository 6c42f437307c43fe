"""A request the router fails for a reason after a wait is told the reason before its deadline
(``REASON_MARGIN_S``, services/common/errors.py): at the deadline the caller's own timer
wins and reads DEADLINE_EXCEEDED. A request no registered worker can serve (``_admit``) tries
last at ``deadline - REASON_MARGIN_S``, whatever phase the polls before it had, and so does one
waiting for KV room, which then fails DEADLINE_EXCEEDED saying what it waited for; a worker lost
before the first token is not retried so late that the retry would hide the loss. (A duplicate
id's wait: tests/router/test_request_ids.py.)"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from services.common.errors import REASON_MARGIN_S
from services.router import driver as driver_module
from services.router.core import NoWorkerError, RouteRequest
from services.router.driver import DriverConfig, RequestDriver, admission_wait
from tests.router.factories import FakeClock, load, make_router

POLL = 0.05


def test_admission_wait_never_sleeps_past_the_give_up_time():
    assert admission_wait(0.0, 0.45, POLL) == POLL
    assert admission_wait(0.44, 0.45, POLL) == pytest.approx(0.01)
    assert admission_wait(0.45, 0.45, POLL) is None
    assert admission_wait(0.46, 0.45, POLL) is None


@pytest.mark.parametrize("overshoot", [0.0, 0.001, 0.0055, 0.02])
def test_no_worker_fails_a_poll_before_the_deadline_whatever_each_sleep_overshoots(
    monkeypatch, overshoot
):
    """Each sleep takes ``overshoot`` longer than asked (a loaded machine). The polls then land
    anywhere against the give-up time; before the fix the last one could land just short of
    it and the next came ~0 s before the deadline (``overshoot`` 0: at it, nine 50 ms polls
    summing to 0.44999999999999996 s; 0.0055: 0.5 ms before it), where the caller's own
    deadline wins and the reason is lost."""
    clock = FakeClock()
    deadline = 0.5
    tries: list[float] = []
    router = make_router(clock=clock)  # no worker registered: every route is NoWorkerError
    route_once = router.route

    def route(request: RouteRequest):
        tries.append(clock())
        return route_once(request)

    router.route = route  # type: ignore[method-assign]
    config = DriverConfig(no_worker_wait_s=10.0, admission_poll_s=POLL)
    driver = RequestDriver(router, clients=None, config=config, clock=clock)  # type: ignore[arg-type]
    job = driver_module._Job("r1", deadline, asyncio.Queue(), ticket=None)

    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        clock.advance(seconds + overshoot)
        await real_sleep(0)

    monkeypatch.setattr(driver_module.asyncio, "sleep", sleep)

    async def main() -> None:
        with pytest.raises(NoWorkerError):
            await driver._admit(job, RouteRequest("r1", (1, 2, 3), 4))

    asyncio.run(main())
    assert len(tries) >= 2
    gave_up = tries[-1]
    assert deadline - REASON_MARGIN_S <= gave_up <= deadline - REASON_MARGIN_S + overshoot + 1e-9, (
        tries
    )
    # the tries were at most a poll apart (the last sleep is the short one to the give-up)
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert all(gap <= POLL + overshoot + 1e-9 for gap in gaps), gaps


def test_a_request_waiting_for_room_is_told_why_a_margin_before_its_deadline(monkeypatch):
    """Probe, session 42: a request that waited for KV room to its deadline read gRPC's bare
    "Deadline Exceeded" (19 of 19), or "ran past its deadline" naming no cause."""
    clock = FakeClock()
    deadline = 0.5
    router = make_router(prefill=1, decode=1, clock=clock)
    for worker_id in ("p0", "d0"):
        router.report(worker_id, load(free=2, used=98), 0.0)
    tries: list[float] = []
    route_once = router.route

    def route(request: RouteRequest):
        tries.append(clock())
        return route_once(request)

    router.route = route  # type: ignore[method-assign]
    config = DriverConfig(admission_poll_s=POLL)
    driver = RequestDriver(router, clients=None, config=config, clock=clock)  # type: ignore[arg-type]
    job = driver_module._Job("r1", deadline, asyncio.Queue(), ticket=None)
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        clock.advance(seconds + 0.003)
        await real_sleep(0)

    monkeypatch.setattr(driver_module.asyncio, "sleep", sleep)

    async def main() -> None:
        with pytest.raises(TimeoutError) as info:
            await driver._admit(job, RouteRequest("r1", tuple(range(600)), 40))
        return str(info.value)

    reason = asyncio.run(main())
    assert deadline - REASON_MARGIN_S <= tries[-1] <= deadline - REASON_MARGIN_S + 0.003 + 1e-9
    assert reason == (
        "request 'r1' waited 0.5s for KV room and its deadline is up: request 'r1' needs 40 KV "
        "blocks (600 prompt + 40 max_tokens tokens); the most free on any decode or mixed "
        "worker now is 2"
    )


def test_a_lost_worker_is_not_retried_so_late_that_the_retry_hides_the_loss():
    clock = FakeClock()
    run = driver_module._LossRun(clock)
    run.note(0)
    assert run.within(10.0, 0.0, 1.0)  # the first retry, at once
    assert run.within(10.0, 0.2, 0.2 + REASON_MARGIN_S + 0.01)
    # a retry that would start inside the margin: the request fails now, with the loss
    assert not run.within(10.0, 0.2, 0.2 + REASON_MARGIN_S)
    assert not run.within(10.0, 0.0, REASON_MARGIN_S / 2)
