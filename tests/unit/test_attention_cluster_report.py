"""bench/attention_cluster.py's table: medians per variant, the ratio, and the token check
across rounds (any round whose migrated outputs differ from its baseline's shows False)."""

from __future__ import annotations

import argparse

import pytest

from bench.attention_cluster import table, variants


def run(variant: str, tok_s: float, r: int, equal: bool | None = None) -> dict:
    out = {"variant": variant, "round": r, "decode_tokens_per_s": tok_s, "tpot_p50_ms": 10.0}
    return out if equal is None else out | {"tokens_equal_baseline": equal}


def test_the_table_has_medians_the_ratio_and_the_token_check_of_every_round():
    runs = [
        run("baseline", 20.0, 0), run("migrated", 40.0, 0, True),
        run("migrated", 30.0, 1, True), run("baseline", 20.0, 1),
    ]  # fmt: skip
    text = table(runs)
    assert "migrated  decode tok/s 35.0" in text
    assert "tokens equal the baseline's True" in text
    assert text.endswith("throughput ratio 1.75x")
    runs[2]["tokens_equal_baseline"] = False
    assert "tokens equal the baseline's False" in table(runs)


def test_variants_are_named_from_the_two():
    assert variants("baseline") == ("baseline",)
    assert variants("migrated,baseline") == ("migrated", "baseline")
    for bad in ("", "auto", "baseline,other"):
        with pytest.raises(argparse.ArgumentTypeError, match="variants are baseline, migrated"):
            variants(bad)
