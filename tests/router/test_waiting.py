"""The router's line of requests waiting for room (services/router/waiting.py) against the
whole-line sum it replaced (a scan of every waiter at every attempt: O(waiting²) a poll), on
random histories: ties in ``since``, waiters that change workers or size, leave, give up."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.router.core import NoRoomNowError
from services.router.waiting import Waiter, WaitingRoom, _Line
from tests.router.factories import FakeClock, load, make_router, request

TTL_S = 1.0
WORKERS = ("d0", "d1", "d2")
REQUESTS = tuple(f"r{i}" for i in range(8))


class Reference:
    """The former ``Router._held`` and ``waiting_for_room``, verbatim in substance."""

    def __init__(self) -> None:
        self.waiting: dict[str, Waiter] = {}

    def wait(self, rid: str, now: float, worker_ids: tuple[str, ...], blocks: int) -> None:
        old = self.waiting.pop(rid, None)
        since = old.since if old is not None else now
        self.waiting[rid] = Waiter(now, since, worker_ids, blocks)

    def forget(self, now: float) -> None:
        for rid in [r for r, w in self.waiting.items() if now - w.last > TTL_S]:
            del self.waiting[rid]

    def held(self, rid: str, now: float) -> dict[str, int]:
        mine = self.waiting.get(rid)
        since = mine.since if mine is not None else now
        held: dict[str, int] = {}
        for other, w in self.waiting.items():
            if other != rid and (w.since, other) < (since, rid):
                for worker_id in w.worker_ids:
                    held[worker_id] = held.get(worker_id, 0) + w.num_blocks
        return held

    def count(self, worker_id: str) -> int:
        return sum(worker_id in w.worker_ids for w in self.waiting.values())


worker_sets = st.sampled_from([("d0", "d1"), ("d0", "d1", "d2"), ("d2",), ("d1", "d0")])
step = st.one_of(
    st.tuples(st.just("wait"), st.sampled_from(REQUESTS), worker_sets, st.integers(1, 50)),
    st.tuples(st.just("leave"), st.sampled_from(REQUESTS)),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.0, 0.01, 0.3, 0.7])),
    st.tuples(st.just("held"), st.sampled_from(REQUESTS)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(step, max_size=60))
def test_the_line_holds_what_the_whole_line_sum_held(steps) -> None:
    room, ref, now = WaitingRoom(TTL_S), Reference(), 0.0
    for op, *args in steps:
        if op == "wait":
            room.wait(args[0], now, args[1], args[2])
            ref.wait(args[0], now, args[1], args[2])
        elif op == "leave":
            room.leave(args[0])
            ref.waiting.pop(args[0], None)
        elif op == "advance":
            now += args[0]
        else:
            room.forget(now)
            ref.forget(now)
            assert room.held_ahead_of(args[0], now) == ref.held(args[0], now)
        assert len(room) == len(ref.waiting)
        assert {w: room.count(w) for w in WORKERS} == {w: ref.count(w) for w in WORKERS}


def test_attempts_of_waiting_requests_do_not_go_over_the_line(monkeypatch) -> None:
    """Each attempt of a waiting request summed the whole line: 77 µs an attempt with 100
    waiting, 672 µs with 3,000, one poll of them all 2.0 s where polls come every 50 ms
    (/work/notes/s44/held_bench.py, session 44). Now the line's running totals are rebuilt only
    when its membership changes out of order: 3,000 requests joining at the end and each tried
    again rebuild nothing, and one leaving rebuilds once."""
    rebuilt: list[int] = []
    original = _Line._rebuild
    monkeypatch.setattr(
        _Line, "_rebuild", lambda line: (rebuilt.append(len(line.members)), original(line))
    )
    clock = FakeClock()
    router = make_router("load", prefill=1, decode=2, clock=clock)
    for worker_id in ("p0", "d0", "d1"):
        router.report(worker_id, load(free=2, used=98), 0.0)
    waiting = [request(40, max_tokens=8) for _ in range(3000)]
    for _ in range(2):  # joining, then one poll of every waiter
        for r in waiting:
            clock.advance(1e-6)
            with pytest.raises(NoRoomNowError):
                router.route(r)
    assert router.waiting_for_room("d0") == 3000 and rebuilt == []
    router.settle(waiting[0].request_id)
    router.report("d0", load(free=50, used=50), 1.0)
    assert router.route(waiting[1]).decode.worker_id == "d0"  # the first in line now
    assert rebuilt == [2999]  # once, for the first leaving; the second left before any attempt
