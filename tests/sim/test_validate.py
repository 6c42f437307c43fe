"""``sim validate`` on a small hand-made ``bench compare`` JSON."""

from __future__ import annotations

import json

import pytest

from bench.compare_cluster import mode_cluster
from bench.workloads import plan, workload
from services.cli import main
from services.common.errors import ConfigError
from services.launcher import Mode
from services.prefill.write_backs import WritePolicy
from services.sim.cluster import SimCluster
from services.sim.profile import DecodeModel, PrefillModel
from services.sim.validate import (
    METRICS,
    add_repeat,
    check_same_run,
    compare_rows,
    error,
    sim_spec,
    summary,
    up_spec,
)
from tests.sim.factories import make_profile

DURATION_S = 6.0


def profile():
    # smollm2-like sizes and round step times: 3 ms per prompt token, 90 ms per decode step.
    return make_profile(num_layers=30, num_kv_blocks=1456, max_num_seqs=64,
                        max_num_batched_tokens=2048, layer_share=0.028,
                        prefill=PrefillModel(0.0, 0.003, 0.0),
                        decode=DecodeModel(0.09, 0.0, 0.0))  # fmt: skip


def real_row(workload_name: str, mode: str) -> dict:
    return {
        "workload": workload_name, "mode": mode, "num_ok": 5, "num_requests": 5,
        "makespan_s": 10.0, "output_throughput": 50.0, "total_token_throughput": 200.0,
        "ttft_p50_ms": 400.0, "ttft_p99_ms": 900.0, "tpot_p50_ms": 95.0, "tpot_p99_ms": 120.0,
        "slo_attainment": 1.0, "goodput": 0.5, "num_migrations": 1,
    }  # fmt: skip


def compare_json(modes=("colocated", "banaserve")) -> dict:
    planned = plan(workload("mixed"), DURATION_S, 3)
    return {
        "benchmark": "compare",
        "config": {
            "model": "test", "modes": list(modes), "workloads": ["mixed"],
            "duration_s": DURATION_S, "drain_s": 15.0, "rate_scale": 1.0, "seed": 3,
            "max_model_len": 2048, "vocab_range": [1000, 30000],
            "mode_clusters": {m: mode_cluster(Mode(m)) for m in modes},
        },
        "workloads": {"mixed": {"slo_ttft_ms": 5000.0, "slo_tpot_ms": 250.0, "plan": [
            {"index": p.request.index, "at_s": p.at_s, "num_prompt_tokens": len(p.request.prompt),
             "max_tokens": p.request.max_tokens} for p in planned]}},
        "table": [real_row("mixed", m) for m in modes],
    }  # fmt: skip


def test_error_is_relative_and_none_without_a_value():
    assert error(100.0, 110.0) == pytest.approx(0.1)
    assert error(100.0, 80.0) == pytest.approx(0.2)
    assert error(None, 1.0) is None and error(0.0, 0.0) == 0.0


def test_each_row_is_simulated_on_the_recorded_mode_and_compared():
    rows = compare_rows(compare_json(), profile(), traces_dir=None)
    assert [(r["workload"], r["mode"]) for r in rows] == [("mixed", "colocated"),
                                                          ("mixed", "banaserve")]  # fmt: skip
    for r in rows:
        assert r["sim"]["num_requests"] == len(plan(workload("mixed"), DURATION_S, 3))
        assert r["sim"]["num_ok"] == r["sim"]["num_requests"]
        for key, _, _ in METRICS[:-1]:
            assert r["errors"][key] == pytest.approx(error(r["real"][key], r["sim"][key]))
        assert r["errors"]["num_migrations"] == r["sim"]["num_migrations"] - 1


def test_the_modes_cluster_and_up_args_are_replayed():
    report = compare_json()
    report["config"]["extra_up_args"] = (
        "--num-kv-blocks 256 --kv-transport tcp --coordinator-args '--gap-high 0.7 --sustain-s 1.5'"
        " --store-write-policy all"
    )
    spec = sim_spec(Mode.BANASERVE, report["config"], profile())
    assert spec.store_write_policy is WritePolicy.ALL
    assert (spec.num_workers, spec.num_prefill) == (2, 1)
    assert (spec.policy.gap_high, spec.policy.sustain_s) == (0.7, 1.5)
    assert (spec.num_kv_blocks, spec.transport) == (256, "tcp")
    assert spec.deadline_s == DURATION_S + 15.0
    colocated = sim_spec(Mode.COLOCATED, report["config"])
    assert (colocated.num_workers, colocated.num_prefill) == (2, None)
    # A run recorded before up's data planes were TCP (no up_data_planes) ran on UCX, which the
    # test profile did not measure: the profile's own is used.
    report["config"]["extra_up_args"] = ""
    assert up_spec(Mode.STATIC_PD, report["config"]).kv_transport == "ucx"
    assert sim_spec(Mode.STATIC_PD, report["config"], profile()).transport is None
    # One recorded since replays the planes it names, and --up-args still override them.
    report["config"]["up_data_planes"] = {"kv_transport": "tcp", "kvstore_transport": "tcp"}
    up = up_spec(Mode.BANASERVE, report["config"])
    assert (up.kv_transport, up.kvstore_transport) == ("tcp", "tcp")
    assert sim_spec(Mode.STATIC_PD, report["config"], profile()).transport == "tcp"
    report["config"]["extra_up_args"] = "--kv-transport grpc"
    assert up_spec(Mode.BANASERVE, report["config"]).kv_transport == "grpc"
    report["config"]["extra_up_args"] = ""
    assert sim_spec(Mode.BANASERVE, report["config"]).store_write_policy is WritePolicy.REUSED
    spec = sim_spec(Mode.STATIC_PD, report["config"])
    assert (spec.local_prefill_max_tokens, spec.reuse_cached_prefix) == (0, True)
    # The router's conditional disaggregation and the decode workers' reuse are replayed too.
    report["config"]["extra_up_args"] = (
        "--router-args '--local-prefill-max-tokens 64' --decode-args=--no-reuse-cached-prefix"
    )
    spec = sim_spec(Mode.STATIC_PD, report["config"])
    assert (spec.local_prefill_max_tokens, spec.reuse_cached_prefix) == (64, False)


def test_a_run_is_replayed_with_the_mode_flags_it_recorded():
    # A run recorded today: banaserve's router rule and decode chunk, and --up-args after them.
    report = compare_json(("static-pd", "banaserve"))
    spec = sim_spec(Mode.BANASERVE, report["config"])
    assert (spec.local_prefill_max_tokens, spec.local_prefill_queue_tokens) == (128, 1280)
    assert spec.decode_max_num_batched_tokens == 64
    assert spec.decode_max_prefill_tokens_while_decoding == 0
    report["config"]["extra_up_args"] = (
        "--router-args='--local-prefill-queue-tokens 0' --decode-args='--max-num-batched-tokens 32"
        " --max-prefill-tokens-while-decoding 16'"
    )
    spec = sim_spec(Mode.BANASERVE, report["config"])
    assert (spec.local_prefill_max_tokens, spec.local_prefill_queue_tokens) == (128, 0)
    assert spec.decode_max_num_batched_tokens == 32
    assert spec.decode_max_prefill_tokens_while_decoding == 16
    static = sim_spec(Mode.STATIC_PD, report["config"])  # its own flags: none; --up-args' apply
    assert (static.local_prefill_max_tokens, static.local_prefill_queue_tokens) == (0, 0)
    assert static.decode_max_num_batched_tokens == 32
    # A run from before session 29 recorded banaserve's coordinator --auto alone: no rule, the
    # profile's chunk; its --up-args still apply.
    report["config"]["mode_clusters"]["banaserve"]["service_args"] = {"coordinator": ["--auto"]}
    spec = sim_spec(Mode.BANASERVE, report["config"])
    assert (spec.local_prefill_max_tokens, spec.local_prefill_queue_tokens) == (0, 0)
    assert spec.decode_max_num_batched_tokens == 32
    assert spec.decode_max_prefill_tokens_while_decoding == 16
    up = up_spec(Mode.BANASERVE, report["config"])
    assert up.service_args == {"coordinator": ("--auto",), "router": ("--local-prefill-queue-tokens", "0"),
                               "decode": ("--max-num-batched-tokens", "32",
                                          "--max-prefill-tokens-while-decoding", "16")}  # fmt: skip
    # Session 30's first runs recorded a 256-token chunk with a 64-token cap beside decodes.
    report["config"]["extra_up_args"] = ""
    report["config"]["mode_clusters"]["banaserve"]["service_args"] = {
        "coordinator": ["--auto"],
        "decode": ["--max-num-batched-tokens", "256", "--max-prefill-tokens-while-decoding", "64"],
    }
    spec = sim_spec(Mode.BANASERVE, report["config"])
    assert (spec.decode_max_num_batched_tokens, spec.decode_max_prefill_tokens_while_decoding) == (
        256,
        64,
    )
    # ... and one that recorded no clusters at all ran the same.
    report["config"]["extra_up_args"] = ""
    del report["config"]["mode_clusters"]
    assert up_spec(Mode.BANASERVE, report["config"]).service_args == {"coordinator": ("--auto",)}
    assert sim_spec(Mode.BANASERVE, report["config"]).decode_max_num_batched_tokens is None
    # Repeat runs of one cluster recorded before and after compare as different clusters.
    other = compare_json(("static-pd", "banaserve"))
    with pytest.raises(ConfigError, match="differs from the compared one in extra_up_args"):
        check_same_run(other, report["config"], ["banaserve"])
    check_same_run(other, report["config"], ["static-pd"])
    # A chunk or a cap no decode worker could have run is refused.
    report["config"]["extra_up_args"] = "--decode-args='--max-num-batched-tokens 0'"
    with pytest.raises(ConfigError, match="max-num-batched-tokens 0"):
        sim_spec(Mode.STATIC_PD, report["config"])
    report["config"]["extra_up_args"] = "--decode-args='--max-prefill-tokens-while-decoding -1'"
    with pytest.raises(ConfigError, match="max-prefill-tokens-while-decoding -1"):
        sim_spec(Mode.STATIC_PD, report["config"])


def test_up_args_that_do_not_parse_are_refused():
    report = compare_json()
    report["config"]["extra_up_args"] = "--no-such-flag"
    with pytest.raises(ConfigError, match="do not parse"):
        sim_spec(Mode.STATIC_PD, report["config"])


def test_a_plan_that_differs_from_the_recorded_one_is_refused():
    report = compare_json()
    report["workloads"]["mixed"]["plan"][0]["at_s"] += 0.5
    with pytest.raises(ConfigError, match="plans differently"):
        compare_rows(report, profile(), traces_dir=None)


def test_the_cli_prints_the_side_by_side_table(tmp_path, capsys):
    path, prof = tmp_path / "compare.json", tmp_path / "profile.json"
    path.write_text(json.dumps(compare_json(("static-pd",))))
    profile().save(prof)
    out = tmp_path / "rows.json"
    assert main(["sim", "validate", str(path), "--profile", str(prof), "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| mixed | static-pd |" in printed and "TTFT p50 ms real / sim (err)" in printed
    assert [r["mode"] for r in json.loads(out.read_text())] == ["static-pd"]
    # which serving costs the replay used, each kind of worker's
    assert "PD workers: prefill x1.000 + 0.0 ms a step, decode x1.000" in printed
    assert "colocated workers: as the PD workers' (not fitted apart)" in printed
    assert "not fitted: the engine alone" in printed


@pytest.mark.parametrize("fresh", [False, True])
def test_a_modes_workloads_share_one_cluster_unless_fresh(fresh, monkeypatch):
    from services.sim import replay

    report = compare_json(("static-pd", "banaserve"))
    planned = plan(workload("hotspot"), DURATION_S, 3)
    report["config"]["fresh_cluster_per_workload"] = fresh
    report["workloads"]["hotspot"] = {"slo_ttft_ms": 3000.0, "slo_tpot_ms": 250.0}
    report["table"] += [real_row("hotspot", m) for m in ("static-pd", "banaserve")]
    built = []

    class Recorded(SimCluster):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            built.append(self)

    monkeypatch.setattr(replay, "SimCluster", Recorded)
    rows = compare_rows(report, profile(), traces_dir=None)
    assert len(built) == (4 if fresh else 2)
    assert [r["sim"]["num_requests"] for r in rows if r["workload"] == "hotspot"] == [
        len(planned)] * 2  # fmt: skip
    # The second workload on a shared cluster starts after the first one's last request.
    first = built[0].requests
    if not fresh:
        mixed_end = max(r.done_s for k, r in first.items() if "-mixed-" in k)
        assert min(r.at_s for k, r in first.items() if "-hotspot-" in k) >= mixed_end


def test_a_repeat_run_gives_each_cell_its_run_to_run_difference(tmp_path, capsys):
    report = compare_json(("static-pd", "banaserve"))
    other = json.loads(json.dumps(report))
    other["table"][0]["tpot_p50_ms"] = 95.0 * 1.2  # static-pd's TPOT p50 20 % higher
    other["table"][1]["makespan_s"] = 10.5  # banaserve's makespan 5 % longer
    rows = compare_rows(report, profile(), traces_dir=None)
    add_repeat(rows, other, report["config"])
    static, bana = rows
    assert static["repeat"]["tpot_p50_ms"] == pytest.approx(0.2)
    assert bana["repeat"]["makespan_s"] == pytest.approx(0.05)
    assert static["repeat"]["output_throughput"] == 0.0 and "num_migrations" not in bana["repeat"]
    table = summary(rows)
    assert "| static-pd | TPOT p50 ms |" in table and "run-to-run median |" in table
    line = next(x for x in table.splitlines() if x.startswith("| static-pd | TPOT p50 ms |"))
    assert line.endswith("| 0/1 | 20% |")  # the run-to-run cell, over the 10 % target
    line = next(x for x in table.splitlines() if x.startswith("| banaserve | makespan s |"))
    assert line.endswith("| 1/1 | 5% |")
    # A row the repeat run lacks has no difference; a run of another plan is refused.
    other["table"].pop()
    add_repeat(rows, other, report["config"])
    assert rows[1]["repeat"] is None
    other["config"]["seed"] = 4
    with pytest.raises(ConfigError, match="differs from the compared one in seed"):
        add_repeat(rows, other, report["config"])
    other["config"]["seed"] = 3
    # The same cluster spelt two ways is one: the planes recorded by one run, given as flags by
    # the other; another cluster is refused.
    report["config"]["up_data_planes"] = {"kv_transport": "tcp", "kvstore_transport": "tcp"}
    other["config"]["extra_up_args"] = "--kv-transport tcp --kvstore-transport tcp"
    add_repeat(rows, other, report["config"])
    other["config"]["extra_up_args"] = "--kv-transport tcp"  # the store's plane: UCX
    with pytest.raises(ConfigError, match="differs from the compared one in extra_up_args"):
        add_repeat(rows, other, report["config"])
    other["config"]["extra_up_args"] = ""
    del report["config"]["up_data_planes"]
    # The command line: --repeat adds the column and the summary.
    path, again, prof = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "profile.json"
    path.write_text(json.dumps(report))
    other["config"]["seed"] = 3
    again.write_text(json.dumps(other))
    profile().save(prof)
    assert main(["sim", "validate", str(path), "--profile", str(prof), "--repeat", str(again)]) == 0
    printed = capsys.readouterr().out
    assert "run-to-run 20% !" in printed and "| run-to-run within target |" in printed
