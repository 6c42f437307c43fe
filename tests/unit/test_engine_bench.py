"""Pure logic of ``banaserve bench engine``: arguments, plan, tok/s arithmetic, report.

No model, torch or vLLM needed: runs and timings are built by small factories.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import engine_bench, engine_interleave, engine_report, engine_runners
from bench.engine_workload import (
    Timing,
    Workload,
    build_plan,
    engine_limits,
    kv_bytes_per_token,
    plan_from_json,
    plan_to_json,
    summarise,
)
from services.common.errors import ConfigError, ModelNotFoundError

SMOLLM2_CONFIG = {
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_size": 576,
    "num_hidden_layers": 30,
}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    engine_bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def small_workload(**kw) -> Workload:
    return Workload(**({"prompt_len": 8, "decode_prompt_len": 4, "max_tokens": 5,
                        "batches": (1, 2), "repeats": 2, "warmup_tokens": 2} | kw))  # fmt: skip


def timings(rounds: dict[int, dict[str, float]]) -> list[Timing]:
    return [Timing(r, name, s) for r, calls in rounds.items() for name, s in calls.items()]


def ok_run(system: str, dtype: str, prefill_s: float, first_s: float, total_s: float) -> dict:
    """A runner result for ``small_workload(batches=(2,), repeats=1)``."""
    calls = {"prefill": prefill_s, "batch_prefill_b2": first_s, "batch_total_b2": total_s}
    return {
        "system": system,
        "dtype": dtype,
        "timings": [vars(t) for t in timings({0: calls, 1: calls})],
        "first_output": [5, 6, 7, 8],
    }


# ---- arguments ----------------------------------------------------------------------------


def test_defaults_match_the_issue():
    args = parse()
    assert args.systems == ["banaserve", "vllm", "transformers"]
    assert args.dtypes == ["bfloat16", "float32"]
    assert args.batches == [1, 16, 64]
    assert (args.prompt_len, args.decode_prompt_len, args.max_tokens) == (512, 32, 64)
    assert (args.repeats, args.threads, args.model) == (3, 1, "smollm2-135m")
    assert args.out.endswith("bench/results")


def test_csv_flags_are_parsed_and_deduplicated():
    args = parse(
        "--systems", "vllm, transformers,vllm", "--dtypes", "float32", "--batches", "4,1,4"
    )
    assert args.systems == ["vllm", "transformers"]
    assert args.dtypes == ["float32"]
    assert args.batches == [4, 1]


@pytest.mark.parametrize(
    "argv",
    [("--systems", "sglang"), ("--dtypes", "float16"), ("--batches", "0,4"), ("--batches", "a")],
)
def test_bad_csv_flags_exit_with_usage_error(argv):
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2


def test_workload_from_args_rejects_one_token_decode():
    args = parse("--max-tokens", "1")
    with pytest.raises(ConfigError, match="max_tokens must be at least 2"):
        engine_bench.workload_from_args(args)


def test_cli_wires_the_bench_engine_subcommand():
    from services.cli import build_parser

    args = build_parser().parse_args(["bench", "engine", "--systems", "vllm", "--repeats", "5"])
    assert (args.systems, args.repeats) == (["vllm"], 5)
    assert args.func.__name__ == "_run_bench_engine"


# ---- plan ---------------------------------------------------------------------------------


def test_plan_orders_calls_warmup_first_and_caps_warmup_tokens():
    plan = build_plan(small_workload(), vocab_size=50)
    assert [(c.round, c.name, c.max_tokens) for c in plan[:5]] == [
        (0, "prefill", 1),
        (0, "batch_prefill_b1", 1),
        (0, "batch_total_b1", 2),
        (0, "batch_prefill_b2", 1),
        (0, "batch_total_b2", 2),
    ]
    assert len(plan) == 3 * 5
    assert [c.max_tokens for c in plan if c.round == 2 and c.name.startswith("batch_total")] == [
        5,
        5,
    ]
    assert [len(c.prompts) for c in plan[:5]] == [1, 1, 1, 2, 2]
    assert [len(p) for p in plan[0].prompts + plan[3].prompts] == [8, 4, 4]


def test_plan_is_deterministic_fresh_per_call_and_avoids_special_tokens():
    first = build_plan(small_workload(), vocab_size=50, excluded={0, 1, 2})
    again = build_plan(small_workload(), vocab_size=50, excluded={0, 1, 2})
    other = build_plan(small_workload(seed=1), vocab_size=50, excluded={0, 1, 2})
    assert [c.prompts for c in first] == [c.prompts for c in again]
    assert [c.prompts for c in first] != [c.prompts for c in other]
    ids = {t for c in first for p in c.prompts for t in p}
    assert min(ids) >= 3 and max(ids) < 50
    assert first[1].prompts != first[2].prompts  # the max_tokens=1 call never primes the other


def test_plan_rejects_a_fully_excluded_vocab():
    with pytest.raises(ValueError, match="every token id"):
        build_plan(small_workload(), vocab_size=3, excluded={0, 1, 2})


def test_plan_round_trips_through_json():
    workload = small_workload(batches=(2,))
    plan = build_plan(workload, vocab_size=20)
    assert plan_from_json(plan_to_json(workload, plan)) == (workload, plan)


# ---- arithmetic ---------------------------------------------------------------------------


def test_summarise_uses_measured_rounds_only_and_takes_medians():
    workload = small_workload(batches=(2,), repeats=3)
    rounds = {
        0: {"prefill": 100.0, "batch_prefill_b2": 100.0, "batch_total_b2": 100.0},
        1: {"prefill": 0.5, "batch_prefill_b2": 0.25, "batch_total_b2": 1.25},
        2: {"prefill": 1.0, "batch_prefill_b2": 0.5, "batch_total_b2": 2.5},
        3: {"prefill": 2.0, "batch_prefill_b2": 0.5, "batch_total_b2": 4.5},
    }
    summary = summarise(workload, timings(rounds))
    # prefill: 8 tokens / t; decode: 2 * (5 - 1) tokens / (total - first)
    assert summary["prefill_8"] == {"median": 8.0, "samples": [16.0, 8.0, 4.0]}
    assert summary["decode_b2"] == {"median": 4.0, "samples": [8.0, 4.0, 2.0]}


def test_decode_round_with_no_positive_difference_is_dropped():
    workload = small_workload(batches=(1,), repeats=2)
    rounds = {
        1: {"prefill": 1.0, "batch_prefill_b1": 0.5, "batch_total_b1": 0.4},
        2: {"prefill": 1.0, "batch_prefill_b1": 0.5, "batch_total_b1": 1.5},
    }
    assert summarise(workload, timings(rounds))["decode_b1"] == {"median": 4.0, "samples": [4.0]}


def test_engine_limits_size_kv_for_the_largest_batch():
    workload = Workload()  # 64 x (32 + 64) tokens and one 512-token prompt
    assert kv_bytes_per_token(SMOLLM2_CONFIG, "bfloat16") == 2 * 30 * 3 * 64 * 2
    limits = engine_limits(workload, SMOLLM2_CONFIG, "float32")
    tokens = 64 * 128 + 640
    assert limits.kv_cache_bytes == tokens * (2 * 30 * 3 * 64 * 4) * 5 // 4
    assert (limits.max_model_len, limits.max_num_seqs, limits.max_num_batched_tokens) == (
        513,
        64,
        2048,
    )


def test_left_pad_pads_on_the_left_and_masks_padding():
    ids, mask = engine_runners.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids == [[5, 6, 7], [0, 0, 8]]
    assert mask == [[1, 1, 1], [0, 0, 1]]


def test_check_lengths_rejects_early_stops():
    call = build_plan(small_workload(batches=(2,)), vocab_size=20)[2]
    engine_runners.check_lengths(call, [[1, 2], [3, 4]])
    with pytest.raises(RuntimeError, match=r"generated lengths \[1, 2\], expected exactly 2"):
        engine_runners.check_lengths(call, [[1, 2], [3]])


def test_serve_calls_runs_the_requested_calls_and_answers_each():
    calls = build_plan(small_workload(batches=(2,)), vocab_size=20)
    asked: list[int] = []

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        asked.append(len(asked))
        return [[7] * max_tokens for _ in prompts]

    i = next(i for i, c in enumerate(calls) if c.round == 1 and c.max_tokens > 1)
    replies = io.StringIO()
    timings, first = engine_runners.serve_calls(generate, calls, io.StringIO(f"{i}\n0\n"), replies)
    assert [(t.round, t.name) for t in timings] == [(1, "batch_total_b2"), (0, "prefill")]
    assert [json.loads(line)["index"] for line in replies.getvalue().splitlines()] == [i, 0]
    assert first == [7] * calls[i].max_tokens


class FakeRunner:
    log: list[tuple[str, int]] = []

    def __init__(self, system, dtype, args, paths) -> None:
        self.system, self.alive = system, system != "broken"

    def reply(self, deadline: float) -> None:
        FakeRunner.log.append((self.system, -1))

    def run(self, index: int, deadline: float) -> None:
        FakeRunner.log.append((self.system, index))

    def finish(self, deadline: float) -> dict:
        return {"system": self.system}


def test_interleaved_runs_rotate_which_system_goes_first(monkeypatch):
    monkeypatch.setattr(engine_interleave, "Runner", FakeRunner)
    FakeRunner.log = []
    args = argparse.Namespace(systems=["a", "broken", "c"], timeout=10.0)
    runs = engine_interleave.run_interleaved("float32", 3, args, {})
    assert FakeRunner.log == [
        ("a", -1), ("c", -1),  # wait until both loaded; "broken" never started
        ("a", 0), ("c", 0),
        ("c", 1), ("a", 1),  # call 1 starts at the second system ("broken": skipped)
        ("c", 2), ("a", 2),
    ]  # fmt: skip
    assert list(runs) == ["a/float32", "broken/float32", "c/float32"]


# ---- processes ----------------------------------------------------------------------------


def test_find_vllm_python_prefers_explicit_then_current_then_bench_venv(tmp_path):
    venv_python = tmp_path / "python"
    assert engine_bench.find_vllm_python(str(venv_python), True, venv_python) == (
        None,
        f"--python-vllm {venv_python} does not exist",
    )
    assert engine_bench.find_vllm_python(None, False, venv_python) == (
        None,
        "vllm not installed: make bench-setup",
    )
    venv_python.touch()
    assert engine_bench.find_vllm_python(None, False, venv_python) == (str(venv_python), "")
    assert engine_bench.find_vllm_python(None, True, venv_python)[0] != str(venv_python)


def test_runner_env_fixes_threads_and_vllm_cpu_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("BANASERVE_HOME", str(tmp_path))
    base = {"PATH": "/bin", "LD_PRELOAD": "/x.so", "OMP_NUM_THREADS": "8"}
    env = engine_bench.runner_env("vllm", 2, base, preload=["/a.so", "/b.so"])
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm")
    assert env["LD_PRELOAD"] == "/a.so:/b.so:/x.so"
    plain = engine_bench.runner_env("transformers", 1, base)
    assert "VLLM_HOST_IP" not in plain and plain["LD_PRELOAD"] == "/x.so"
    assert engine_bench.vllm_cpu_bind(1) == "0"
    assert engine_bench.vllm_cpu_bind(1, first_cpu=1) == "1"
    assert engine_bench.vllm_cpu_bind(2, first_cpu=2) == "2-3"
    assert engine_bench.runner_env("vllm", 1, base, first_cpu=1)["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_resolve_model_accepts_a_directory_or_a_prepared_name(monkeypatch, tmp_path):
    monkeypatch.setenv("BANASERVE_HOME", str(tmp_path))
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert engine_bench.resolve_model(str(model)) == model.resolve()
    assert engine_bench.resolve_model("m") == model.resolve()
    with pytest.raises(ModelNotFoundError, match="banaserve models prepare smollm2-135m"):
        engine_bench.resolve_model("missing")


def test_special_token_ids_come_from_the_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"added_tokens": [{"id": 0}, {"id": 2}]}')
    assert engine_bench.special_token_ids(tmp_path) == {0, 2}
    assert engine_bench.special_token_ids(tmp_path / "nowhere") == set()


def test_preload_libs_lists_only_existing_libraries(tmp_path):
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "lib").mkdir()
    python = tmp_path / "venv" / "bin" / "python"
    assert engine_bench.preload_libs(str(python), tcmalloc=tmp_path / "none.so") == []
    (tmp_path / "venv" / "lib" / "libiomp5.so").touch()
    assert engine_bench.preload_libs(str(python), tcmalloc=tmp_path / "none.so") == [
        str(tmp_path / "venv" / "lib" / "libiomp5.so")
    ]


# ---- report -------------------------------------------------------------------------------


def report_for(runs: list[dict], systems: list[str], dtypes: list[str]) -> dict:
    workload = small_workload(batches=(2,), repeats=1)
    args = argparse.Namespace(systems=systems, dtypes=dtypes)
    machine = {"date": "2026-01-01 00:00 UTC", "cpu_model": "CPU", "cpus": 2, "threads": 1,
               "torch": "2.13.0", "transformers": "5.0", "loadavg_before": 1.0,
               "loadavg_after": 2.0}  # fmt: skip
    keyed = {engine_report.run_key(r["system"], r["dtype"]): r for r in runs}
    return engine_bench.build_report(workload, args, Path("/m/smollm2-135m"), keyed, machine)


def test_report_computes_ratios_targets_and_agreement():
    runs = [
        ok_run("banaserve", "float32", prefill_s=0.5, first_s=0.25, total_s=1.25),  # 16, 8 tok/s
        ok_run("vllm", "float32", prefill_s=0.25, first_s=0.25, total_s=2.25),  # 32, 4 tok/s
        {"system": "transformers", "dtype": "float32", "error": "boom"},
    ]
    runs[1]["first_output"] = [5, 6, 9, 9]
    runs[1]["versions"] = {"vllm": "0.32.0"}
    report = report_for(runs, ["banaserve", "vllm", "transformers"], ["float32"])
    assert report["runs"]["vllm/float32"]["metrics"]["decode_b2"]["median"] == 4.0
    assert report["ratios"]["banaserve/vllm"]["float32"] == {"prefill_8": 0.5, "decode_b2": 2.0}
    assert report["ratios"]["banaserve/transformers"]["float32"] == {
        "prefill_8": None,
        "decode_b2": None,
    }
    met = [(t["metric"], t["baseline"], t["met"]) for t in report["targets"]]
    assert met == [
        ("decode_b2", "vllm", True),
        ("prefill_8", "vllm", False),
        ("decode_b2", "transformers", None),
        ("prefill_8", "transformers", None),
    ]
    assert report["machine"]["vllm"] == "0.32.0"
    assert report["agreement"] == {}  # transformers failed: nothing to compare with


def test_targets_are_issue_9s_bar_decode_at_16_and_64_and_prefill_at_0_9():
    targets = engine_report.targets(small_workload(batches=(1, 16, 64)))
    assert [(t.metric, t.baseline, t.factor) for t in targets] == [
        ("decode_b16", "vllm", 1.0),
        ("decode_b64", "vllm", 1.0),
        ("prefill_8", "vllm", 0.9),
        ("decode_b16", "transformers", 3.0),
        ("prefill_8", "transformers", 3.0),
    ]


def test_markdown_table_shows_medians_ratios_and_na_reasons():
    runs = [
        ok_run("banaserve", "bfloat16", prefill_s=0.5, first_s=0.25, total_s=1.25),
        ok_run("transformers", "bfloat16", prefill_s=1.0, first_s=0.5, total_s=4.5),
        {"system": "vllm", "dtype": "bfloat16", "error": "ValueError: dtype | unsupported\nmore"},
    ]
    text = engine_report.render_markdown(
        report_for(runs, ["banaserve", "vllm", "transformers"], ["bfloat16"])
    )
    lines = text.splitlines()
    assert lines[0] == "# Engine benchmark: smollm2-135m"
    assert lines[4] == (
        "| metric | BanaServe bf16 | vLLM bf16 | transformers bf16 "
        "| BanaServe/vLLM bf16 | BanaServe/transformers bf16 |"
    )
    assert lines[6] == (
        "| prefill tok/s (8-token prompt) | 16.0 | n/a (ValueError: dtype / unsupported) "
        "| 8.0 | n/a | 2.00× |"
    )
    assert (
        lines[7]
        == "| decode tok/s, batch 2 | 8.0 | n/a (ValueError: dtype / unsupported) | 2.0 | n/a | 4.00× |"
    )
    assert "| decode tok/s, batch 2 ≥ 3× transformers | bfloat16 | 4.00× | yes |" in lines
    assert "Greedy tokens matching transformers on one sample decode: BanaServe bf16 4/4" in text
    assert "decode tok/s = B × 4 / (tT − t1)" in text


def test_markdown_without_banaserve_has_no_ratio_columns_or_targets():
    runs = [ok_run("vllm", "float32", prefill_s=0.5, first_s=0.25, total_s=1.25)]
    text = engine_report.render_markdown(report_for(runs, ["vllm"], ["float32"]))
    assert "| metric | vLLM fp32 |" in text
    assert "BanaServe/" not in text and "| target |" not in text


def test_short_reason_keeps_the_first_line_and_truncates():
    assert engine_report.short_reason("a\nb") == "a"
    long = engine_report.short_reason("x" * 100)
    assert len(long) == engine_report.MAX_REASON and long.endswith("…")


def test_cpu_time_gives_its_own_medians_and_counts_live_child_processes():
    workload = small_workload(batches=(2,), repeats=1)
    calls = [
        Timing(0, "prefill", 9.0, 9.0),
        Timing(1, "prefill", 4.0, 0.5),
        Timing(1, "batch_prefill_b2", 2.0, 1.0),
        Timing(1, "batch_total_b2", 6.0, 2.0),
    ]
    assert summarise(workload, calls, cpu=True) == {
        "prefill_8": {"median": 16.0, "samples": [16.0]},
        "decode_b2": {"median": 8.0, "samples": [8.0]},
    }
    assert summarise(workload, calls)["prefill_8"]["median"] == 2.0
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    before = engine_runners.tree_cpu_seconds()
    child = subprocess.Popen(
        [sys.executable, "-c", spin + "print(flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE
    )
    try:
        child.stdout.readline()  # the child has spun 0.3 s of CPU and is still alive
        assert engine_runners.tree_cpu_seconds() - before >= 0.29
    finally:
        child.kill()
        child.wait()


def test_settle_waits_for_a_busy_child_to_go_idle():
    """A child still computing after a call (vLLM's engine core does for ~0.5 s) holds the next
    system's call back until it is idle; with nothing running, settle returns at once."""
    import subprocess
    import sys

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", busy])
    try:
        time.sleep(0.05)
        waited = engine_runners.settle(limit_s=20.0)
        assert waited >= 0.25
        assert engine_runners.settle(limit_s=20.0) < 1.0  # the child sleeps now
    finally:
        child.kill()
        child.wait()
