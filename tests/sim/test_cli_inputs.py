"""The ``sim`` commands on bad input: a usage error or ``banaserve: error: ...`` naming the file
or flag and what is wrong, exit status 2, before any work — never a traceback."""

from __future__ import annotations

import json
import re

import pytest

from services.common.errors import ConfigError
from services.sim import calibrate
from services.sim.profile import Profile
from tests.sim.factories import make_profile
from tests.sim.test_validate import compare_json
from tests.unit.test_cli_errors import run_cli


@pytest.fixture
def files(tmp_path):
    compare = tmp_path / "compare.json"
    compare.write_text(json.dumps(compare_json()))
    (tmp_path / "not.json").write_text("{ not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "serve", "rows": []}))
    bad_mode = compare_json()
    bad_mode["table"][0]["mode"] = "turbo"
    (tmp_path / "bad-mode.json").write_text(json.dumps(bad_mode))
    no_seed = compare_json()
    del no_seed["config"]["seed"]
    (tmp_path / "no-seed.json").write_text(json.dumps(no_seed))
    (tmp_path / "not-profile.json").write_text(json.dumps({"model": "x", "prefill": {}}))
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sim", "validate", "{d}/missing.json"], "missing.json: no such file"),
        (["sim", "serving", "{d}/missing.json"], "missing.json: no such file"),
        (["sim", "validate", "{d}/not.json"], "not.json is not JSON"),
        (["sim", "validate", "{d}/list.json"], "a JSON object expected, got list"),
        (["sim", "serving", "{d}/other.json"], "is not a `bench compare` result"),
        (["sim", "validate", "{d}/bad-mode.json"], "table row 0 has mode 'turbo'"),
        (["sim", "validate", "{d}/no-seed.json"], "config.seed missing"),
        (["sim", "validate", "{d}/compare.json", "--repeat", "{d}/not.json"], "is not JSON"),
        (
            ["sim", "validate", "{d}/compare.json", "--profile", "{d}/not-profile.json"],
            "is not a simulator profile",
        ),  # fmt: skip
        (["sim", "run", "--profile", "{d}/missing.json"], "simulator profile"),
    ],
)
def test_a_bad_input_document_is_a_clear_error(files, capsys, argv, message):
    code, err = run_cli([a.format(d=files) for a in argv], capsys)
    assert code == 2
    assert err.startswith("banaserve: error: ") and message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], "expected positive numbers"),
        (["--workers", "1"], "at least 2 workers"),
        (["--workers", "8,x"], "expected positive numbers"),
        (["--workers", "2,,8"], "expected positive numbers"),  # an empty item: was dropped
        (["--workers", "8,"], "expected positive numbers"),
        (["--workloads", "mixed,nope"], "unknown: 'nope'"),
        (["--splits", "0.5,2"], "shares in (0, 1)"),
        (["--load", "-1"], "expected a positive number"),
        (["--load", "nan"], "expected a positive number"),
        (["--duration", "0"], "expected a positive number"),
        (["--drain-s", "-5"], "expected a number >= 0"),
        (["--local-prefill-queue-tokens", "-1"], "expected a number >= 0"),
    ],
)
def test_sim_run_refuses_bad_flags_before_any_work(capsys, argv, message):
    code, err = run_cli(["sim", "run", *argv], capsys)
    assert code == 2 and message in err


def test_calibrate_reads_its_migration_json_before_measuring_anything(files, capsys, monkeypatch):
    def measured(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("measured before the inputs were read")

    monkeypatch.setattr(calibrate, "measure_transports", measured)
    monkeypatch.setattr(calibrate, "calibrate_model", measured)
    code, err = run_cli(["sim", "calibrate", "--migration-json", f"{files}/not.json"], capsys)
    assert code == 2 and "migration JSON" in err and "is not JSON" in err
    code, err = run_cli(["sim", "calibrate", "--decode-points", "8x"], capsys)
    assert code == 2 and "BATCHxPROMPT" in err
    # Too few points for a three-term fit: said before measuring (it failed after, a traceback).
    code, err = run_cli(["sim", "calibrate", "--decode-points", "1x16,2x16,1x16"], capsys)
    assert code == 2 and "3 distinct points" in err
    code, err = run_cli(["sim", "calibrate", "--prefill-lengths", "16,32"], capsys)
    assert code == 2 and "3 distinct lengths" in err
    code, err = run_cli(["sim", "calibrate", "--transports", "tcp,carrier-pigeon"], capsys)
    assert code == 2 and "unknown: 'carrier-pigeon'" in err


def test_validate_refuses_a_repeat_of_another_plan_before_replaying(files, capsys, monkeypatch):
    from services.sim import validate

    other = compare_json()
    other["config"]["seed"] = 4
    (files / "other-seed.json").write_text(json.dumps(other))
    monkeypatch.setattr(validate, "compare_rows", lambda *a: pytest.fail("replayed first"))
    argv = ["sim", "validate", f"{files}/compare.json", "--repeat", f"{files}/other-seed.json"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "the repeat run differs from the compared one in seed" in err


# -- values inside the documents and sizes past what the machine holds (session 22 probe) ----


@pytest.fixture
def no_work(monkeypatch):
    """Planning a workload or simulating fails the test: the refusal must come first."""

    def worked(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("planned or simulated before refusing")

    from services.sim import inputs, scale, serving, validate

    for module, name in ((inputs, "plan"), (scale, "plan"), (validate, "plan"),
                         (scale, "simulate"), (validate, "compare_rows"),
                         (serving, "compare_rows")):  # fmt: skip
        monkeypatch.setattr(module, name, worked, raising=False)


def profile_json(path: str, value) -> dict:  # noqa: ANN001
    data = make_profile().to_json()
    *parents, key = path.split(".")
    node = data
    for k in parents:
        node = node[k]
    node[key] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("prefill.a", float("nan"), "prefill.a must be >= 0 (a finite number), got nan"),
        ("prefill.b", float("inf"), "prefill.b must be >= 0"),
        ("prefill.c", 10**400, "prefill.c must be >= 0"),  # past a float: OverflowError
        ("decode.c", -1e-6, "decode.c must be >= 0"),
        ("decode.b", "0.01", "decode.b must be >= 0"),
        ("transports.tcp.latency_s", float("inf"), "latency_s must be >= 0"),
        ("transports.tcp.bandwidth_bytes_per_s", float("inf"), "bandwidth_bytes_per_s must be > 0"),
        ("migration.copy_s", float("nan"), "migration.copy_s must be >= 0"),
        ("migration.hop_s", -1.0, "migration.hop_s must be >= 0"),
        ("migration.switch_pause_s", "x", "migration.switch_pause_s must be >= 0"),
        ("num_kv_blocks", 0.5, "num_kv_blocks must be an integer >= 1, got 0.5"),
        ("block_size", "16", "block_size must be an integer >= 1"),
        ("max_num_seqs", 0, "max_num_seqs must be an integer >= 1"),
        ("max_num_batched_tokens", -1, "max_num_batched_tokens must be an integer >= 1"),
        ("kv_bytes_per_block_layer", 0, "kv_bytes_per_block_layer must be an integer >= 1"),
        ("num_layers", 2.5, "num_layers must be an integer >= 2"),
        ("layer_share", "0.03", "layer_share must be > 0"),
        ("model", 5, "model must be a name"),
        # a part of the wrong shape, named (before: "TypeError: 'NoneType' object is not
        # iterable", "AttributeError: 'list' object has no attribute 'items'", a bandwidth or
        # a serving scale without its transport or worker kind)
        ("prefill", None, "prefill must be an object of its fields, got None"),
        ("serving", None, "serving must be an object of its fields, got None"),
        ("serving", [1, 2], "serving must be an object of its fields, got [1, 2]"),
        ("transports", [1], "transports must be an object by name, got [1]"),
        ("transports.tcp", 5, "transports.tcp must be an object of its fields, got 5"),
        ("transports.tcp.bandwidth_bytes_per_s", 0, "transports.tcp.bandwidth_bytes_per_s must"),
        ("serving.mixed", {"prefill_scale": "x"}, "serving.mixed.prefill_scale must be > 0"),
        ("migration.bogus", 1, "migration: MigrationModel.__init__() got an unexpected keyword"),
        ("decode.batch_s", "abc", "decode.batch_s must be a list of [batch, seconds], got 'abc'"),
        ("decode.batch_s", [[1, 2, 3]], "decode.batch_s must be a list of [batch, seconds]"),
        ("decode.batch_s", [[1, "x"]], "decode.batch_s[1] must be >= 0 (a finite number)"),
        # steps that take no time: a report of every mode alike (session 45)
        ("prefill", {"a": 0, "b": 0, "c": 0}, "prefill: a step must take time (a + b + c > 0)"),
        ("decode", {"a": 0, "b": 0, "c": 0}, "decode: a step must take time"),
        ("decode", {"a": 1, "b": 1, "c": 0, "batch_s": [[1, 0], [2, 0.01]]}, "decode: a step"),
    ],
)
def test_a_profile_with_a_bad_value_is_refused_when_loaded(tmp_path, path, value, message):
    # Each of these ran: NaN and infinite times to a report of n/a, negative ones to a
    # traceback ("event ... is in the past"), a float block count to a TypeError.
    f = tmp_path / "p.json"
    f.write_text(json.dumps(profile_json(path, value)))
    with pytest.raises(ConfigError, match=re.escape(message)):
        Profile.load(f)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("prefill", {"a": 0, "b": 0, "c": 1e-9}),  # attention alone
        ("decode", {"a": 0, "b": 0, "c": 1e-9}),  # context alone
        ("decode", {"a": 0, "b": 0, "c": 0, "batch_s": [[1, 0.02], [4, 0.03]]}),
    ],
)
def test_a_profile_whose_steps_take_time_by_one_term_alone_loads(tmp_path, path, value):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(profile_json(path, value)))
    assert Profile.load(f) is not None


def test_sim_run_refuses_a_bad_profile_value_before_simulating(tmp_path, capsys, no_work):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(profile_json("decode.a", -0.05)))
    code, err = run_cli(["sim", "run", "--profile", str(f), "--out", str(tmp_path)], capsys)
    assert code == 2 and f"simulator profile {f}: decode.a must be >= 0" in err


def test_sim_run_refuses_a_model_its_profile_is_not_of(tmp_path, capsys, no_work):
    # Session 40's probe: --model tiny-llama with smollm2's profile simulated smollm2, silently.
    f = tmp_path / "p.json"
    f.write_text(json.dumps(make_profile().to_json()))  # model "test"
    argv = ["sim", "run", "--profile", str(f), "--model", "tiny-llama", "--out", str(tmp_path)]
    code, err = run_cli(argv, capsys)
    assert code == 2 and f"--model tiny-llama, but {f} is test's profile" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "1000000000"], "at most 4096 workers"),
        (["--workers", "4096"], "the simulator holds at most 4,194,304"),
        (["--workers", "8", "--duration", "1e9"], "the simulator plans at most 50,000"),
        (["--workers", "8", "--load", "1e6", "--duration", "10"], "plans at most 50,000"),
        (["--workers", "8", "--duration", "1e300"], "plans at most 50,000"),
        (["--workers", "8", "--out", ""], "argument --out: expected a path, got ''"),
        (["--workers", "8", "--out", "{d}/a-file"], "a-file is a file, not a directory"),
        (["--workers", "8", "--out", "{d}/a-file/sub"], "cannot create the directory"),
    ],
)
def test_sim_run_refuses_what_would_fill_the_memory_or_fail_late(tmp_path, capsys, no_work, argv,
                                                                  message):  # fmt: skip
    # Each of these filled 4 GiB in under a minute, or ended in a traceback after the first point.
    (tmp_path / "a-file").write_text("")
    argv = [a.format(d=tmp_path) for a in argv]
    code, err = run_cli(["sim", "run", "--out", str(tmp_path / "out"), *argv], capsys)
    assert code == 2 and message in err


def test_a_cluster_past_the_simulators_block_bound_is_refused():
    from services.sim.cluster import MAX_CLUSTER_BLOCKS, check_cluster_size

    check_cluster_size(2, MAX_CLUSTER_BLOCKS // 2)
    with pytest.raises(ConfigError, match="2 workers of 2,097,153 KV blocks each are 4,194,306"):
        check_cluster_size(2, MAX_CLUSTER_BLOCKS // 2 + 1)


def test_sim_run_names_a_trace_it_cannot_read(tmp_path, capsys):
    (tmp_path / "mooncake_conversation.jsonl").mkdir()  # a directory where the trace should be
    argv = ["sim", "run", "--workers", "2", "--workloads", "mooncake", "--duration", "2",
            "--traces-dir", str(tmp_path), "--out", str(tmp_path / "out")]  # fmt: skip
    code, err = run_cli(argv, capsys)
    assert code == 2 and "mooncake: cannot read its trace" in err and "Is a directory" in err


def _set(report: dict, path: str, value) -> None:  # noqa: ANN001
    *parents, key = path.split(".")
    node = report
    for k in parents:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[key] = value


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("config.duration_s", float("nan"), "config.duration_s missing or not a number > 0"),
        ("config.duration_s", 0, "config.duration_s missing or not a number > 0"),
        ("config.duration_s", 1e9, "the simulator plans at most 50,000"),
        ("config.rate_scale", "2", "config.rate_scale missing or not a number > 0"),
        ("config.rate_scale", 1e6, "the simulator plans at most 50,000"),
        ("config.drain_s", "x", "config.drain_s missing or not a number >= 0"),
        ("config.drain_s", -1, "config.drain_s missing or not a number >= 0"),
        ("config.settle_s", float("inf"), "config.settle_s missing or not a number >= 0"),
        ("config.max_model_len", 1.5, "config.max_model_len is 1.5, not a positive integer"),
        ("config.vocab_range", [30000, 1000], "config.vocab_range is [30000, 1000]"),
        ("config.vocab_range", [0, 10**12], "below 2^31"),
        ("config.extra_up_args", 5, "config.extra_up_args is 5, not a str"),
        ("config.extra_up_args", "--x 'a", "extra_up_args do not split: No closing quotation"),
        ("config.up_data_planes", "tcp", "config.up_data_planes is 'tcp'"),
        ("config.mode_clusters", [], "config.mode_clusters is [], not each mode's cluster"),
        (
            "config.mode_clusters.banaserve.service_args",
            {"router": "--x"},
            "config.mode_clusters.banaserve.service_args is {'router': '--x'}, not flags by",
        ),
        ("config.mode_clusters.banaserve.service_args", [], "service_args is [], not flags by"),
        ("workloads", [1], "its workloads are not an object by name"),
        ("workloads.mixed", "x", "workload 'mixed' is not an object"),
        ("workloads.mixed.slo_tpot_ms", None, "workload 'mixed': slo_tpot_ms is None"),
        ("workloads.mixed.plan", [{}], "workload 'mixed': its plan is not a list of requests"),
        ("table.0.output_throughput", float("nan"), "table row 0: output_throughput is nan"),
        ("table.0.output_throughput", -5.0, "table row 0: output_throughput is -5.0"),
        ("table.1.ttft_p50_ms", "x", "table row 1: ttft_p50_ms is 'x', not a finite number"),
        ("table.0.num_migrations", 1.5, "num_migrations is 1.5, not an integer >= 0"),
        ("runs", "x", "its runs are not a list of runs with their requests"),
        ("runs", [{"mode": "colocated", "requests": [{"sent_at_s": "x"}]}], "a request is not"),
    ],
)
def test_a_compare_value_of_the_wrong_type_or_range_is_refused_before_replaying(
    tmp_path, capsys, no_work, path, value, message
):
    # Before: a traceback (TypeError, KeyError, AttributeError, struct.error), memory filled
    # planning ~10^9 requests, or a report with "nan% !" and "-5 / 14.8 (396% !)".
    report = compare_json()
    _set(report, path, value)
    f = tmp_path / "c.json"
    f.write_text(json.dumps(report))
    for command in ("validate", "serving"):
        code, err = run_cli(["sim", command, str(f)], capsys)
        assert code == 2 and err.startswith("banaserve: error: ") and message in err, err


def test_output_paths_are_checked_before_the_replay(files, capsys, no_work):
    compare = str(files / "compare.json")
    profile = files / "p.json"
    profile.write_text(json.dumps(make_profile().to_json()))
    code, err = run_cli(["sim", "validate", compare, "--json-out", str(files)], capsys)
    assert code == 2 and f"--json-out {files} is a directory, not a file" in err
    code, err = run_cli(["sim", "validate", compare, "--json-out", f"{files}/not.json/x"], capsys)
    assert code == 2 and f"its directory {files}/not.json is a file, not a directory" in err
    argv = ["sim", "serving", compare, "--profile", str(profile), "--out", str(files)]
    code, err = run_cli(argv, capsys)
    assert code == 2 and f"--out {files} is a directory, not a file" in err
    code, err = run_cli(["sim", "serving", compare, "--iterations", "0"], capsys)
    assert code == 2 and "argument --iterations: expected a positive number" in err


def test_calibrate_refuses_bad_sizes_models_outputs_and_migration_times(tmp_path, capsys,
                                                                        monkeypatch):  # fmt: skip
    def measured(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("measured before the inputs were checked")

    from services.engine.models import prepare

    monkeypatch.setattr(calibrate, "measure_transports", measured)
    monkeypatch.setattr(calibrate, "calibrate_model", measured)
    cases = [
        # a 10^9-token prompt was built in memory; a batch past max_num_seqs was timed as if whole
        (["--prefill-lengths", "16,64,1000000000"], "lengths of at most 2048 tokens"),
        (["--decode-points", "1x32,4x32,100000x32"], "batches of at most 64"),
        (["--models", ","], "expected a comma list of models"),
        (["--models", "smollm2-135m,gpt-9"], "'gpt-9' is neither a model directory"),
    ]
    for argv, message in cases:
        code, err = run_cli(["sim", "calibrate", *argv], capsys)
        assert code == 2 and message in err, err
    record = {"benchmark": "migration", "runs": [{"switch_pause_s": -5, "layers": [0, 4]}]}
    (tmp_path / "m.json").write_text(json.dumps(record))
    code, err = run_cli(["sim", "calibrate", "--migration-json", f"{tmp_path}/m.json"], capsys)
    assert code == 2 and f"migration JSON {tmp_path}/m.json: migration.switch_pause_s" in err
    monkeypatch.setattr(prepare, "resolve_model", lambda name: tmp_path)
    (tmp_path / "a-file").write_text("")
    code, err = run_cli(["sim", "calibrate", "--out", f"{tmp_path}/a-file"], capsys)
    assert code == 2 and f"--out {tmp_path}/a-file is a file, not a directory" in err


def test_sim_run_checks_each_report_file_before_simulating(tmp_path, capsys, no_work):
    """A directory where a report file goes (``sim-scale.json``, a plot): refused before the
    first run. Before, a traceback (IsADirectoryError) after the first point's simulations."""
    names = ("sim-scale.md", "sim-scale.json", "sim-scale-output_throughput.png",
             "sim-scale-goodput.png", "sim-scale-utilisation.png")  # fmt: skip
    for name in names:
        out = tmp_path / name.replace(".", "-")
        (out / name).mkdir(parents=True)
        argv = ["sim", "run", "--workers", "2", "--workloads", "mixed", "--out", str(out)]
        code, err = run_cli(argv, capsys)
        assert code == 2 and f"--out {out / name} is a directory, not a file" in err, err


def test_calibrate_checks_each_profile_path_before_measuring(tmp_path, capsys, monkeypatch):
    def measured(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("measured before the output paths were checked")

    from services.engine.models import prepare

    monkeypatch.setattr(calibrate, "measure_transports", measured)
    monkeypatch.setattr(calibrate, "calibrate_model", measured)
    monkeypatch.setattr(prepare, "resolve_model", lambda name: tmp_path)
    taken = calibrate.profile_path(tmp_path, "tiny-llama")
    taken.mkdir()  # the second model's profile: after the first's 1-2 min, a traceback
    argv = ["sim", "calibrate", "--models", "smollm2-135m,tiny-llama", "--out", str(tmp_path)]
    code, err = run_cli(argv, capsys)
    assert code == 2 and f"--out {taken} is a directory, not a file" in err, err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "start 0 is past the trace's 0"),  # empty
        ("\n  \n", "start 0 is past the trace's 0"),  # blank lines only
        ('{"timestamp": 0, "input_length": 100, "output', "trace line 1: JSONDecodeError"),
        (
            '{"timestamp": 0, "input_length": 0, "output_length": 5, "hash_ids": []}',
            "trace line 1: input_length must be positive",
        ),  # fmt: skip
        (
            '{"timestamp": 9, "input_length": 9, "output_length": 5, "hash_ids": [1]}\n'
            '{"timestamp": 0, "input_length": 9, "output_length": 5, "hash_ids": [2]}',
            "trace request 2 arrives before 1",
        ),  # fmt: skip
        (  # numbers no int holds: an OverflowError traceback before (probe, session 44)
            '{"timestamp": Infinity, "input_length": 100, "output_length": 5, "hash_ids": [1]}',
            "trace line 1: OverflowError",
        ),
        (
            '{"timestamp": 0, "input_length": 1e400, "output_length": 5, "hash_ids": [1]}',
            "trace line 1: OverflowError",
        ),
    ],
)
def test_sim_run_names_the_trace_whose_content_it_refuses(tmp_path, capsys, content, message):
    # Before: "banaserve: error: trace line 1: ..." with no word of which file, or workload.
    trace = tmp_path / "mooncake_conversation.jsonl"
    trace.write_text(content)
    argv = ["sim", "run", "--workers", "2", "--workloads", "mooncake", "--duration", "2",
            "--traces-dir", str(tmp_path), "--out", str(tmp_path / "out")]  # fmt: skip
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith(f"banaserve: error: mooncake: trace {trace}: {message}")
