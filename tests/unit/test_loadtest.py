"""``bench.loadtest``: the driver's bounds and loops on an in-process scenario, status mapping,
the report's arithmetic, and the command line (no service processes: tests/loadtest has those)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os

import grpc
import pytest

from bench.loadtest import cli, driver, report
from bench.loadtest.driver import (
    OK,
    LoadSpec,
    Loop,
    Recorder,
    Sample,
    SampleKind,
    ScenarioError,
    status_of,
)
from services.common.errors import ConfigError
from services.rpc.dataplane import DataPlaneError, ErrorKind


class FakeScenario:
    """Each iteration is one "Call" RPC that waits on ``gate`` (set: returns at once), or fails
    as ``fail_with`` says for the indices listed in it."""

    name = "iter"

    def __init__(self, fail_with: dict[int, BaseException] | None = None, bytes_each: int = 0):
        self.fail_with = fail_with or {}
        self.bytes_each = bytes_each
        self.gate = asyncio.Event()
        self.gate.set()
        self.indices: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def run_one(self, index: int, rec: Recorder) -> None:
        self.indices.append(index)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with rec.rpc("Call") as counts:
                await self.gate.wait()
                await asyncio.sleep(0)  # yield, as any real call does
                if index in self.fail_with:
                    raise self.fail_with[index]
                counts.num_bytes = self.bytes_each
        finally:
            self.in_flight -= 1


def run(scenario: FakeScenario, spec: LoadSpec) -> driver.RunResult:
    return asyncio.run(driver.run_load(scenario, spec))


def names(result: driver.RunResult, kind: SampleKind) -> list[str]:
    return [s.name for s in result.samples if s.kind is kind]


def test_closed_loop_runs_exactly_max_requests_with_at_most_users_at_once():
    scenario = FakeScenario()
    result = run(scenario, LoadSpec(Loop.CLOSED, users=3, duration_s=30, max_requests=10))
    assert sorted(scenario.indices) == list(range(10))
    assert scenario.max_in_flight == 3
    assert names(result, SampleKind.ITERATION) == ["iter"] * 10
    assert names(result, SampleKind.RPC) == ["Call"] * 10
    assert {s.status for s in result.samples} == {OK}
    assert result.wall_s < 30  # the count ended it, not the duration


def test_open_loop_sends_the_seeded_poisson_schedule_and_records_lag():
    scenario = FakeScenario()
    spec = LoadSpec(Loop.OPEN, rate=2000.0, duration_s=30, max_requests=25, seed=3)
    result = run(scenario, spec)
    assert sorted(scenario.indices) == list(range(25))
    due = driver.arrival_times(2000.0, 1.0, 3, 25, 30)
    iterations = sorted(
        (s for s in result.samples if s.kind is SampleKind.ITERATION), key=lambda s: s.start_s
    )
    assert len(iterations) == 25
    for s, at in zip(iterations, due, strict=True):
        # started at its due time, or late by exactly its recorded lag
        assert s.lag_s >= 0
        assert s.start_s == pytest.approx(at + s.lag_s, abs=2e-3)


def test_duration_bounds_a_closed_loop_and_no_iteration_starts_after_it():
    scenario = FakeScenario()
    scenario.gate.clear()  # every call waits...
    spec = LoadSpec(Loop.CLOSED, users=2, duration_s=0.2, timeout_s=0.05)
    result = run(scenario, spec)
    iterations = [s for s in result.samples if s.kind is SampleKind.ITERATION]
    # ...until its timeout: each user runs back-to-back 50 ms iterations for 200 ms.
    assert {s.status for s in iterations} == {"DEADLINE_EXCEEDED"}
    assert {s.status for s in result.samples if s.kind is SampleKind.RPC} == {"CANCELLED"}
    assert all(s.start_s < 0.2 for s in iterations)
    assert 2 <= len(iterations) <= 2 * 4  # at most 4 timeouts of 50 ms fit in 200 ms


class Stubborn(FakeScenario):
    """Swallows its iteration's timeout and keeps waiting: only the run's deadline ends it."""

    async def run_one(self, index: int, rec: Recorder) -> None:
        self.in_flight += 1
        try:
            async with rec.rpc("Call"):
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    await asyncio.Event().wait()  # cancelled again by the run's deadline
        finally:
            self.in_flight -= 1


def test_the_run_deadline_cancels_what_still_runs(monkeypatch):
    monkeypatch.setattr(driver, "GRACE_S", 0.1)
    scenario = Stubborn()
    spec = LoadSpec(Loop.OPEN, rate=50.0, duration_s=0.05, timeout_s=0.05, max_requests=1)
    result = run(scenario, spec)
    (iteration,) = [s for s in result.samples if s.kind is SampleKind.ITERATION]
    assert iteration.status == "CANCELLED"
    assert 0.2 <= result.wall_s < 1.0  # the deadline: 0.05 + 0.05 + 0.1 s
    assert scenario.in_flight == 0


def test_failures_are_counted_by_status_and_do_not_stop_the_run():
    errors = {
        1: ScenarioError("MISS", "2 of 4 blocks"),
        2: DataPlaneError(ErrorKind.REMOTE, "no pin 7", "NOT_FOUND"),
        4: DataPlaneError(ErrorKind.TIMEOUT, "late"),
    }
    result = run(FakeScenario(errors), LoadSpec(Loop.CLOSED, users=1, max_requests=6))
    rpc = [s.status for s in result.samples if s.kind is SampleKind.RPC]
    assert rpc == [OK, "MISS", "NOT_FOUND", OK, "DEADLINE_EXCEEDED", OK]
    assert result.messages[("Call", "MISS")] == "MISS: 2 of 4 blocks"


def test_status_of_uses_grpc_status_names_everywhere():
    class Rpc(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

    class Transfer(Exception):
        code = "UNAVAILABLE"

    assert status_of(Rpc()) == "RESOURCE_EXHAUSTED"
    assert status_of(Transfer()) == "UNAVAILABLE"
    assert status_of(DataPlaneError(ErrorKind.UNAVAILABLE, "refused")) == "UNAVAILABLE"
    assert status_of(TimeoutError()) == "DEADLINE_EXCEEDED"
    assert status_of(asyncio.CancelledError()) == "CANCELLED"
    assert status_of(KeyError("x")) == "KeyError"


def test_a_process_cpu_time_is_read_from_proc():
    before = driver.cpu_seconds()
    mine = driver.process_cpu_seconds(os.getpid())
    assert before - 0.05 <= mine <= driver.cpu_seconds() + 0.05  # /proc counts in clock ticks


def test_specs_are_validated():
    for bad in (
        {"loop": Loop.CLOSED, "users": 0},
        {"loop": Loop.OPEN, "rate": 0.0},
        {"loop": Loop.OPEN, "rate": float("inf")},
        {"loop": Loop.CLOSED, "duration_s": 0},
        {"loop": Loop.CLOSED, "max_requests": 0},
    ):
        with pytest.raises(ConfigError):
            LoadSpec(**bad)


# ---- the report ---------------------------------------------------------------------------


def sample(name, start, latency, status=OK, kind=SampleKind.RPC, num_bytes=0, tokens=0):
    return Sample(name, kind, start, latency, status, num_bytes, tokens)


def test_rows_have_exact_counts_percentiles_and_rates():
    samples = [
        sample("op", 0.0, 0.010, kind=SampleKind.ITERATION),
        sample("op", 0.5, 0.020, kind=SampleKind.ITERATION),
        sample("op", 1.0, 0.040, "UNAVAILABLE", kind=SampleKind.ITERATION),
        *(sample("Read", 0.1 * i, 0.001 * (i + 1), num_bytes=1000) for i in range(5)),
        sample("Read", 1.9, 0.100, "NOT_FOUND"),
    ]
    seconds = report.window_s(samples)
    assert seconds == pytest.approx(2.0)  # 0.0 → 1.9 + 0.1
    op, read = report.rows_of(samples, seconds)
    assert (op["name"], op["kind"], op["count"], op["ok"], op["errors"]) == (
        "op", "iteration", 3, 2, 1,
    )  # fmt: skip
    assert op["error_codes"] == {"UNAVAILABLE": 1}
    assert op["throughput_per_s"] == pytest.approx(1.0)
    assert read["latency_ms"]["p50"] == pytest.approx(3.0)
    assert read["latency_ms"]["p90"] == pytest.approx(4.6)
    assert read["latency_ms"]["max"] == pytest.approx(5.0)
    assert read["bytes"] == 5000
    assert read["gb_per_s"] == pytest.approx(5000 / 2.0 / 1e9)
    assert read["tokens_per_s"] is None


def step_with(p99_ms: float, errors: int = 0, lag_p99_ms: float | None = None) -> dict:
    row = {"name": "op", "ok": 10, "errors": errors, "throughput_per_s": 5.0,
           "latency_ms": {"p99": p99_ms}}  # fmt: skip
    lag = None if lag_p99_ms is None else {"p99": lag_p99_ms}
    return {"rpcs": [row], "schedule_lag_ms": lag, "load": "x", "rate": 1.0}


def test_a_sweep_picks_the_best_step_within_the_slo():
    steps = [step_with(2.0), step_with(4.0), step_with(6.0), step_with(1.0, errors=1)]
    steps[1]["rpcs"][0]["throughput_per_s"] = 9.0
    steps[2]["rpcs"][0]["throughput_per_s"] = 12.0
    sweep = report.sweep_summary(steps, report.Slo("op", 5.0))
    assert [s["slo"]["pass"] for s in steps] == [True, True, False, False]
    assert steps[2]["slo"]["why"] == "p99 6.00 ms > 5 ms"
    assert steps[3]["slo"]["why"] == "errors"
    assert (sweep["best_step"], sweep["best_throughput_per_s"]) == (1, 9.0)
    late = step_with(1.0, lag_p99_ms=8.0)
    assert report.judge(late, report.Slo("op", 5.0))["why"].startswith("generator behind")


def test_files_hold_the_report_one_csv_row_per_name_and_every_sample(tmp_path):
    scenario = FakeScenario(bytes_each=10)
    result = run(scenario, LoadSpec(Loop.CLOSED, users=2, max_requests=4))
    step = report.step_summary(result, {"leaks": ""})
    rep = {"steps": [step], "service": "x"}
    paths = report.write_files(rep, [result], tmp_path, "x-t")
    assert [p.name for p in paths] == ["x-t.json", "x-t.csv", "x-t-samples.csv"]
    assert json.loads(paths[0].read_text())["steps"][0]["num_iterations"] == 4
    rows = list(csv.DictReader(paths[1].open()))
    assert [(r["name"], r["kind"], r["count"], r["ok"]) for r in rows] == [
        ("iter", "iteration", "4", "4"),
        ("Call", "rpc", "4", "4"),
    ]
    samples = list(csv.DictReader(paths[2].open()))
    assert len(samples) == 8
    assert sum(int(s["bytes"]) for s in samples) == 40


# ---- the command line ---------------------------------------------------------------------


def test_durations_and_lists_parse():
    assert [cli.seconds(t) for t in ("30s", "500ms", "2m", "1.5", "1h")] == [
        30.0, 0.5, 120.0, 1.5, 3600.0,
    ]  # fmt: skip
    for bad in ("", "0s", "-1", "3x", "s"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.seconds(bad)
    assert cli.number_list(float)("10,20.5") == [10.0, 20.5]
    with pytest.raises(argparse.ArgumentTypeError):
        cli.number_list(int)("4,0")


def parse(*argv: str) -> argparse.Namespace:
    from services.cli import build_parser

    return build_parser().parse_args(["loadtest", *argv])


def test_one_step_per_listed_load():
    args = parse("kvstore", "--target", "h:1", "--rate", "100,200", "--duration", "5s")
    specs = cli.specs_of(args)
    assert [(s.loop, s.rate, s.duration_s) for s in specs] == [
        (Loop.OPEN, 100.0, 5.0),
        (Loop.OPEN, 200.0, 5.0),
    ]
    default = cli.specs_of(parse("router", "--target", "h:1"))
    assert [(s.loop, s.users, s.duration_s) for s in default] == [(Loop.CLOSED, 1, 30.0)]
    with pytest.raises(SystemExit):
        parse("decode", "--target", "h:1", "--users", "2", "--rate", "3")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--op", "cycle"], "needs --donor and --helper"),
        (["--op", "cycle", "--donor", "d", "--helper", "d"], "two workers"),
        (["--op", "cycle", "--donor", "d", "--helper", "p", "--users", "2"], "--users 1"),
        (["--op", "cycle", "--donor", "d", "--helper", "p", "--rate", "5"], "--users 1"),
        (["--op", "list", "--start-layer", "3", "--end-layer", "3"], "--start-layer <"),
        (["--op", "list", "--poll-ms", "0"], "--poll-ms must be positive"),
    ],
)
def test_the_coordinator_load_test_refuses_bad_flags_before_connecting(capsys, argv, message):
    """It was a stub that printed "no load test is written for the coordinator yet" (exit 2);
    now a load test whose flags are checked like the others' (session 38)."""
    from services.cli import main

    assert main(["loadtest", "coordinator", "--target", "127.0.0.1:1", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_coordinator_load_test_records_each_ops_names():
    from bench.loadtest.coordinator import CoordinatorLoad, CoordinatorScenario

    names = {
        op: CoordinatorScenario("h:1", CoordinatorLoad(op, donor="d", helper="p")).sample_names
        for op in ("list", "describe", "cycle")
    }
    assert names == {
        "list": ("list", "ListMigrations"),
        "describe": ("describe", "DescribeMigration"),
        "cycle": ("cycle", "StartMigration", "to ACTIVE", "RevertMigration", "to DONE"),
    }
