"""Router.route end to end over the pure core: worker pairs, bursts, KV fit, colocated mode."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from services.common.errors import ConfigError, InvalidRequestError, ResourceExhaustedError
from services.router.core import (
    WAITING_FOR_ROOM_TTL_S,
    NoRoomNowError,
    NoWorkerError,
    Router,
    RouterConfig,
    RouteRequest,
)
from services.router.driver_types import DriverConfig
from services.router.registry import WorkerCapacity, WorkerRole, WorkerStatus
from tests.router.factories import FakeClock, capacity, load, make_router, request


def report_all(router: Router, timestamp: float = 1.0, **fields: float) -> None:
    for worker in router.workers():
        router.report(worker.worker_id, load(**fields), timestamp)  # type: ignore[arg-type]


def assert_estimates_match_reports(router: Router) -> None:
    """Leak check: once every worker has reported, no in-flight estimate is left over."""
    for w in router.workers():
        assert w.last_report is not None
        assert w.num_queued_tokens == w.last_report.num_queued_prefill_tokens
        assert w.num_free_blocks == w.last_report.num_blocks_free


def test_burst_between_reports_spreads_under_load() -> None:
    router = make_router("load", prefill=2, decode=1)
    report_all(router)
    burst = [router.route(request(80, shared_prefix=64)) for _ in range(10)]
    # In-flight tokens make the worker just chosen look busier until a report counts them.
    assert [a.prefill.worker_id for a in burst] == ["p0", "p1"] * 5
    expected = {"d0": 0, "p0": 400, "p1": 400}
    assert {w.worker_id: w.num_queued_tokens for w in router.workers()} == expected
    report_all(router, timestamp=2.0)  # sent before the workers admitted the burst
    assert {w.worker_id: w.num_queued_tokens for w in router.workers()} == expected
    assert router.num_inflight() == 20  # prompt on P, blocks on d0
    ids = tuple(a.request_id for a in burst)
    report_all(router, timestamp=3.0, admitted=ids)  # type: ignore[arg-type]
    assert_estimates_match_reports(router)
    assert router.num_inflight() == 0


def test_burst_piles_onto_the_prefix_holder_under_prefix_affinity() -> None:
    router = make_router("prefix_affinity", prefill=2, decode=1)
    report_all(router)
    picks = [router.route(request(80, shared_prefix=64)).prefill.worker_id for _ in range(10)]
    # The hotspot load-aware routing avoids: all 10 on one worker, the other idle.
    assert Counter(picks) == {"p0": 10}
    assert [w.num_queued_tokens for w in router.workers()] == [0, 800, 0]
    # Even once p0 reports it is saturated, the shared prefix keeps it there...
    router.report("p0", load(queued=800, busy=1.0), 2.0)
    router.report("p1", load(), 2.0)
    assert router.route(request(80, shared_prefix=64)).prefill.worker_id == "p0"
    # ...while a prompt with no cached prefix falls back to the least loaded.
    assert router.route(request(80)).prefill.worker_id == "p1"


def test_decode_worker_has_the_most_free_blocks_that_fit() -> None:
    router = make_router("load", prefill=1, decode=2)
    router.report("p0", load(), 1.0)
    router.report("d0", load(free=30, used=70), 1.0)
    router.report("d1", load(free=32, used=68), 1.0)
    # 40 prompt + 8 max_tokens = 48 tokens = 3 blocks of 16, reserved at once.
    assignments = [router.route(request(40, max_tokens=8)) for _ in range(3)]
    assert [a.decode.worker_id for a in assignments] == ["d1", "d0", "d1"]
    assert [a.num_kv_blocks for a in assignments] == [3, 3, 3]
    assert [w.num_free_blocks for w in router.workers()[:2]] == [27, 26]
    assert router.route(request(41, max_tokens=8)).num_kv_blocks == 4  # 49 tokens
    assert not assignments[0].colocated


def test_not_enough_free_blocks_now() -> None:
    router = make_router("load", prefill=1, decode=2)
    router.report("d0", load(free=30, used=70), 1.0)
    router.report("d1", load(free=27, used=73), 1.0)
    with pytest.raises(
        ResourceExhaustedError,
        match=r"needs 40 KV blocks \(600 prompt \+ 40 max_tokens tokens\); "
        "the most free on any decode or mixed worker now is 30",
    ):
        router.route(request(600, max_tokens=40))
    # The failed request reserved nothing.
    assert [w.num_free_blocks for w in router.workers()] == [30, 27, 100]
    assert router.workers()[2].num_queued_tokens == 0


def test_requests_waiting_for_room_count_on_the_workers_they_wait_for() -> None:
    """A request no pool has room for now is held (NoRoomNowError) and counts against every
    worker whose pool could hold it once its running requests end, until it is routed,
    settled, or not tried again for WAITING_FOR_ROOM_TTL_S (its caller gave up)."""
    clock = FakeClock()
    router = make_router("load", prefill=1, decode=2, clock=clock)
    router.register("d-small", "127.0.0.1:9150", WorkerRole.DECODE, capacity(num_blocks=20))
    for worker_id in ("p0", "d0", "d1"):
        router.report(worker_id, load(free=2, used=98), 0.0)
    router.report("d-small", load(free=2, used=18), 0.0)
    waiting = lambda: {w: router.waiting_for_room(w) for w in ("p0", "d0", "d1", "d-small")}  # noqa: E731
    big, small = request(600, max_tokens=40), request(40, max_tokens=8)  # 40 and 3 blocks
    for r in (big, small):
        with pytest.raises(NoRoomNowError):
            router.route(r)
    # d-small's 20 blocks never hold the 40-block request; a prefill worker holds no decodes.
    assert waiting() == {"p0": 0, "d0": 2, "d1": 2, "d-small": 1}
    with pytest.raises(NoRoomNowError):
        router.route(big)  # tried again: still waiting, counted once
    assert waiting()["d0"] == 2
    router.report("d0", load(free=43, used=57), 1.0)  # the older big's 40 are held for it
    assert router.route(small).decode.worker_id == "d0"  # routed: waits no more
    assert waiting() == {"p0": 0, "d0": 1, "d1": 1, "d-small": 0}
    router.settle(big.request_id, "d1")  # one worker's assignment only: still waiting
    assert waiting()["d1"] == 1
    router.settle(big.request_id)
    assert waiting() == {"p0": 0, "d0": 0, "d1": 0, "d-small": 0}
    with pytest.raises(NoRoomNowError):
        router.route(request(640, max_tokens=40))  # 43 blocks: d0 has 40 left
    clock.advance(WAITING_FOR_ROOM_TTL_S)
    assert waiting()["d1"] == 1
    clock.advance(0.01)  # not tried again: its caller gave up
    assert waiting()["d1"] == 0


def test_requests_waiting_for_room_are_served_first_come_first_served() -> None:
    """Room an older request waiting for room needs is held for it: smaller requests that keep
    arriving do not pass it for ever (they wait behind it, and count as waiting too); a
    resumed request (decode_only) is not held back; a waiter that gave up holds nothing."""
    clock = FakeClock()
    router = make_router("load", prefill=1, decode=1, clock=clock)
    router.report("d0", load(free=10, used=90), 0.0)
    big, small = request(600, max_tokens=40), request(40, max_tokens=8)  # 40 and 3 blocks
    with pytest.raises(NoRoomNowError):
        router.route(big)
    clock.advance(0.05)
    # 10 free would hold the small one, but the big one came first and needs 40 of them.
    with pytest.raises(NoRoomNowError, match=r"is 10 \(40 held for older requests waiting"):
        router.route(small)
    assert router.waiting_for_room("d0") == 2
    resumed = RouteRequest("resumed", list(range(40)), 8, decode_only=True)
    assert router.route(resumed).decode.worker_id == "d0"
    router.settle("resumed")
    router.report("d0", load(free=41, used=59), 1.0)
    with pytest.raises(NoRoomNowError):  # the small one still waits: 41 - 40 < 3
        router.route(small)
    assert router.route(big).decode.worker_id == "d0"  # its turn: routed, holds nothing more
    router.report("d0", load(free=3, used=97, admitted=(big.request_id,)), 2.0)
    assert router.route(small).decode.worker_id == "d0"
    # A waiter that is no longer tried (its caller gave up) stops holding room.
    with pytest.raises(NoRoomNowError):
        router.route(request(600, max_tokens=40))
    router.report("d0", load(free=10, used=90, admitted=(small.request_id,)), 3.0)
    later = request(40, max_tokens=8)
    with pytest.raises(NoRoomNowError):
        router.route(later)
    for t in (4.0, 5.0):  # WAITING_FOR_ROOM_TTL_S passes; the workers go on reporting
        clock.advance(WAITING_FOR_ROOM_TTL_S * 0.6)
        for worker_id in ("p0", "d0"):
            router.report(worker_id, load(free=10, used=90), t)
    assert router.route(later).decode.worker_id == "d0"


def test_request_larger_than_any_decode_worker() -> None:
    router = make_router("load", prefill=1, decode=1)
    with pytest.raises(
        ResourceExhaustedError,
        match=r"needs 101 KV blocks .*more than any decode or mixed worker holds in total \(largest: 100\)",
    ):
        router.route(request(1600, max_tokens=1))


def test_mixed_workers_prefill_and_decode_their_own_requests() -> None:
    router = make_router("load", mixed=2)
    report_all(router)
    assignments = [router.route(request(40)) for _ in range(3)]
    assert [(a.prefill.worker_id, a.decode.worker_id) for a in assignments] == [
        ("m0", "m0"),
        ("m1", "m1"),
        ("m0", "m0"),
    ]
    assert all(a.colocated for a in assignments)
    # Both the prompt tokens and the KV blocks land on the one worker.
    m0 = router.workers()[0]
    assert (m0.num_queued_tokens, m0.num_free_blocks) == (80, 94)


def test_a_mixed_worker_without_room_is_skipped() -> None:
    router = make_router("load", mixed=2)
    router.report("m0", load(free=2, used=0, busy=0.0), 1.0)
    router.report("m1", load(free=100, busy=0.5), 1.0)
    assert router.route(request(40)).prefill.worker_id == "m1"
    router.report("m1", load(free=2, used=98), 2.0)
    with pytest.raises(
        ResourceExhaustedError, match="most free on any decode or mixed worker now is 2"
    ):
        router.route(request(40))


def test_full_mixed_worker_with_room_only_on_a_decode_worker() -> None:
    router = make_router("load", decode=1, mixed=1)
    router.report("m0", load(free=0, used=100), 1.0)
    with pytest.raises(ResourceExhaustedError, match="the most free on any mixed worker now is 0"):
        router.route(request(40))


def test_a_prefill_worker_may_hand_off_to_a_mixed_worker() -> None:
    router = make_router("load", prefill=1, mixed=1)
    router.report("m0", load(busy=0.5), 1.0)
    assignment = router.route(request(40))
    assert (assignment.prefill.worker_id, assignment.decode.worker_id) == ("p0", "m0")


def test_colocated_policy_uses_mixed_workers_only_with_prefix_affinity() -> None:
    router = make_router("colocated", prefill=1, decode=1, mixed=2)
    report_all(router)
    pairs = [router.route(request(80, shared_prefix=64)) for _ in range(4)]
    assert [(a.prefill.worker_id, a.decode.worker_id) for a in pairs] == [("m0", "m0")] * 4
    assert router.route(request(80)).prefill.worker_id == "m1"


def test_colocated_policy_without_mixed_workers() -> None:
    router = make_router("colocated", prefill=1, decode=1)
    with pytest.raises(
        ResourceExhaustedError,
        match=r"no healthy mixed worker to prefill request 'r\d+' \(policy 'colocated'\)",
    ):
        router.route(request())


def test_round_robin_order() -> None:
    router = make_router("round_robin", prefill=3, decode=1)
    router.report("p0", load(busy=1.0), 1.0)  # load is ignored
    picks = [router.route(request()).prefill.worker_id for _ in range(4)]
    assert picks == ["p0", "p1", "p2", "p0"]
    router.remove("p1", "drained")
    assert [router.route(request()).prefill.worker_id for _ in range(3)] == ["p2", "p0", "p2"]


@pytest.mark.parametrize(
    ("prefill", "decode", "message"),
    [
        (0, 0, r"no healthy worker is registered to serve request 'r\d+'"),
        (1, 0, r"no healthy decode or mixed worker to decode request 'r\d+' \(policy 'load'\)"),
        (0, 1, r"no healthy mixed or prefill worker to prefill request"),
    ],
)
def test_missing_roles(prefill: int, decode: int, message: str) -> None:
    router = make_router("load", prefill=prefill, decode=decode)
    with pytest.raises(ResourceExhaustedError, match=message):
        router.route(request())


def test_silent_workers_stop_receiving_requests() -> None:
    clock = FakeClock()
    router = make_router("load", prefill=2, decode=1, clock=clock)
    clock.advance(0.6)
    router.report("p1", load(busy=0.9), 0.6)
    router.report("d0", load(), 0.6)
    assert router.route(request()).prefill.worker_id == "p0"  # idle, 0.6 s since seen
    clock.advance(0.5)
    # p0 silent for 1.1 s: removed on this call, before choosing.
    assert router.route(request()).prefill.worker_id == "p1"
    assert [(w.worker_id, w.status) for w in router.workers()] == [
        ("d0", WorkerStatus.HEALTHY),
        ("p0", WorkerStatus.REMOVED),
        ("p1", WorkerStatus.HEALTHY),
    ]
    clock.advance(0.6)
    assert router.expire() == ["d0", "p1"]
    with pytest.raises(ResourceExhaustedError, match="no healthy worker is registered"):
        router.route(request())
    router.register("p0", "127.0.0.1:9000", WorkerRole.PREFILL, capacity())
    router.register("d0", "127.0.0.1:9100", WorkerRole.DECODE, capacity())
    assert router.route(request()).prefill.worker_id == "p0"


def test_assignment_carries_addresses() -> None:
    router = make_router("load", prefill=1, decode=1)
    assignment = router.route(RouteRequest("req-1", (1, 2, 3), 4))
    assert assignment.request_id == "req-1"
    assert (assignment.prefill.address, assignment.decode.address) == (
        "127.0.0.1:9000",
        "127.0.0.1:9100",
    )
    assert assignment.num_kv_blocks == 1


@pytest.mark.parametrize(
    ("request_id", "tokens", "max_tokens", "message"),
    [
        ("", (1,), 1, "request_id must be non-empty"),
        ("r", (), 1, "prompt must have at least one token"),
        ("r", (1, -2), 1, "prompt token ids must be >= 0"),
        ("r", (1,), 0, "max_tokens must be > 0, got 0"),
    ],
)
def test_invalid_requests(
    request_id: str, tokens: tuple[int, ...], max_tokens: int, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        RouteRequest(request_id, tokens, max_tokens)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"policy": "random"}, r"policy must be one of \('load', 'round_robin', "),
        ({"report_timeout_s": 0.0}, "report_timeout_s must be positive, got 0.0"),
        ({"report_timeout_s": math.inf}, "report_timeout_s must be positive"),
        ({"affinity_capacity": 0}, "affinity_capacity must be positive"),
        ({"prefill_capacity_tokens": -1}, "prefill_capacity_tokens must be positive"),
    ],
)
def test_invalid_config(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RouterConfig(**fields)  # type: ignore[arg-type]


def test_default_config() -> None:
    config = Router(clock=FakeClock()).config
    assert (config.policy, config.report_timeout_s) == ("load", 1.0)


def test_colocated_policy_when_no_mixed_worker_has_room() -> None:
    router = make_router("colocated", decode=1, mixed=2)
    router.report("m0", load(free=1, used=99), 1.0)
    router.report("m1", load(free=2, used=98), 1.0)
    with pytest.raises(
        ResourceExhaustedError, match=r"needs 3 KV blocks .*most free on any mixed worker now is 2"
    ):
        router.route(request(40))


def test_a_hosts_only_worker_is_never_routed_to() -> None:
    """A worker started with ``--load-layers`` (a migration helper) is listed, never picked."""
    router = make_router("load", prefill=1, decode=1)
    router.register("d-helper", "127.0.0.1:9199", WorkerRole.DECODE, capacity(hosts_only=True))
    router.report("p0", load(), 1.0)
    router.report("d0", load(free=10, used=90), 1.0)  # the helper looks far emptier
    router.report("d-helper", load(), 1.0)
    assert [router.route(request(16)).decode.worker_id for _ in range(3)] == ["d0"] * 3
    assert "d-helper" in [w.worker_id for w in router.workers()]
    router.register("p-helper", "127.0.0.1:9099", WorkerRole.PREFILL, capacity(hosts_only=True))
    router.remove("p0", "gone")
    with pytest.raises(NoWorkerError):
        router.route(request(16))


def test_a_draining_worker_is_listed_but_never_routed_to_until_it_reports_otherwise() -> None:
    """A worker told to stop reports ``draining`` while it finishes what it has: it stays
    registered (its requests' KV targets still check out), gets nothing new, and with no other
    worker of its role a request finds none."""
    router = make_router("load", prefill=2, decode=2)
    # Each draining worker looks far emptier than the other of its role.
    router.report("p0", load(queued=5000), 1.0)
    router.report("p1", load(draining=True), 1.0)
    router.report("d0", load(draining=True), 1.0)
    router.report("d1", load(free=10, used=90), 1.0)
    assigned = [router.route(request(16)) for _ in range(4)]
    assert {(a.prefill.worker_id, a.decode.worker_id) for a in assigned} == {("p0", "d1")}
    assert {"d0", "p1"} <= {w.worker_id for w in router.workers()}
    router.report("d1", load(draining=True), 3.0)
    with pytest.raises(NoWorkerError):
        router.route(request(16))
    router.report("d0", load(), 2.0)  # back (a drain is not undone in practice; the report rules)
    assert router.route(request(16)).decode.worker_id == "d0"


@pytest.mark.parametrize(
    ("max_tokens", "queue", "prefill_queued", "decode_queued", "limit"),
    [
        (0, 0, 10_000, 0, 0),  # both off: every prompt to the prefill worker
        (64, 0, 10_000, 0, 64),  # suffixes of up to 64 tokens only
        (64, 1000, 999, 0, 64),  # the prefill worker's queue is under Q
        (64, 1000, 1000, 0, (1 << 32) - 1),  # at Q: any prompt on D
        (0, 1000, 4000, 3999, (1 << 32) - 1),
        (64, 1000, 4000, 4000, 64),  # D's queue is as long: no gain
    ],
)
def test_local_prefill_limit(max_tokens, queue, prefill_queued, decode_queued, limit) -> None:
    config = DriverConfig(local_prefill_max_tokens=max_tokens, local_prefill_queue_tokens=queue)
    assert config.local_prefill_limit(prefill_queued, decode_queued) == limit


@pytest.mark.parametrize("field", ["local_prefill_max_tokens", "local_prefill_queue_tokens"])
@pytest.mark.parametrize("value", [-1, 1 << 32])
def test_local_prefill_config_out_of_range(field, value) -> None:
    with pytest.raises(ConfigError, match=f"{field} must be in"):
        DriverConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        # Deadlines of the router's calls: past a day, grpc failed each call at once (a
        # `--default-timeout-s 1e20` router failed every request without a deadline).
        ("default_timeout_s", 1e20, r"default_timeout_s must be in \(0, 86400\] seconds"),
        ("release_timeout_s", 86_400.5, r"release_timeout_s must be in \(0, 86400\]"),
        ("lease_s", math.inf, r"lease_s must be in \(0, 86400\]"),
        ("default_timeout_s", 0.0, r"default_timeout_s must be in \(0, 86400\]"),
        ("retry_window_s", 1e12, r"retry_window_s must be in \[0, 86400\]"),
        ("no_worker_wait_s", -1.0, r"no_worker_wait_s must be in \[0, 86400\]"),
    ],
)
def test_driver_timeouts_are_at_most_a_day(field, value, message) -> None:
    with pytest.raises(ConfigError, match=message):
        DriverConfig(**{field: value})
    assert DriverConfig(default_timeout_s=86_400.0).default_timeout_s == 86_400.0


def test_sequence_capacity_sums_the_decoding_workers_still_registered():
    router = Router(RouterConfig())
    for port, (worker_id, role, seqs, hosts_only) in enumerate(
        (
            ("d0", WorkerRole.DECODE, 64, False),
            ("d1", WorkerRole.DECODE, 32, False),
            ("m0", WorkerRole.MIXED, 16, False),
            ("p0", WorkerRole.PREFILL, 64, False),  # prefills only: decodes nothing
            ("h0", WorkerRole.DECODE, 8, True),  # hosts layers only: serves no request
        ),
        start=9000,
    ):
        capacity = WorkerCapacity(100, 16, "test-model", hosts_only=hosts_only, max_num_seqs=seqs)
        router.register(worker_id, f"127.0.0.1:{port}", role, capacity)
    assert router.sequence_capacity() == 64 + 32 + 16
    router.remove("d1", "test")
    assert router.sequence_capacity() == 64 + 16
    router.report("m0", load(draining=True), 1.0)  # stopping: takes nothing new
    assert router.sequence_capacity() == 64
