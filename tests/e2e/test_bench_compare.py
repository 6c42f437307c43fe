"""``banaserve bench compare`` end to end: three real ``banaserve up`` clusters (tiny-llama), two
workloads of a few requests each (one a Mooncake-format trace written here), and the JSON,
markdown and PNG files it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.compare_report import COLUMNS
from services.cli import main

# A cluster per mode, ~30 s: CI runs it in ``make test-cluster``, outside the default run.
pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(900)]

RUN_KEYS = {"mode", "workload", "summary", "migrations", "utilisation", "timeline", "requests",
            "deadline_s", "settle_s", "num_missed_samples"}  # fmt: skip
ROW_KEYS = {"workload", "mode", "num_ok", "num_requests", "makespan_s", "output_throughput",
            "total_token_throughput", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
            "slo_attainment", "goodput", "num_migrations"}  # fmt: skip


def write_trace(path: Path) -> None:
    rows = [(0, 2000, 64, [0, 1, 2, 3]), (100, 1500, 32, [0, 1, 4]), (300, 700, 96, [5, 6])]
    path.write_text("".join(
        json.dumps({"timestamp": t, "input_length": n, "output_length": m, "hash_ids": h}) + "\n"
        for t, n, m, h in rows
    ))  # fmt: skip


def test_compare_runs_every_mode_and_writes_its_files(tmp_path, banaserve_home, tiny_llama,
                                                      monkeypatch):  # fmt: skip
    monkeypatch.setenv("BANASERVE_HOME", str(banaserve_home))
    write_trace(tmp_path / "mooncake_conversation.jsonl")
    out = tmp_path / "out"
    code = main([
        "bench", "compare", "--model", "tiny-llama", "--vocab-range", "100:4000",
        "--workloads", "hotspot,mooncake", "--duration", "2", "--drain-s", "30",
        "--settle-s", "2", "--warmup", "1", "--traces-dir", str(tmp_path),
        "--up-args", "--num-kv-blocks 256", "--out", str(out), "--label", "smoke",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "compare-smoke.json").read_text())
    assert report["benchmark"] == "compare"
    assert report["config"]["modes"] == ["colocated", "static-pd", "banaserve"]
    assert list(report["workloads"]) == ["hotspot", "mooncake"]
    assert report["workloads"]["mooncake"]["num_requests"] == 3
    assert [(c["mode"], c["exit_code"]) for c in report["clusters"]] == [
        ("colocated", 0), ("static-pd", 0), ("banaserve", 0),
    ]  # fmt: skip
    runs = report["runs"]
    assert [(r["mode"], r["workload"]) for r in runs] == [
        (m, w) for m in ("colocated", "static-pd", "banaserve") for w in ("hotspot", "mooncake")
    ]
    for run in runs:
        assert set(run) == RUN_KEYS
        planned = report["workloads"][run["workload"]]["num_requests"]
        assert run["summary"]["num_ok"] == run["summary"]["num_requests"] == planned
        assert run["timeline"]["samples"], "the watcher sampled the router"
        workers = {w["role"] for w in run["utilisation"].values()}
        assert workers == ({"mixed"} if run["mode"] == "colocated" else {"prefill", "decode"})
        assert run["migrations"]["num_started"] >= 0
    assert all(set(r) == ROW_KEYS for r in report["table"]) and len(report["table"]) == 6
    assert set(report["ratios"]) == {"hotspot", "mooncake"}
    assert set(report["ratios"]["hotspot"]) == {"static-pd", "colocated"}
    markdown = (out / "compare-smoke.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in markdown
    assert (
        sum(line.startswith(("| hotspot |", "| mooncake |")) for line in markdown.splitlines())
        == 6 + 4
    )
    for name in ("throughput", "latency", "utilisation"):
        assert (out / f"compare-smoke-{name}.png").read_bytes()[:4] == b"\x89PNG"
