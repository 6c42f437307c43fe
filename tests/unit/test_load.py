"""The one load report type: validation, its utilisation (DESIGN.md §5) and its proto form."""

from __future__ import annotations

import dataclasses

import pytest

from services.common.errors import InvalidRequestError
from services.common.load import (
    LoadReport,
    utilisation,
    utilisation_compute,
    utilisation_memory,
)
from services.rpc.gen.banaserve.v1 import router_pb2
from services.rpc.load_reports import load_from_proto, load_to_proto


def report(**fields) -> LoadReport:
    good = dict(
        num_queued_prefill_tokens=250,
        num_running_seqs=3,
        num_waiting_seqs=1,
        num_blocks_used=30,
        num_blocks_free=90,
        step_time_s=0.25,
        busy_fraction=0.5,
        window_s=1.0,
        num_hosted_layers=4,
        num_hosted_blocks=6,
    )
    return LoadReport(**(good | fields))


def test_a_report_without_hosted_fields_has_nothing_hosted():
    snapshot = LoadReport(
        num_queued_prefill_tokens=7,
        num_running_seqs=2,
        num_waiting_seqs=1,
        num_blocks_used=5,
        num_blocks_free=27,
        step_time_s=0.004,
        busy_fraction=0.25,
        window_s=1.0,
    )
    assert (snapshot.num_hosted_layers, snapshot.num_hosted_blocks, snapshot.num_blocks) == (
        0,
        0,
        32,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.num_running_seqs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_queued_prefill_tokens": -1}, "num_queued_prefill_tokens must be >= 0, got -1"),
        ({"num_running_seqs": -1}, "num_running_seqs must be >= 0"),
        ({"num_waiting_seqs": -1}, "num_waiting_seqs must be >= 0"),
        ({"num_blocks_free": -1}, "num_blocks_free must be >= 0"),
        ({"num_blocks_used": -1}, "num_blocks_used must be >= 0"),
        ({"num_hosted_layers": -1}, "num_hosted_layers must be >= 0"),
        ({"num_hosted_blocks": -2}, "num_hosted_blocks must be >= 0, got -2"),
        ({"step_time_s": -0.1}, "step_time_s must be finite and >= 0"),
        ({"step_time_s": float("nan")}, "step_time_s must be finite"),
        ({"busy_fraction": 1.5}, r"busy_fraction must be in \[0, 1\], got 1.5"),
        ({"busy_fraction": float("nan")}, "busy_fraction must be in"),
        ({"window_s": float("inf")}, "window_s must be finite and >= 0, got inf"),
    ],
)
def test_invalid_load_report(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        report(**fields)


def test_utilisation_is_the_larger_of_compute_and_memory():
    # compute: max(busy 0.5, 250 queued / 1000) = 0.5; memory: 30 / 120 = 0.25.
    assert utilisation_compute(report(), 1000) == 0.5
    assert utilisation_memory(report()) == 0.25
    assert utilisation(report(), 1000) == 0.5
    # Queued work over capacity wins over the busy fraction, and may exceed 1.
    assert utilisation(report(num_queued_prefill_tokens=1500), 1000) == 1.5
    # Memory wins: 96 of 120 blocks used.
    assert utilisation(report(num_blocks_used=96, num_blocks_free=24), 1000) == 0.8
    # No free block (or no pool at all): full, whatever is used.
    assert utilisation_memory(report(num_blocks_used=0, num_blocks_free=0)) == 1.0
    assert (
        utilisation(report(num_blocks_used=20, num_blocks_free=0, busy_fraction=0.0), 1000) == 1.0
    )


@pytest.mark.parametrize(
    ("step_time_s", "busy", "expected"),
    [
        (0.035, 0.98, 0.98 * 0.035 / 0.25),  # a decode worker with a few sequences
        (0.25, 0.98, 0.98),  # its steps as long as the TPOT SLO: full
        (1.7, 1.0, 1.0),  # a prefill step counts whole
        (0.0, 0.0, 0.0),
    ],
)
def test_the_busy_fraction_may_be_weighed_by_how_full_the_steps_are(step_time_s, busy, expected):
    """A decode worker steps all the time it holds a sequence (busy 0.98 with 2 sequences as
    with 12 in bench compare): with ``full_step_s`` its steps' length tells a worker with room
    from a full one. Off by default: the plain busy fraction."""
    r = report(step_time_s=step_time_s, busy_fraction=busy, num_queued_prefill_tokens=0)
    assert utilisation_compute(r, 1000, full_step_s=0.25) == pytest.approx(expected)
    assert utilisation_compute(r, 1000) == busy
    # queued prefill work still counts in full
    queued = dataclasses.replace(r, num_queued_prefill_tokens=500)
    assert utilisation_compute(queued, 1000, full_step_s=0.25) >= 0.5


def test_proto_round_trip_keeps_every_field_hosted_work_too():
    message = load_to_proto(report())
    assert (message.num_hosted_layers, message.num_hosted_blocks) == (4, 6)
    assert (message.num_kv_blocks_used, message.num_kv_blocks_free) == (30, 90)
    assert (
        load_from_proto(router_pb2.LoadReport.FromString(message.SerializeToString())) == report()
    )


def test_a_report_from_a_worker_without_hosting_fields_hosts_nothing():
    old = router_pb2.LoadReport(num_running_seqs=2, num_kv_blocks_free=10, busy_fraction=0.5)
    got = load_from_proto(old)
    assert (got.num_hosted_layers, got.num_hosted_blocks, got.num_running_seqs) == (0, 0, 2)


def test_an_out_of_range_proto_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match=r"busy_fraction must be in \[0, 1\], got 2.0"):
        load_from_proto(router_pb2.LoadReport(busy_fraction=2.0))
