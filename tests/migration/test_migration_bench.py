"""``banaserve bench migration``: its arithmetic (exact values on made-up streams and costs),
and a smoke run on tiny-llama with tiny sizes through the CLI (``integration``)."""

from __future__ import annotations

import json

import pytest

from bench.migration_cost import LayerCosts, costs_from_steps, profile_layers
from bench.migration_driver import not_reverted
from bench.migration_load import (
    Stream,
    decode_window,
    full_batch_window,
    max_gap,
    prefill_figures,
)
from services.cli import main


def costs(rest: float, head: float) -> LayerCosts:
    """30 layers of 1 ms; a step is rest + head + 30 ms."""
    return LayerCosts("decode", 30, 16, 10, rest + head + 30.0, 1.0, head)


def test_k_balances_the_donor_and_the_helper():
    # donor = rest + head + k, helper = 30 - k: even at k = (30 - rest - head) / 2
    assert costs(rest=2.0, head=8.0).balanced_k() == 10
    assert costs(rest=2.0, head=8.0).shares_ms(10) == (20.0, 20.0)
    assert costs(rest=0.0, head=0.0).balanced_k() == 15
    assert costs(rest=0.0, head=1.0).balanced_k() == 14  # 15|16 and 16|15 tie: the smaller k
    assert costs(rest=40.0, head=0.0).balanced_k() == 1  # the donor is slower whatever moves


def test_costs_split_each_step_and_take_each_parts_median():
    # step 1: layer 1 stretched by a busy machine (20 ms): that step's layers, not the rest
    steps, layers, head = [10.0, 30.0, 12.0], [[2.0, 2.0, 3.0], [2.0, 20.0, 3.0]], [1.0, 1.0, 2.0]
    c = costs_from_steps("decode", 8, steps, layers, head)
    # per step: layers 4, 22, 6 (median 6 -> 3 a layer); head median 1; rest 5, 7, 4 -> 5
    assert c == LayerCosts("decode", 2, 8, 3, 12.0, 3.0, 1.0)
    assert c.rest_ms == 5.0
    with pytest.raises(ValueError, match="exactly once"):
        costs_from_steps("decode", 8, steps, [[2.0, 2.0], [2.0, 2.0, 3.0]], head)


def test_decode_profile_of_a_batch_over_the_engine_default_of_64_sequences(tiny_llama):
    """``--decode-concurrency 128`` once failed here (KeyError 'layer0'): the engine ran at most
    64 sequences a step, so no step of the whole batch was ever timed."""
    costs = profile_layers(tiny_llama, "decode", 70, prompt_len=8, num_steps=2)
    assert costs.rows == 70 and costs.num_layers == 4 and costs.num_steps >= 1
    assert costs.layer_ms > 0 and costs.step_ms >= costs.num_layers * costs.layer_ms


def test_a_migrated_run_counts_only_if_its_migration_was_reverted():
    done = {"state": "DONE", "reached_active": True, "reason": ""}
    assert not_reverted(None) is None and not_reverted(done) is None
    lost = {"state": "ABORTED", "reached_active": True, "reason": "helper unreachable: reset"}
    assert not_reverted(lost) == {
        "failed": ["the migration ended ABORTED: helper unreachable: reset"]
    }
    early = lost | {"reached_active": False, "reason": "prepare on p failed"}
    assert not_reverted(early) == {
        "failed": ["the migration ended ABORTED before ACTIVE: prepare on p failed"]
    }


def stream(index: int, sent: float, chunks: list[tuple[float, int]], prompt: int = 8) -> Stream:
    return Stream(index, prompt, sent, chunks, ended_at=chunks[-1][0] if chunks else None)


def test_decode_window_counts_tokens_and_gaps_inside_it():
    a = stream(0, 0.0, [(1.0, 1), (1.1, 1), (1.2, 1), (1.4, 2), (1.5, 1)])
    b = stream(1, 0.0, [(1.0, 1), (1.25, 1), (1.35, 1)])
    assert full_batch_window([a, b], 1.05) == (1.05, 1.35)
    got = decode_window([a, b], 1.1, 1.4)
    # tokens after 1.1 up to 1.4: a 1.2 (1), 1.4 (2); b 1.25, 1.35 -> 5 in 0.3 s
    assert (got["num_tokens"], got["window_s"]) == (5, pytest.approx(0.3))
    assert got["tokens_per_s"] == pytest.approx(5 / 0.3)
    # gaps with both ends in [1.1, 1.4]: a 0.1, then 0.2 / 2 twice; b 0.1 (1.25 -> 1.35)
    assert got["tpot_p50_ms"] == pytest.approx(100.0)
    assert got["tpot_mean_ms"] == pytest.approx(100.0)
    assert got["max_wait_ms"] == pytest.approx(200.0)  # a: 1.2 -> 1.4, two tokens in one delta


def test_max_gap_is_the_longest_wait_overlapping_the_window():
    a = stream(0, 0.0, [(1.0, 1), (1.1, 1), (1.6, 1), (1.7, 1)])
    b = stream(1, 0.0, [(1.0, 1), (1.3, 1), (2.5, 1)])
    assert max_gap([a, b], 1.05, 1.2) == pytest.approx(0.5)  # a's 1.1 -> 1.6
    assert max_gap([a, b], 1.65, 2.0) == pytest.approx(1.2)  # b's 1.3 -> 2.5
    assert max_gap([a, b], 3.0, 4.0) is None


def test_prefill_figures():
    streams = [stream(0, 0.0, [(0.5, 1)], prompt=100), stream(1, 0.1, [(1.1, 1)], prompt=300)]
    got = prefill_figures(streams)
    assert got["num_prompt_tokens"] == 400
    assert got["prompt_tokens_per_s"] == pytest.approx(400 / 1.1)
    assert (got["ttft_p50_ms"], got["window_s"]) == (pytest.approx(750.0), pytest.approx(1.1))


@pytest.mark.integration
@pytest.mark.cluster  # ~35 s of real clusters migrating: make test-cluster
@pytest.mark.timeout(600)
def test_tiny_run_writes_the_report(banaserve_home, tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BANASERVE_HOME", str(banaserve_home))
    argv = [
        "bench", "migration", "--model", "tiny-llama", "--rounds", "1", "--k", "2",
        "--prefill-k", "2", "--decode-concurrency", "2", "--decode-input-len", "8",
        "--decode-output-len", "1024", "--prefill-requests", "2", "--prefill-input-len", "48",
        "--prefill-output-len", "2", "--num-kv-blocks", "256", "--out", str(tmp_path),
        "--label", "smoke",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "migration-smoke.json").read_text())
    markdown = (tmp_path / "migration-smoke.md").read_text()
    assert markdown.rstrip("\n") == capsys.readouterr().out.rstrip("\n")
    assert "## (a) Decode-heavy" in markdown and "## Migration time vs bytes moved" in markdown
    decode = report["decode"]["runs"]
    assert [(r["round"], r["variant"]) for r in decode] == [(0, "baseline"), (0, "migrated")]
    assert all(r["tokens_per_s"] > 0 and "failed" not in r for r in decode)
    moved = decode[1]["migration"]
    assert (moved["layers"], moved["reached_active"], moved["state"]) == ([2, 4], True, "DONE")
    assert moved["num_sequences"] == 2 and moved["num_kv_bytes_before_active"] > 0
    assert moved["requests_max_gap_s"] > 0
    idle = report["t_sync"]
    assert (idle["reached_active"], idle["state"], idle["num_kv_bytes_before_active"]) == (
        True, "DONE", 0,
    )  # fmt: skip
    assert len(idle["to_active_samples_s"]) == 3 and idle["id"] in ("m-1", "m-2", "m-3")
    assert moved["id"] == "m-4"  # after the three idle ones
    prefill = report["prefill"]["runs"]
    assert [r["variant"] for r in prefill] == ["baseline", "migrated"]
    assert prefill[0]["num_prompt_tokens"] == 96 and prefill[0]["prompt_tokens_per_s"] > 0
    if prefill[1].get("unavailable"):  # a prefill worker that cannot donate says why
        assert "prefill" in prefill[1]["unavailable"]
        assert "not available: the migration ended before ACTIVE" in markdown
    else:
        assert prefill[1]["migration"]["state"] == "DONE" and prefill[1]["num_prompt_tokens"] == 96
    assert report["bandwidth"]["bytes_per_s"] > 0
    assert report["costs"]["decode"]["k"] == 2 and report["costs"]["decode"]["k_given"]
