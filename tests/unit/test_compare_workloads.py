"""``bench compare``'s workloads: seeded plans with exact counts and lengths, phases, the hot
prefix, and the Mooncake trace's parsing and scaling. Pure: no server, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench.workloads import FAMILIES, plan, workload
from bench.workloads_synthetic import (
    Lengths,
    Phase,
    PrefixPool,
    RequestClass,
    SyntheticWorkload,
    plan_synthetic,
)
from bench.workloads_trace import (
    TraceRequest,
    TraceWorkload,
    parse_trace,
    plan_trace,
)

# (count, first four prompt lengths, first four output lengths, total prompt and output
# tokens) of each workload over 30 s at seed 7.
EXPECTED_SEED_7 = {
    "long-context": (15, [1089, 949, 1200, 1127], [34, 30, 29, 38], 16135, 481),
    "bursty": (32, [503, 261, 89, 113], [65, 61, 147, 36], 9252, 1990),
    "mixed": (30, [414, 74, 61, 417], [17, 105, 119, 15], 8092, 2191),
    "phase-shift": (22, [906, 630, 880, 697], [8, 6, 8, 7], 6611, 1797),
    "hotspot": (38, [440, 446, 449, 445], [36, 30, 37, 31], 17032, 1225),
    "mooncake": (29, [212, 229, 227, 72], [16, 15, 25, 10], 11787, 348),
}


def trace_line(ts: int, num_in: int, num_out: int, hashes: list[int]) -> str:
    row = {"timestamp": ts, "input_length": num_in, "output_length": num_out, "hash_ids": hashes}
    return json.dumps(row)


@pytest.mark.parametrize("name", FAMILIES)
def test_plans_are_exact_for_a_seed(name):
    planned = plan(workload(name), 30.0, seed=7)
    count, first_in, first_out, total_in, total_out = EXPECTED_SEED_7[name]
    assert len(planned) == count
    assert [len(p.request.prompt) for p in planned[:4]] == first_in
    assert [p.request.max_tokens for p in planned[:4]] == first_out
    assert sum(len(p.request.prompt) for p in planned) == total_in
    assert sum(p.request.max_tokens for p in planned) == total_out
    assert [p.request.index for p in planned] == list(range(count))
    assert [p.at_s for p in planned] == sorted(p.at_s for p in planned)
    assert all(0 <= p.at_s < 30.0 for p in planned)
    assert plan(workload(name), 30.0, seed=7) == planned  # pure
    assert plan(workload(name), 30.0, seed=8) != planned


def test_the_catalog_is_the_six_families():
    assert FAMILIES == ("long-context", "bursty", "mixed", "phase-shift", "hotspot", "mooncake")
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        workload("nope")


def test_phase_shift_goes_prefill_then_decode_then_prefill():
    planned = plan(workload("phase-shift"), 30.0, seed=7)
    assert Counter(p.tag for p in planned) == {
        "prefill-1/prefill-heavy": 4, "decode/decode-heavy": 14, "prefill-2/prefill-heavy": 4,
    }  # fmt: skip
    for p in planned:
        phase = p.tag.split("/")[0]
        low, high = {"prefill-1": (0, 10), "decode": (10, 20), "prefill-2": (20, 30)}[phase]
        assert low <= p.at_s < high
        if phase == "decode":
            assert len(p.request.prompt) in range(26, 39) and p.request.max_tokens in range(
                102, 155
            )
        else:
            assert len(p.request.prompt) in range(614, 923) and p.request.max_tokens in range(6, 11)
    # each phase's first arrival is at its start
    assert [p.at_s for p in planned if p.at_s in (0.0, 10.0, 20.0)] == [0.0, 10.0, 20.0]


def test_hotspot_requests_share_exactly_their_prefix():
    planned = plan(workload("hotspot"), 30.0, seed=7)
    assert Counter(p.request.prefix_id for p in planned) == {0: 31, 3: 3, 5: 2, 1: 1, 2: 1}
    by_prefix: dict[int, list[list[int]]] = {}
    for p in planned:
        by_prefix.setdefault(p.request.prefix_id, []).append(p.request.prompt)
    heads = {pid: prompts[0][:384] for pid, prompts in by_prefix.items()}
    assert all(prompt[:384] == heads[pid] for pid, ps in by_prefix.items() for prompt in ps)
    assert len({tuple(h) for h in heads.values()}) == len(heads)  # distinct prefixes
    suffixes = [tuple(p.request.prompt[384:]) for p in planned]
    assert len(set(suffixes)) == len(suffixes)


def test_rate_scale_multiplies_arrivals():
    assert len(plan(workload("mixed", rate_scale=2.0), 30.0, seed=7)) == 56
    assert len(plan(workload("mooncake", rate_scale=2.0), 30.0, seed=7)) == 46
    with pytest.raises(ValueError, match="rate_scale must be positive"):
        workload("mixed", rate_scale=0)


def test_lengths_clip_to_the_model_and_the_vocabulary():
    planned = plan(workload("long-context"), 30.0, seed=7, max_model_len=500, vocab=(5, 9))
    assert all(len(p.request.prompt) == 499 and p.request.max_tokens == 1 for p in planned)
    assert {t for p in planned for t in p.request.prompt} == {5, 6, 7, 8}


def test_a_hand_made_workload_counts_classes_and_phases():
    a = RequestClass("a", Lengths(10, spread=0.0), Lengths(3, spread=0.0), weight=3.0)
    b = RequestClass("b", Lengths(4, spread=0.0), Lengths(9, spread=0.0),
                     prefix=PrefixPool(1, 6, hot_share=1.0))  # fmt: skip
    w = SyntheticWorkload(
        "hand", "", (Phase("one", 0.5, 10.0, (a, b)), Phase("two", 0.5, 2.0, (b,))), 1.0, 1.0
    )
    planned = plan_synthetic(w, 4.0, seed=1)
    assert [p.tag for p in planned].count("two/b") == len([p for p in planned if p.at_s >= 2])
    for p in planned:
        cls = p.tag.split("/")[1]
        assert (len(p.request.prompt), p.request.max_tokens) == ((10, 3) if cls == "a" else (10, 9))
        assert p.request.prefix_id == (None if cls == "a" else 0)
    with pytest.raises(ValueError, match="phase shares sum to 0.5"):
        SyntheticWorkload("bad", "", (Phase("one", 0.5, 1.0, (a,)),), 1.0, 1.0)


def test_workloads_import_without_torch_grpc_or_numpy():
    code = (
        "import sys, bench.workloads; "
        "print(sorted(m for m in ('torch', 'grpc', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- the Mooncake trace -------------------------------------------------------------------


def test_parse_trace_reads_every_field_and_checks_them():
    rows = parse_trace([trace_line(0, 600, 3, [1, 2]), "", trace_line(250, 513, 0, [1, 9])])
    assert rows == [TraceRequest(0, 600, 3, (1, 2)), TraceRequest(250, 513, 0, (1, 9))]
    with pytest.raises(ValueError, match="trace line 1: 1 hash ids for 600 tokens"):
        parse_trace([trace_line(0, 600, 3, [1])])
    with pytest.raises(ValueError, match="trace line 1: KeyError"):
        parse_trace(['{"timestamp": 0}'])
    with pytest.raises(ValueError, match="trace request 2 arrives before 1"):
        parse_trace([trace_line(9, 10, 1, [0]), trace_line(3, 10, 1, [0])])


def test_trace_replay_scales_lengths_blocks_and_time():
    rows = parse_trace([
        trace_line(1000, 1000, 343, [7, 8]),
        trace_line(2000, 600, 0, [7, 5]),
        trace_line(3500, 513, 40, [9, 5]),
        trace_line(4000, 100, 1, [4]),
    ])  # fmt: skip
    w = TraceWorkload("t", "", "t.jsonl", 1.0, 1.0, length_scale=32, time_scale=4.0)
    planned = plan_trace(w, rows, duration_s=10.0, seed=3, max_model_len=2048)
    assert [p.at_s for p in planned] == [0.0, 4.0]  # the third arrives at 10.0: outside
    first, second = (p.request for p in planned)
    assert (len(first.prompt), first.max_tokens) == (32, 11)  # ceil(1000/32), round(343/32)
    assert (len(second.prompt), second.max_tokens) == (19, 1)  # ceil(600/32), at least 1
    assert first.prompt[:16] == second.prompt[:16]  # hash 7: the same 16-token block
    assert first.prompt[16:32] != second.prompt[16:32]
    # full size (the simulator's replay): lengths unchanged, times as recorded
    full = TraceWorkload("t", "", "t.jsonl", 1.0, 1.0, length_scale=1, output_scale=1,
                         time_scale=1.0, max_input_len=4096)  # fmt: skip
    planned = plan_trace(full, rows, 100.0, seed=3, max_model_len=8192)
    assert [(len(p.request.prompt), p.request.max_tokens, p.at_s) for p in planned] == [
        (1000, 343, 0.0), (600, 1, 1.0), (513, 40, 2.5), (100, 1, 3.0),
    ]  # fmt: skip
    assert planned[0].request.prompt[:512] == planned[1].request.prompt[:512]
    # hash 5, partial in both: the third's one token is the second's first of that block
    assert planned[2].request.prompt[512:] == planned[1].request.prompt[512:513]
    assert planned[2].request.prompt[:512] != planned[1].request.prompt[:512]


def test_trace_inputs_clip_to_max_input_len():
    rows = parse_trace([trace_line(0, 512 * 200, 64, list(range(200)))])
    w = TraceWorkload("t", "", "t.jsonl", 1.0, 1.0, max_input_len=1536)
    [p] = plan_trace(w, rows, 1.0, seed=0, max_model_len=2048)
    assert (len(p.request.prompt), p.request.max_tokens) == (1536, 2)


def test_missing_trace_file_says_where(tmp_path: Path):
    with pytest.raises(ValueError, match=f"mooncake: trace {tmp_path}/mooncake_conversation"):
        plan(workload("mooncake"), 10.0, seed=0, traces_dir=tmp_path)
