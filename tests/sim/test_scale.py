"""``sim run``: the split search and the report, on a tiny cluster."""

from __future__ import annotations

import json
from dataclasses import replace

from services.cli import main
from services.sim.scale import better, prefill_counts
from tests.sim.test_validate import profile


def test_prefill_counts_leave_a_decoder_and_dedupe():
    assert prefill_counts(8, [0.25, 0.375, 0.5, 0.625, 0.75]) == [2, 3, 4, 5, 6]
    assert prefill_counts(2, [0.25, 0.5, 0.75]) == [1]
    assert prefill_counts(128, [0.25, 0.5]) == [32, 64]


def test_the_best_split_is_by_goodput_then_throughput():
    a = {"goodput": 1.0, "output_throughput": 10.0}
    assert better(a, None)
    assert better({"goodput": 1.0, "output_throughput": 11.0}, a)
    assert not better({"goodput": 0.9, "output_throughput": 99.0}, a)
    assert better(
        {"goodput": 1.0, "output_throughput": 10.0}, {"goodput": None, "output_throughput": 50.0}
    )


def _argv(tmp_path) -> list[str]:
    prof = tmp_path / "profile.json"
    profile().save(prof)
    return [
        "sim",
        "run",
        "--profile",
        str(prof),
        "--workers",
        "4",
        "--workloads",
        "mixed",
        "--duration",
        "5",
        "--drain-s",
        "30",
        "--splits",
        "0.25,0.5",
        "--out",
        str(tmp_path),
    ]


def test_the_cli_writes_the_report_json_and_plots(tmp_path, capsys):
    assert main(_argv(tmp_path)) == 0
    (point,) = json.loads((tmp_path / "sim-scale.json").read_text())
    assert point["workers"] == 4 and point["workload"] == "mixed"
    # up --mode banaserve's router rule: its decode workers prefill mixed's 64-token prompts
    assert 0 < point["runs"]["banaserve"]["local_prefills"] < point["num_requests"]
    assert [s["num_prefill"] for s in point["splits"]] == [1, 2]
    assert point["runs"]["static-pd"]["num_prefill"] in (1, 2)
    assert set(point["runs"]) == {"colocated", "static-pd", "banaserve"}
    assert "| 4 | mixed |" in (tmp_path / "sim-scale.md").read_text()
    for name in ("output_throughput", "goodput", "utilisation"):
        assert (tmp_path / f"sim-scale-{name}.png").stat().st_size > 0


def test_banaserve_runs_its_routers_conditional_disaggregation_as_told(tmp_path, capsys):
    """``--local-prefill-max-tokens 64``: mixed's 64-token prompts are prefilled by the decode
    workers of banaserve (the router's own rule); the report says so. Both limits 0: none is."""
    argv = _argv(tmp_path) + ["--local-prefill-max-tokens", "64", "--local-prefill-queue-tokens",
                              "0", "--decode-max-num-batched-tokens", "32",
                              "--decode-max-prefill-tokens-while-decoding", "8"]  # fmt: skip
    assert main(argv) == 0
    (point,) = json.loads((tmp_path / "sim-scale.json").read_text())
    local = point["runs"]["banaserve"]["local_prefills"]
    assert 0 < local < point["num_requests"]
    report = (tmp_path / "sim-scale.md").read_text()
    assert ("--local-prefill-max-tokens 64 --local-prefill-queue-tokens 0, its decode workers "
            "--max-num-batched-tokens 32 --max-prefill-tokens-while-decoding 8") in report  # fmt: skip
    assert report.splitlines()[-1].endswith(f"| {local} |")
    off = ["--local-prefill-max-tokens", "0", "--local-prefill-queue-tokens", "0"]
    assert main(_argv(tmp_path) + off) == 0
    (point,) = json.loads((tmp_path / "sim-scale.json").read_text())
    assert point["runs"]["banaserve"]["local_prefills"] == 0
    report = (tmp_path / "sim-scale.md").read_text()
    assert "no local prefill on banaserve's decode workers" in report


def test_failed_requests_are_counted_and_said_in_the_report(tmp_path, capsys):
    """Every planned request is completed or reported as failed, with why: a prompt larger than
    any worker's KV pool is refused by the router (RESOURCE_EXHAUSTED). Before, the report
    showed only "n/a" cells, and the JSON no reason."""
    argv = _argv(tmp_path)
    argv[argv.index("--profile") + 1] = str(tmp_path / "tiny.json")
    replace(profile(), num_kv_blocks=4).save(tmp_path / "tiny.json")  # 64 tokens a worker
    assert main(argv) == 0
    (point,) = json.loads((tmp_path / "sim-scale.json").read_text())
    for run in [*point["runs"].values(), *point["splits"]]:
        assert run["num_ok"] + sum(run["failures"].values()) == point["num_requests"] > 0
        assert run["failures"] == {"RESOURCE_EXHAUSTED": point["num_requests"]}
        assert "more than any" in run["failure_messages"]["RESOURCE_EXHAUSTED"]
    report = (tmp_path / "sim-scale.md").read_text()
    assert f"| 4 | mixed | {point['num_requests']} | 0 / 0 / 0 |" in report
    n = point["num_requests"]
    assert f"- N=4 mixed colocated: {n} of {n} RESOURCE_EXHAUSTED: request " in report
    assert f"N=4 mixed banaserve: {n} of {n} RESOURCE_EXHAUSTED" in capsys.readouterr().out


def test_a_request_unfinished_at_the_deadline_is_reported_with_why(tmp_path, capsys):
    argv = _argv(tmp_path)
    argv[argv.index("--drain-s") + 1] = "0"  # the last requests cannot finish by the deadline
    assert main(argv) == 0
    (point,) = json.loads((tmp_path / "sim-scale.json").read_text())
    run = point["runs"]["colocated"]
    assert run["failures"]["DEADLINE_EXCEEDED"] == point["num_requests"] - run["num_ok"] > 0
    assert "deadline" in run["failure_messages"]["DEADLINE_EXCEEDED"]
    assert "DEADLINE_EXCEEDED: unfinished at the run's deadline" in (
        tmp_path / "sim-scale.md").read_text()  # fmt: skip
