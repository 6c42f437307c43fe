from __future__ import annotations

import pytest

from services.sim.events import EventLoop


def test_events_run_in_time_order_and_ties_in_schedule_order():
    loop, seen = EventLoop(), []
    loop.at(2.0, lambda: seen.append(("b", loop.now)))
    loop.at(1.0, lambda: seen.append(("a", loop.now)))
    loop.at(2.0, lambda: seen.append(("c", loop.now)))
    loop.at(1.0, lambda: loop.after(0.5, lambda: seen.append(("d", loop.now))))
    loop.run()
    assert seen == [("a", 1.0), ("d", 1.5), ("b", 2.0), ("c", 2.0)]
    assert loop.num_events == 5 and loop.pending == 0


def test_run_until_stops_the_clock_there_and_keeps_later_events():
    loop, seen = EventLoop(), []
    loop.at(1.0, lambda: seen.append(1))
    loop.at(3.0, lambda: seen.append(3))
    loop.run(until=2.0)
    assert seen == [1] and loop.now == 2.0 and loop.pending == 1
    loop.run()
    assert seen == [1, 3]


def test_stop_condition_is_checked_after_each_event():
    loop, seen = EventLoop(), []
    for t in (1.0, 2.0, 3.0):
        loop.at(t, lambda t=t: seen.append(t))
    loop.run(stop=lambda: len(seen) == 2)
    assert seen == [1.0, 2.0] and loop.now == 2.0


def test_an_event_in_the_past_is_refused():
    loop = EventLoop()
    loop.at(1.0, lambda: None)
    loop.run()
    with pytest.raises(ValueError):
        loop.at(0.5, lambda: None)
