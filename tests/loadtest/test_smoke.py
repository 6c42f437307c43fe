"""A short smoke run of every service's load test (``banaserve loadtest``) against real service
processes (conftest.py), each a couple of seconds at low load: the report must hold sane
figures — iterations done, no error, p50 ≤ p90 ≤ p99 ≤ max, throughput = successes over the
measured window, the exact bytes and tokens each RPC moves — and the service must be left with
nothing held."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bench.serve_workload import arrival_times
from services.cli import main

pytestmark = pytest.mark.integration

DURATION_S = 1.5


def loadtest(out: Path, service: str, *argv: str) -> dict:
    args = ["loadtest", service, *argv, "--out", str(out), "--label", "smoke", "--timeout", "20s"]
    if "--duration" not in argv:
        args += ["--duration", f"{DURATION_S:g}s"]
    assert main(args) == 0
    report = json.loads((out / f"{service}-smoke.json").read_text())
    rows = list(csv.DictReader((out / f"{service}-smoke.csv").open()))
    assert [(r["step"], r["name"]) for r in rows] == [
        (str(i), r["name"]) for i, step in enumerate(report["steps"]) for r in step["rpcs"]
    ]
    return report


def assert_sane(step: dict, names: list[str]) -> dict[str, dict]:
    """Every name, in order; no error; ordered percentiles; throughput = ok / window."""
    assert step["num_iterations"] > 0
    assert [r["name"] for r in step["rpcs"]] == names
    for r in step["rpcs"]:
        assert (r["ok"], r["errors"], r["error_codes"]) == (r["count"], 0, {}), r
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], r
        assert r["throughput_per_s"] == pytest.approx(r["ok"] / step["duration_s"])
    assert step["server_after"]["leaks"] == ""
    return {r["name"]: r for r in step["rpcs"]}


def assert_closed_loop_window(step: dict) -> None:
    # Users start iterations until DURATION_S; the last ones end after it (the window starts
    # at the first iteration, a moment after the run).
    assert DURATION_S - 0.05 <= step["duration_s"] < DURATION_S + 20


def test_kvstore_fetches_exact_bytes_and_leaves_no_pin(service_procs, tmp_path, capsys):
    layout = ["--num-blocks", "2", "--num-layers", "3", "--layer-bytes", "4KiB"]
    node = service_procs["kvstore"]
    report = loadtest(tmp_path, "kvstore", "--target", node.address, "--users", "2",
                      "--op", "read", *layout, "--server-pid", str(node.popen.pid))  # fmt: skip
    (step,) = report["steps"]
    rows = assert_sane(step, ["fetch", "Lookup", "Pin", "DataRead", "Unpin"])
    n = rows["fetch"]["ok"]
    assert [rows[k]["ok"] for k in ("Lookup", "Pin", "Unpin")] == [n, n, n]
    assert rows["DataRead"]["ok"] == 3 * n  # one run (one node), three layers
    assert rows["DataRead"]["bytes"] == 3 * n * 2 * 4096
    assert rows["DataRead"]["gb_per_s"] == pytest.approx(
        rows["DataRead"]["bytes"] / step["duration_s"] / 1e9
    )
    assert_closed_loop_window(step)
    (counters,) = step["server_after"]["nodes"].values()
    assert (counters["num_pins"], counters["num_reservations"]) == (0, 0)
    assert list(step["server_cpu_s"]) == [str(node.popen.pid)]  # JSON keys are strings
    assert 0 < step["server_cpu_share"] < 2
    assert "# Load test: kvstore" in capsys.readouterr().out


def test_kvstore_write_sweep_finds_its_best_step(service_procs, tmp_path):
    target = service_procs["kvstore"].address
    report = loadtest(tmp_path, "kvstore", "--target", target, "--op", "write",
                      "--rate", "5,10", "--duration", "1s", "--p99-target-ms", "5000",
                      "--layer-bytes", "4KiB", "--seed", "7")  # fmt: skip
    assert [s["load"] for s in report["steps"]] == ["5/s", "10/s"]
    for step, rate in zip(report["steps"], (5.0, 10.0), strict=True):
        rows = assert_sane(step, ["store", "Reserve", "DataWrite", "Commit"])
        assert rows["store"]["count"] == len(arrival_times(rate, 1.0, 7, None, 1.0))
        assert rows["DataWrite"]["bytes"] == rows["store"]["ok"] * 4 * 4 * 4096
        assert step["slo"]["pass"] is True
    sweep = report["sweep"]
    best = max(range(2), key=lambda i: report["steps"][i]["rpcs"][0]["throughput_per_s"])
    assert (sweep["name"], sweep["best_step"]) == ("store", best)


def test_decode_imports_kv_and_streams_every_token(service_procs, tmp_path):
    target = service_procs["decode"].address
    report = loadtest(tmp_path, "decode", "--target", target, "--users", "2",
                      "--prompt-len", "20", "--max-tokens", "4")  # fmt: skip
    (step,) = report["steps"]
    rows = assert_sane(
        step, ["request", "ReserveKV", "TransferKV", "StreamTokens first token", "StreamTokens"]
    )
    n = rows["request"]["ok"]
    assert rows["StreamTokens"]["tokens"] == 3 * n  # the first token came with the transfer
    assert rows["TransferKV"]["bytes"] == n * report["scenario"]["kv_bytes_per_request"]
    assert_closed_loop_window(step)
    assert (step["server_after"]["num_blocks_used"], step["server_after"]["num_reservations"]) == (
        0,
        0,
    )


def test_decode_run_again_sends_only_the_blocks_the_worker_does_not_hold(service_procs, tmp_path):
    """The same seeded prompts twice (``--nonce`` repeated; short runs: fewer blocks than the
    pool, so none is evicted): the worker's prefix cache holds the first run's, and the second
    run sends each layer from the block ReserveKV names, with no error (a run longer than the
    pool holds cycles it, and later prompts find theirs evicted: nothing to reuse then)."""
    target = service_procs["decode"].address
    args = ("--target", target, "--users", "2", "--prompt-len", "40", "--max-tokens", "2",
            "--seed", "11", "--nonce", "smoke-again", "--duration", "0.4s")  # fmt: skip
    runs = [loadtest(tmp_path / str(i), "decode", *args)["steps"][0] for i in range(2)]
    rows = [assert_sane(step, ["request", "ReserveKV", "TransferKV", "StreamTokens first token",
                               "StreamTokens"]) for step in runs]  # fmt: skip
    per_request = [r["TransferKV"]["bytes"] / r["request"]["ok"] for r in rows]
    assert per_request[1] < per_request[0]  # 40 tokens: blocks 0 and 1 are cached, 2 is sent


def test_every_step_and_every_run_sends_uncached_prompts(service_procs, tmp_path):
    """A sweep's steps reused the first step's prompts, and a run with the same seed the last
    run's: the decode worker's prefix cache held them, and later steps moved a fraction of
    the KV. Now every request of every step of both runs moves the whole prompt's KV."""
    target = service_procs["decode"].address
    args = ("--target", target, "--users", "1,1", "--max-requests", "2", "--prompt-len", "40",
            "--max-tokens", "2", "--seed", "4242")  # fmt: skip
    runs = [loadtest(tmp_path / str(i), "decode", *args) for i in range(2)]
    for report in runs:
        per_request = report["scenario"]["kv_bytes_per_request"]
        moved = [{r["name"]: r for r in s["rpcs"]}["TransferKV"]["bytes"] for s in report["steps"]]
        assert moved == [2 * per_request, 2 * per_request]
    assert runs[0]["scenario"]["nonce"] != runs[1]["scenario"]["nonce"]


def test_prefill_sends_to_a_stream_sink(service_procs, tmp_path):
    """``--sink-transport stream`` refused the worker's transfer (its ``open`` frame)."""
    target = service_procs["bare-prefill"].address
    report = loadtest(tmp_path, "prefill", "--target", target, "--max-requests", "3",
                      "--prompt-len", "32", "--sink-transport", "stream")  # fmt: skip
    (step,) = report["steps"]
    rows = assert_sane(step, ["request", "Prefill first token", "Prefill"])
    assert rows["Prefill"]["ok"] == 3
    assert step["server_after"]["sink_transfers"] == 3 + 1  # and the warm-up's


def test_prefill_sends_each_prompt_to_the_sink_at_the_poisson_rate(service_procs, tmp_path):
    target = service_procs["bare-prefill"].address
    report = loadtest(tmp_path, "prefill", "--target", target, "--rate", "4",
                      "--prompt-len", "32", "--sink-transport", "tcp")  # fmt: skip
    (step,) = report["steps"]
    rows = assert_sane(step, ["request", "Prefill first token", "Prefill"])
    planned = arrival_times(4.0, 1.0, 0, None, DURATION_S)
    assert rows["request"]["count"] == len(planned)
    assert rows["Prefill"]["tokens"] == 32 * len(planned)
    assert planned[-1] - 0.05 <= step["duration_s"] < DURATION_S + 20
    after = step["server_after"]
    assert after["sink_transfers"] == len(planned) + 1  # and the warm-up's
    assert after["sink_bytes"] == rows["Prefill"]["bytes"] * (len(planned) + 1) // len(planned)
    assert (after["num_blocks_used"], after["num_open_transfers"]) == (0, 0)


def test_router_generates_through_its_real_workers(service_procs, tmp_path):
    target = service_procs["router"].address
    report = loadtest(tmp_path, "router", "--target", target, "--users", "2",
                      "--prompt-len", "8", "--max-tokens", "4")  # fmt: skip
    (step,) = report["steps"]
    rows = assert_sane(step, ["request", "Generate first token", "Generate"])
    assert rows["Generate"]["tokens"] == 4 * rows["request"]["ok"]
    assert_closed_loop_window(step)
    assert sorted(w.split("-")[0] for w in step["server_after"]["workers"]) == [
        "decode",
        "prefill",
    ]


def test_router_alone_with_stub_workers(service_procs, tmp_path):
    router = service_procs["bare-router"].address
    report = loadtest(tmp_path, "router", "--target", router, "--users", "4",
                      "--max-tokens", "4", "--stub-workers")  # fmt: skip
    (step,) = report["steps"]
    rows = assert_sane(step, ["request", "Generate first token", "Generate"])
    assert rows["Generate"]["tokens"] == 4 * rows["request"]["ok"]
    assert set(step["server_after"]["workers"]) == {
        "loadtest-stub-prefill",
        "loadtest-stub-decode",
    }


def test_stub_workers_a_router_refuses_fail_at_once_with_its_reason(
    service_procs, tmp_path, capsys
):
    """Probe, session 44: against a router serving real workers (another model), the stubs'
    registration was refused INVALID_ARGUMENT and retried for 10.7 s, the reason repeated,
    ending "stub workers not active in time". Now the router's reason, at once."""
    import time

    router = service_procs["router"].address
    started = time.monotonic()
    code = main(["loadtest", "router", "--target", router, "--max-requests", "1",
                 "--stub-workers", "--out", str(tmp_path), "--timeout", "20s"])  # fmt: skip
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and "the router refused the stub workers: INVALID_ARGUMENT" in err, err
    assert took < 8.0, took  # it took 10.7 s: REGISTER_TIMEOUT_S, then the retries


def test_coordinator_cycles_migrations_then_lists_and_describes_them(service_procs, tmp_path):
    """``loadtest coordinator``, which was a stub saying "not written yet": whole layer
    migrations of the real cluster started, ACTIVE, reverted and DONE one after another, then
    the read path an operator's tools poll, over the records the cycles left."""
    from services.client.client import BanaServeClient

    with BanaServeClient(service_procs["router"].address) as client:
        ids = {w.role: w.worker_id for w in client.list_workers()}
    target = service_procs["coordinator"].address
    cycle = loadtest(tmp_path, "coordinator", "--target", target, "--op", "cycle",
                     "--donor", ids["decode"], "--helper", ids["prefill"], "--start-layer", "2",
                     "--max-requests", "3", "--duration", "30s")  # fmt: skip
    (step,) = cycle["steps"]
    rows = assert_sane(step, ["cycle", "StartMigration", "to ACTIVE", "RevertMigration", "to DONE"])
    assert rows["cycle"]["ok"] == 3  # --max-requests, and the warm-up's before them
    assert step["server_after"] == {"num_live": 0, "held": {}, "leaks": ""}
    listed = loadtest(tmp_path, "coordinator", "--target", target, "--users", "2")
    (step,) = listed["steps"]
    rows = assert_sane(step, ["list", "ListMigrations"])
    assert rows["ListMigrations"]["bytes"] > 0  # the 4 DONE records
    described = loadtest(tmp_path, "coordinator", "--target", target, "--op", "describe")
    assert described["scenario"]["num_migrations"] == 4
    assert_sane(described["steps"][0], ["describe", "DescribeMigration"])
