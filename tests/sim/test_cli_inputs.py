"""The ``sim`` commands on bad input: a usage error or ``banaserve: error: ...`` naming the file
or flag and what is wrong, exit status 2, before any work — never a traceback."""

from __future__ import annotations

import json

import pytest

from services.sim import calibrate
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
