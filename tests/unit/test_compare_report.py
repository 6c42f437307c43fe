"""``bench compare``'s arithmetic on hand-made request timings (exact SLO attainment, goodput,
throughput, makespan), migration counts from watcher events, utilisation, the ratios, the
markdown and plots, the mode → ``banaserve up`` mapping and the command line. No server."""

from __future__ import annotations

import argparse

import pytest

from bench import compare
from bench.compare_cluster import MODE_UP_ARGS, Mode, mode_cluster, up_argv
from bench.compare_plots import write_plots
from bench.compare_report import (
    migrations_during,
    ratios,
    render_markdown,
    row,
    run_result,
    utilisation_summary,
)
from bench.serve_report import OK, RequestRecord
from bench.workloads import FAMILIES

SLO = (1000.0, 250.0)  # TTFT ms, TPOT ms


def record(index: int, sent: float, ttft: float | None, tokens: int, e2e: float,
           status: str = OK) -> RequestRecord:  # fmt: skip
    """``tokens`` output tokens: the first at ``ttft``, the rest evenly up to ``e2e``."""
    r = RequestRecord(index, 100, tokens, sent_at_s=sent, status=status, e2e_s=e2e)
    if ttft is not None:
        step = (e2e - ttft) / (tokens - 1) if tokens > 1 else 0.0
        r.chunks = [(ttft + i * step, 1) for i in range(tokens)]
        r.num_output_tokens = tokens
    return r


def hand_made() -> list[RequestRecord]:
    return [
        record(0, 0.0, 0.2, 5, 1.0),  # TTFT 200 ms, TPOT 200 ms: meets
        record(1, 1.0, 1.5, 2, 1.7),  # TTFT 1,500 ms: misses
        record(2, 2.0, 0.5, 3, 1.5),  # TPOT 500 ms: misses
        record(3, 3.0, 0.3, 1, 0.3),  # one token, no TPOT: meets
        record(4, 4.0, None, 0, 1.0, status="UNAVAILABLE"),  # failed: misses, ends at 5.0
    ]


SAMPLES = [
    {"t": 0.0, "workers": {"prefill-0": {"role": "prefill", "utilisation": 0.5},
                           "decode-0": {"role": "decode", "utilisation": 0.25}}},
    {"t": 0.5, "workers": {"prefill-0": {"role": "prefill", "utilisation": 1.0},
                           "decode-0": {"role": "decode", "utilisation": 0.75}}},
    {"t": 1.0, "workers": {"prefill-0": {"role": "prefill", "utilisation": 0.0}}},
]  # fmt: skip
KNOWN = {"m-1": {"id": "m-1", "state": "ACTIVE"}}  # when the run began
EVENTS = [
    {"t": 0.1, "id": "m-1", "state": "DONE"},  # started before the run, reverted in it
    {"t": 0.2, "id": "m-2", "state": "PLANNED"},
    {"t": 0.4, "id": "m-2", "state": "COPYING"},
    {"t": 0.6, "id": "m-2", "state": "ACTIVE"},
    {"t": 0.7, "id": "m-3", "state": "PLANNED"},
    {"t": 0.9, "id": "m-3", "state": "ABORTED"},
]


def test_slo_attainment_goodput_and_throughput_are_exact():
    r = row(run_result("banaserve", "mixed", hand_made(), SLO, SAMPLES, EVENTS, KNOWN))
    assert r["num_ok"] == 4 and r["num_requests"] == 5
    assert r["makespan_s"] == pytest.approx(5.0)  # first send 0.0 → the failed one's end 5.0
    assert r["slo_attainment"] == pytest.approx(2 / 5)  # over every request sent
    assert r["goodput"] == pytest.approx(2 / 5.0)
    assert r["output_throughput"] == pytest.approx((5 + 2 + 3 + 1) / 5.0)
    assert r["total_token_throughput"] == pytest.approx((4 * 100 + 11) / 5.0)
    assert r["ttft_p50_ms"] == pytest.approx(400.0)  # of 200, 300, 500, 1500
    assert r["ttft_p99_ms"] == pytest.approx(1500 - 0.03 * 1000)
    assert r["tpot_p50_ms"] == pytest.approx(200.0)  # of 200, 200, 500
    assert r["tpot_p99_ms"] == pytest.approx(494.0)
    assert r["num_migrations"] == 2


def test_migrations_counted_from_state_events():
    assert migrations_during(EVENTS, KNOWN) == {
        "num_started": 2, "num_activated": 1, "num_reverted": 1, "num_aborted": 1,
        "ids": ["m-2", "m-3"], "active_at_start": ["m-1"],
    }  # fmt: skip
    assert migrations_during([], {"m-0": {"state": "DONE"}}) == {
        "num_started": 0, "num_activated": 0, "num_reverted": 0, "num_aborted": 0, "ids": [],
        "active_at_start": [],
    }  # fmt: skip


def test_utilisation_mean_and_peak_per_worker():
    assert utilisation_summary(SAMPLES) == {
        "decode-0": {"role": "decode", "mean": 0.5, "max": 0.75, "num_samples": 2},
        "prefill-0": {"role": "prefill", "mean": 0.5, "max": 1.0, "num_samples": 3},
    }


def runs_for(workload: str) -> list[dict]:
    fast = [record(0, 0.0, 0.1, 9, 0.9), record(1, 0.5, 0.1, 9, 1.5)]  # 18 tokens in 2.0 s
    slow = [record(0, 0.0, 0.4, 9, 1.2), record(1, 0.5, 1.6, 9, 3.5)]  # 18 tokens in 4.0 s
    return [
        run_result("colocated", workload, slow, SLO, [], [], {}),
        run_result("static-pd", workload, slow[:1], SLO, [], [], {}),
        run_result("banaserve", workload, fast, SLO, [], [], {}),
    ]


def test_ratios_banaserve_over_each_baseline():
    table = [row(r) for r in runs_for("hotspot")]
    by_mode = {r["mode"]: r for r in table}
    assert by_mode["colocated"]["output_throughput"] == pytest.approx(18 / 4.0)
    assert by_mode["static-pd"]["output_throughput"] == pytest.approx(9 / 1.2)
    got = ratios(table)["hotspot"]
    assert got["colocated"]["output_throughput"] == pytest.approx((18 / 2.0) / (18 / 4.0))
    assert got["static-pd"]["output_throughput"] == pytest.approx((18 / 2.0) / (9 / 1.2))
    # goodput: banaserve 2 met / 2.0 s; colocated 1 met (TTFT 1.6 s misses) / 4.0 s
    assert got["colocated"]["goodput"] == pytest.approx(1.0 / 0.25)
    assert got["colocated"]["ttft_p99"] == pytest.approx(100.0 / (400 + 0.99 * 1200))
    assert ratios([r for r in table if r["mode"] != "banaserve"]) == {}
    assert ratios([r for r in table if r["mode"] == "banaserve"]) == {}  # no baseline ran


def report_of(runs: list[dict]) -> dict:
    table = [row(r) for r in runs]
    return {
        "config": {"model": "tiny-llama", "profile": "quick", "duration_s": 5.0,
                   "rate_scale": 1.0, "seed": 0, "threads": 1,
                   "up_args": {m.value: list(MODE_UP_ARGS[m]) for m in Mode},
                   "mode_clusters": {m.value: mode_cluster(m) for m in Mode}},
        "machine": {"date": "2026-12-02 02:00 UTC"},
        "workloads": {"hotspot": {"description": "d", "num_requests": 2, "slo_ttft_ms": 1000.0,
                                  "slo_tpot_ms": 250.0}},
        "table": table, "ratios": ratios(table), "runs": runs,
    }  # fmt: skip


def test_markdown_has_a_row_per_run_and_the_ratios():
    runs = runs_for("hotspot")
    runs[2]["timeline"] = {"samples": SAMPLES, "events": EVENTS}
    text = render_markdown(report_of(runs))
    # colocated TPOTs 100 and 237.5 ms (p50 168.75, p99 236.1); banaserve 100 and 175 ms
    assert (
        "| hotspot | colocated | 2 / 2 | 4.0 | 4.5 | 54.5 | 1000 / 1588 | 169 / 236 | 50.0 | 0.250 | 0 |"
        in text
    )
    assert (
        "| hotspot | banaserve | 2 / 2 | 2.0 | 9.0 | 109.0 | 100 / 100 | 138 / 174 | 100.0 | 1.000 | 0 |"
        in text
    )
    assert "| hotspot | static-pd | 1.20 | 1.20 | 0.25 |" in text  # banaserve ÷ base
    assert "| hotspot | colocated | 2.00 | 4.00 | 0.06 |" in text
    assert "`colocated`: `up --mode colocated` (2 mixed, colocated routing, 0 store nodes)" in text
    assert "`static-pd`: `up --mode static-pd` (1 prefill, 1 decode, load routing, 0 store" in text
    assert (
        "`banaserve`: `up --mode banaserve` (1 prefill, 1 decode, load routing, 1 store nodes, "
        "coordinator --auto, router --local-prefill-max-tokens 128 --local-prefill-queue-tokens "
        "1280, decode --max-num-batched-tokens 64)" in text
    )


def test_plots_are_written(tmp_path):
    runs = runs_for("hotspot") + runs_for("mixed")
    runs[2]["timeline"] = {"samples": SAMPLES, "events": EVENTS}
    paths = write_plots(report_of(runs), tmp_path, "compare")
    assert [p.name for p in paths] == [
        "compare-throughput.png", "compare-latency.png", "compare-utilisation.png",
    ]  # fmt: skip
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_each_mode_is_one_up_command_line():
    assert up_argv(Mode.COLOCATED, "smollm2-135m", 1, True)[2:] == [
        "services.cli", "up", "--model", "smollm2-135m", "--threads", "1", "--pin",
        "--mode", "colocated",
    ]  # fmt: skip
    assert up_argv(Mode.STATIC_PD, "m", 1, False, ("--x",))[4:] == [
        "--model", "m", "--threads", "1", "--mode", "static-pd", "--x",
    ]  # fmt: skip
    assert mode_cluster(Mode.BANASERVE) == {
        "coordinator": True, "num_decode": 1, "num_kvstore": 1, "num_mixed": 0,
        "num_prefill": 1, "policy": "load", "service_args": {
            "coordinator": ["--auto"],
            "router": ["--local-prefill-max-tokens", "128", "--local-prefill-queue-tokens", "1280"],
            "decode": ["--max-num-batched-tokens", "64"],
        },
    }  # fmt: skip
    assert mode_cluster(Mode.COLOCATED)["num_mixed"] == 2


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_profiles_and_overrides():
    args = parse()
    assert (args.model, args.modes, args.pin, args.threads) == (
        "smollm2-135m", ["colocated", "static-pd", "banaserve"], True, 1,
    )  # fmt: skip
    assert compare.profile_of(args) == compare.Profile(24.0, 14.0, 15.0, FAMILIES)
    quick = ("phase-shift", "mixed", "hotspot")
    assert compare.profile_of(parse("--quick")) == compare.Profile(12.0, 12.0, 6.0, quick)
    argv = ("--quick", "--duration", "2", "--drain-s", "0", "--workloads", "bursty")
    assert compare.profile_of(parse(*argv)) == compare.Profile(2.0, 0.0, 6.0, ("bursty",))
    assert parse("--modes", "banaserve,colocated").modes == ["banaserve", "colocated"]


@pytest.mark.parametrize("argv", [["--modes", "vllm"], ["--workloads", "long-context,x"]])
def test_unknown_names_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "expected a comma list of" in capsys.readouterr().err


def test_jobs_take_the_workload_slo_unless_overridden():
    args = parse("--workloads", "hotspot,mixed")
    jobs = compare.jobs_from_args(args, compare.profile_of(args))
    assert [(j.workload.name, j.slo) for j in jobs] == [
        ("hotspot", (3000.0, 250.0)), ("mixed", (5000.0, 250.0)),
    ]  # fmt: skip
    args = parse("--workloads", "mixed", "--slo-ttft-ms", "700")
    assert compare.jobs_from_args(args, compare.profile_of(args))[0].slo == (700.0, 250.0)
