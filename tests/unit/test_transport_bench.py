"""``bench.transport_bench``: arguments, arithmetic, the report, and one real two-process run."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import transport_bench as tb

MiB = 1 << 20


def test_sizes_take_units_and_reject_nonsense():
    assert tb.size_list("1MiB, 64mib,512KiB,100,1GiB,1MiB") == [
        MiB,
        64 * MiB,
        512 << 10,
        100,
        1 << 30,
    ]
    for bad in ("", "0MiB", "1XB", "MiB", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            tb.size_list(bad)


def test_labels_use_the_largest_exact_unit():
    assert [tb.label_of(n) for n in (64 * MiB, 1536 << 10, 100, 1 << 30)] == [
        "64 MiB",
        "1536 KiB",
        "100 B",
        "1 GiB",
    ]


def test_summary_gives_median_and_p90_throughput():
    row = tb.summarise(MiB, {"samples_s": [0.001, 0.002, 0.003, 0.004, 0.010]})
    assert row["ms"]["p50"] == pytest.approx(3.0)
    assert row["ms"]["p90"] == pytest.approx(7.6)  # linear between 4 and 10 ms
    assert row["gbps_median"] == pytest.approx(MiB / 0.003 / 1e9)
    assert row["gbps_p90"] == pytest.approx(MiB / 0.0076 / 1e9)
    assert tb.summarise(MiB, {"error": "refused"}) == {"error": "refused"}


def test_table_shows_figures_and_failures():
    ok = {"transport": "tcp", "size_bytes": MiB, **tb.summarise(MiB, {"samples_s": [0.002]})}
    failed = {"transport": "ucx", "size_bytes": MiB, "error": "server did not start\ntrace"}
    lines = tb.table([ok, failed])
    assert lines[2] == "| 1 MiB | tcp | 2.00 | 2.00 | 0.52 | 0.52 |"
    assert lines[3] == "| 1 MiB | ucx | n/a (server did not start) | | | |"


@pytest.mark.integration
def test_a_real_run_writes_json_and_markdown(tmp_path, capsys):
    argv = ["--transports", "tcp", "--sizes", "4KiB,64KiB", "--iterations", "3"]
    assert tb.main([*argv, "--warmup", "1", "--out", str(tmp_path), "--label", "t"]) == 0
    report = json.loads((tmp_path / "transport-t.json").read_text())
    assert [(r["transport"], r["size_bytes"]) for r in report["results"]] == [
        ("tcp", 4096),
        ("tcp", 65536),
    ]
    assert all(len(r["samples_s"]) == 3 for r in report["results"])
    assert report["machine"]["versions"]["grpcio"]
    markdown = (tmp_path / "transport-t.md").read_text()
    assert "| 64 KiB | tcp |" in markdown and markdown in capsys.readouterr().out
