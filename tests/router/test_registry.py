"""Worker registry: registration, reports, expiry, re-registration, load estimates."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidRequestError, RequestNotFoundError
from services.router.registry import (
    WorkerCapacity,
    WorkerRegistry,
    WorkerRole,
    WorkerStatus,
)
from tests.router.factories import BLOCK_SIZE, FakeClock, capacity, load


def make_registry(clock: FakeClock, timeout: float = 1.0) -> WorkerRegistry:
    return WorkerRegistry(report_timeout_s=timeout, prefill_capacity_tokens=1000, clock=clock)


def test_register_starts_healthy_and_idle() -> None:
    clock = FakeClock(5.0)
    registry = make_registry(clock)
    info = registry.register("p0", "127.0.0.1:9000", WorkerRole.PREFILL, capacity(80))
    assert info.status is WorkerStatus.HEALTHY
    assert (info.worker_id, info.address, info.role) == ("p0", "127.0.0.1:9000", WorkerRole.PREFILL)
    assert info.last_report is None
    assert (info.num_queued_tokens, info.num_free_blocks, info.num_used_blocks) == (0, 80, 0)
    assert info.utilisation == 0.0
    assert info.seconds_since_seen == 0.0


def test_missed_reports_remove_a_worker_strictly_after_the_timeout() -> None:
    clock = FakeClock()
    registry = make_registry(clock)
    registry.register("p0", "h:1", WorkerRole.PREFILL, capacity())
    registry.register("d0", "h:2", WorkerRole.DECODE, capacity())
    clock.advance(0.5)
    assert registry.report("d0", load(), 0.5)
    clock.advance(0.5)  # p0 silent for exactly the timeout: still in
    assert [w.worker_id for w in registry.healthy()] == ["d0", "p0"]
    clock.advance(0.01)
    assert registry.expire() == ["p0"]
    assert registry.expire() == []
    assert [w.worker_id for w in registry.healthy()] == ["d0"]
    [d0, p0] = registry.all()
    assert (d0.status, p0.status) == (WorkerStatus.HEALTHY, WorkerStatus.REMOVED)
    assert p0.removed_reason == "no load report for 1.010 s"
    clock.advance(0.5)  # d0 last reported at 0.5
    assert [w.status for w in registry.all()] == [WorkerStatus.REMOVED] * 2


def test_a_removed_worker_must_register_again() -> None:
    clock = FakeClock()
    registry = make_registry(clock)
    registry.register("p0", "h:1", WorkerRole.PREFILL, capacity())
    registry.report("p0", load(queued=500), 7.0)
    clock.advance(2.0)
    with pytest.raises(RequestNotFoundError, match=r"'p0' was removed \(no load report"):
        registry.report("p0", load(), 8.0)
    info = registry.register("p0", "h:2", WorkerRole.PREFILL, capacity())
    assert (info.status, info.address, info.num_queued_tokens) == (WorkerStatus.HEALTHY, "h:2", 0)
    assert info.removed_reason == ""
    # A restarted worker's clock may start over: its first report is never "stale".
    assert registry.report("p0", load(queued=3), 0.1)
    assert registry.healthy()[0].num_queued_tokens == 3


def test_remove_takes_a_worker_out_at_once() -> None:
    registry = make_registry(FakeClock())
    registry.register("d0", "h:1", WorkerRole.DECODE, capacity())
    registry.remove("d0", "stream to d0 failed")
    assert registry.healthy() == []
    assert registry.all()[0].removed_reason == "stream to d0 failed"
    with pytest.raises(RequestNotFoundError, match="'d0' was removed"):
        registry.remove("d0", "again")


def test_report_from_unknown_worker() -> None:
    registry = make_registry(FakeClock())
    with pytest.raises(RequestNotFoundError, match="unknown worker 'x'; register it first"):
        registry.report("x", load(), 1.0)


def test_reordered_reports_are_ignored() -> None:
    clock = FakeClock()
    registry = make_registry(clock)
    registry.register("p0", "h:1", WorkerRole.PREFILL, capacity())
    assert registry.report("p0", load(queued=10), 2.0)
    clock.advance(0.9)
    assert not registry.report("p0", load(queued=99), 1.5)
    assert not registry.report("p0", load(queued=99), 2.0)
    assert registry.healthy()[0].num_queued_tokens == 10
    clock.advance(0.2)  # an ignored report does not keep a worker alive
    assert registry.expire() == ["p0"]


def test_utilisation_is_the_max_of_compute_and_memory() -> None:
    clock = FakeClock()
    registry = make_registry(clock)  # 1000 queued tokens = fully busy
    registry.register("p0", "h:1", WorkerRole.PREFILL, capacity(100))
    registry.report("p0", load(queued=300, busy=0.2, free=60, used=40), 1.0)
    [info] = registry.healthy()
    assert (info.utilisation_compute, info.utilisation_memory) == (0.3, 0.4)
    assert info.utilisation == 0.4
    registry.report("p0", load(queued=0, busy=0.9, free=60, used=40), 2.0)
    assert registry.healthy()[0].utilisation == 0.9


def test_assignments_count_until_a_report_names_them() -> None:
    registry = make_registry(FakeClock())
    registry.register("m0", "h:1", WorkerRole.MIXED, capacity(100))
    registry.report("m0", load(queued=100, free=90, used=10), 1.0)
    registry.assign("m0", "r1", num_tokens=50, num_blocks=5)
    registry.assign("m0", "r2", num_tokens=50, num_blocks=95)
    [info] = registry.healthy()
    # Free blocks never go below zero, used never above the total.
    assert (info.num_queued_tokens, info.num_free_blocks, info.num_used_blocks) == (200, 0, 100)
    assert info.utilisation_memory == 1.0
    # A report from before the worker admitted them (a mixed worker mid-prefill publishes
    # nothing new for seconds) keeps both counted.
    registry.report("m0", load(queued=100, free=90, used=10), 2.0)
    assert registry.healthy()[0].num_queued_tokens == 200
    # r1 admitted: the report counts it; r2 still on top.
    registry.report("m0", load(queued=150, free=85, used=15, admitted=("r1",)), 3.0)
    [info] = registry.healthy()
    assert (info.num_queued_tokens, info.num_free_blocks, info.num_used_blocks) == (200, 0, 100)
    registry.report("m0", load(queued=120, free=80, used=20, admitted=("r2", "other")), 4.0)
    [info] = registry.healthy()
    assert (info.num_queued_tokens, info.num_free_blocks, info.num_used_blocks) == (120, 80, 20)
    assert registry.num_inflight() == 0
    assert info.last_report is not None and info.last_report.admitted == ()


def test_settle_forgets_what_no_report_counted() -> None:
    registry = make_registry(FakeClock())
    registry.register("p0", "h:1", WorkerRole.PREFILL, capacity(100))
    registry.register("d0", "h:2", WorkerRole.DECODE, capacity(100))
    registry.assign("p0", "r1", num_tokens=40, num_blocks=0)
    registry.assign("d0", "r1", num_tokens=0, num_blocks=7)
    registry.assign("p0", "r2", num_tokens=10, num_blocks=0)
    registry.settle("r1", "p0")  # D prefills it locally: only P stops counting it
    d0, p0 = registry.healthy()
    assert (p0.num_queued_tokens, d0.num_free_blocks) == (10, 93)
    registry.settle("r1")  # it ended
    registry.settle("r1")  # twice, and unknown ids, are no-ops
    registry.settle("nobody", "p0")
    registry.settle("r2", "nowhere")
    d0, p0 = registry.healthy()
    assert (p0.num_queued_tokens, d0.num_free_blocks) == (10, 100)
    assert registry.num_inflight() == 1
    # A late report naming a settled request changes nothing else.
    registry.report("d0", load(free=100, admitted=("r1",)), 1.0)
    assert registry.healthy()[0].num_free_blocks == 100


def test_a_worker_gone_or_restarted_counts_nothing_in_flight() -> None:
    clock = FakeClock()
    registry = make_registry(clock)
    registry.register("m0", "h:1", WorkerRole.MIXED, capacity(100))
    registry.register("m1", "h:2", WorkerRole.MIXED, capacity(100))
    registry.assign("m0", "r1", 30, 3)
    registry.assign("m1", "r2", 30, 3)
    registry.register("m0", "h:1", WorkerRole.MIXED, capacity(100))  # restarted
    registry.remove("m1", "call failed")
    assert registry.num_inflight() == 0
    assert registry.healthy()[0].num_queued_tokens == 0


def test_a_refused_reservation_counts_the_worker_full_until_it_reports() -> None:
    registry = make_registry(FakeClock())
    registry.register("d0", "h:1", WorkerRole.DECODE, capacity(100))
    registry.assign("d0", "r1", 0, 10)
    registry.mark_full("d0")
    assert registry.healthy()[0].num_free_blocks == 0
    registry.report("d0", load(free=60, used=40), 1.0)
    # Full no more; r1, not named by the report, still counted.
    assert registry.healthy()[0].num_free_blocks == 50


def test_every_healthy_worker_serves_one_model() -> None:
    clock = FakeClock()
    registry = make_registry(clock)
    registry.register("p0", "h:1", WorkerRole.PREFILL, capacity())
    with pytest.raises(InvalidRequestError, match="one router serves one model") as error:
        registry.register("d0", "h:2", WorkerRole.DECODE, capacity(fingerprint="other"))
    # A fingerprint is not the model's name (the probe of session 21 read it as one).
    assert "has model fingerprint 'other' and block size 16" in str(error.value)
    with pytest.raises(InvalidRequestError, match="block size 32"):
        registry.register("d0", "h:2", WorkerRole.DECODE, WorkerCapacity(100, 32, "test-model"))
    # The only worker may come back with another model; so may anyone once p0 is gone.
    registry.register("p0", "h:1", WorkerRole.PREFILL, capacity(fingerprint="v2"))
    clock.advance(1.5)
    registry.register("d0", "h:2", WorkerRole.DECODE, capacity(fingerprint="v3"))
    assert [w.capacity.model_fingerprint for w in registry.healthy()] == ["v3"]


@pytest.mark.parametrize(
    ("worker_id", "address", "message"),
    [
        ("", "h:1", "worker_id must be non-empty"),
        ("p0", "h", "address must be host:port"),
        ("p0", ":80", "address must be host:port"),
        ("p0", "h:0", "port in 1..65535, got 'h:0'"),
        ("p0", "h:65536", "port in 1..65535"),
        ("p0", "h:http", "port in 1..65535"),
    ],
)
def test_invalid_registration(worker_id: str, address: str, message: str) -> None:
    registry = make_registry(FakeClock())
    with pytest.raises(InvalidRequestError, match=message):
        registry.register(worker_id, address, WorkerRole.PREFILL, capacity())
    assert registry.all() == []


def test_ipv6_address_and_role_type() -> None:
    registry = make_registry(FakeClock())
    registry.register("p0", "[::1]:9000", WorkerRole.PREFILL, capacity())
    with pytest.raises(InvalidRequestError, match="role must be a WorkerRole"):
        registry.register("p1", "h:1", "prefill", capacity())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_kv_blocks": 0}, "num_kv_blocks must be > 0"),
        ({"block_size": 0}, "block_size must be > 0"),
        ({"model_fingerprint": ""}, "model_fingerprint must be non-empty"),
    ],
)
def test_invalid_capacity(fields: dict[str, object], message: str) -> None:
    good: dict[str, object] = {
        "num_kv_blocks": 10,
        "block_size": BLOCK_SIZE,
        "model_fingerprint": "m",
    }
    with pytest.raises(InvalidRequestError, match=message):
        WorkerCapacity(**(good | fields))  # type: ignore[arg-type]


def test_a_report_stamped_with_a_non_finite_time_is_refused() -> None:
    registry = make_registry(FakeClock())
    registry.register("d0", "h:1", WorkerRole.DECODE, capacity(100))
    with pytest.raises(InvalidRequestError, match="timestamp must be finite, got inf"):
        registry.report("d0", load(), float("inf"))
    assert registry.healthy()[0].last_report is None


def test_report_with_more_blocks_than_registered() -> None:
    registry = make_registry(FakeClock())
    registry.register("d0", "h:1", WorkerRole.DECODE, capacity(100))
    with pytest.raises(InvalidRequestError, match="reports 101 KV blocks .* than the 100"):
        registry.report("d0", load(free=100, used=1), 1.0)
    assert registry.healthy()[0].last_report is None


def test_registrations_and_removals_are_logged_with_their_reason(caplog) -> None:
    """An operator sees workers come and go in the router's log (session 45's probe: it logged
    nothing when a worker registered)."""
    clock = FakeClock()
    registry = make_registry(clock)
    with caplog.at_level("INFO", logger="services.router.registry"):
        registry.register("d0", "10.0.0.5:50065", WorkerRole.DECODE, capacity(80))
        clock.advance(1.5)
        registry.expire()
        registry.register("d0", "10.0.0.5:50065", WorkerRole.DECODE, capacity(80))
        registry.remove("d0", "its report stream ended")
    assert [r.getMessage() for r in caplog.records] == [
        "worker d0 registered: decode at 10.0.0.5:50065, 80 KV blocks",
        "worker d0 removed: no load report for 1.500 s",
        "worker d0 registered again: decode at 10.0.0.5:50065, 80 KV blocks",
        "worker d0 removed: its report stream ended",
    ]
