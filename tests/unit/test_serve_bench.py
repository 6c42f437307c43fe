"""Pure logic of ``banaserve bench serve``: workloads, arrivals, metrics, report, arguments.

No server needed: the sending loop runs against in-memory targets, and the OpenAI client
against a few-line HTTP server on 127.0.0.1 port 0. The real router is the lead's e2e test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
from collections.abc import AsyncIterator

import pytest

from bench import serve_bench
from bench.serve_report import (
    OK,
    RequestRecord,
    distribution,
    inter_token_latencies,
    load_summary,
    meets_slo,
    render_markdown,
    summarise,
    tpot,
)
from bench.serve_targets import (
    Endpoint,
    OpenAITarget,
    Sampling,
    TargetError,
    body_lines,
    chunk_tokens,
    completion_body,
    make_target,
    parse_target,
    sse_payloads,
)
from bench.serve_workload import (
    Request,
    WorkloadSpec,
    arrival_gaps,
    arrival_times,
    make_request,
)
from services.common.errors import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def record(chunks: list[tuple[float, int]], e2e: float | None, *, status: str = OK,
           sent_at: float = 0.0, prompt: int = 10) -> RequestRecord:  # fmt: skip
    r = RequestRecord(0, prompt, 8, sent_at_s=sent_at, status=status, chunks=chunks, e2e_s=e2e)
    r.num_output_tokens = sum(n for _, n in chunks)
    return r


def gaps(rate: float, shape: float, n: int, seed: int = 7) -> list[float]:
    it = arrival_gaps(rate, shape, seed)
    return [next(it) for _ in range(n)]


# ---- workloads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["sharegpt-like", "prefill-heavy", "decode-heavy", "shared-prefix"]
)
def test_requests_are_deterministic_and_within_limits(name):
    spec = WorkloadSpec(name=name, max_model_len=700, prefix_len=256, seed=3)
    first = [make_request(spec, i) for i in range(200)]
    assert first == [make_request(spec, i) for i in range(200)]
    assert first != [make_request(WorkloadSpec(name=name, max_model_len=700, prefix_len=256,
                                               seed=4), i) for i in range(200)]  # fmt: skip
    for r in first:
        assert len(r.prompt) >= 1 and r.max_tokens >= 1
        assert len(r.prompt) + r.max_tokens <= 700
        assert all(1000 <= t < 30000 for t in r.prompt)


def test_fixed_lengths_without_jitter():
    spec = WorkloadSpec(name="prefill-heavy", range_ratio=0.0, input_len=300, output_len=5)
    assert {(len(r.prompt), r.max_tokens) for r in map(lambda i: make_request(spec, i),
                                                        range(20))} == {(300, 5)}  # fmt: skip
    decode = WorkloadSpec(name="decode-heavy", range_ratio=0.0)
    assert (len(make_request(decode, 0).prompt), make_request(decode, 0).max_tokens) == (64, 512)


def test_jitter_stays_in_range():
    spec = WorkloadSpec(name="prefill-heavy", range_ratio=0.1, input_len=1000, output_len=100)
    lens = [(len(r.prompt), r.max_tokens) for r in (make_request(spec, i) for i in range(300))]
    assert all(900 <= i <= 1100 and 90 <= o <= 110 for i, o in lens)
    assert len({i for i, _ in lens}) > 50


def test_clipping_to_max_model_len_keeps_one_output_token():
    spec = WorkloadSpec(name="prefill-heavy", range_ratio=0.0, input_len=5000, max_model_len=64)
    r = make_request(spec, 0)
    assert (len(r.prompt), r.max_tokens) == (63, 1)


def test_sharegpt_like_means_and_tails():
    spec = WorkloadSpec(name="sharegpt-like", max_model_len=100_000)
    reqs = [make_request(spec, i) for i in range(3000)]
    ins = [len(r.prompt) for r in reqs]
    outs = [r.max_tokens for r in reqs]
    # clipping to 4x the mean trims the tail, so the realised means sit a little under nominal
    assert 170 <= statistics.mean(ins) <= 205
    assert 105 <= statistics.mean(outs) <= 125
    assert statistics.median(ins) < statistics.mean(ins)  # long right tail
    assert min(ins) >= 4 and max(ins) <= 800 and min(outs) >= 2 and max(outs) <= 480


def test_shared_prefix_requests_share_exactly_their_prefix():
    spec = WorkloadSpec(name="shared-prefix", prefix_len=32, num_prefixes=3, input_len=8,
                        range_ratio=0.0)  # fmt: skip
    reqs = [make_request(spec, i) for i in range(60)]
    assert {r.prefix_id for r in reqs} == {0, 1, 2}
    by_prefix: dict[int, list[Request]] = {}
    for r in reqs:
        by_prefix.setdefault(r.prefix_id, []).append(r)
    prefixes = {p: rs[0].prompt[:32] for p, rs in by_prefix.items()}
    assert len({tuple(p) for p in prefixes.values()}) == 3
    for p, rs in by_prefix.items():
        assert all(r.prompt[:32] == prefixes[p] and len(r.prompt) == 40 for r in rs)
    assert len({tuple(r.prompt[32:]) for r in reqs}) == 60  # unique suffixes


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"name": "nope"}, "workload must be one of"),
        ({"range_ratio": 1.0}, "range ratio"),
        ({"vocab_low": 5, "vocab_high": 5}, "vocab range"),
        ({"name": "shared-prefix", "prefix_len": 512, "max_model_len": 100}, "at least 514"),
        ({"input_len": 0}, "input length"),
    ],
)
def test_bad_specs_say_what_is_wrong(kw, message):
    with pytest.raises(ValueError, match=message):
        WorkloadSpec(**kw)


# ---- arrivals -----------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "shape"), [(4.0, 1.0), (4.0, 0.25), (0.5, 4.0)])
def test_arrival_mean_rate_and_burstiness(rate, shape):
    sample = gaps(rate, shape, 20_000)
    assert statistics.mean(sample) == pytest.approx(1 / rate, rel=0.05)
    cv = statistics.stdev(sample) / statistics.mean(sample)
    assert cv == pytest.approx(1 / math.sqrt(shape), rel=0.08)


def test_arrivals_are_seeded():
    assert gaps(2.0, 1.0, 50, seed=1) == gaps(2.0, 1.0, 50, seed=1)
    assert gaps(2.0, 1.0, 50, seed=1) != gaps(2.0, 1.0, 50, seed=2)


def test_arrival_times_by_count_duration_and_inf():
    by_count = arrival_times(10.0, 1.0, 0, 50, None)
    assert len(by_count) == 50 and by_count[0] == 0.0 and by_count == sorted(by_count)
    by_duration = arrival_times(10.0, 1.0, 0, None, 100.0)
    assert all(t < 100.0 for t in by_duration) and 900 <= len(by_duration) <= 1100
    assert by_duration[:50] == by_count  # the same process, cut differently
    assert arrival_times(10.0, 1.0, 0, 3, 100.0) == by_count[:3]
    assert arrival_times(math.inf, 1.0, 0, 4, None) == [0.0] * 4
    with pytest.raises(ValueError, match="needs a request count"):
        arrival_times(math.inf, 1.0, 0, None, 5.0)


# ---- metrics ------------------------------------------------------------------------------


def test_itl_splits_a_multi_token_chunk_evenly_and_skips_the_first_chunk():
    # first chunk of 2 tokens at 0.5 s; then 1 token 0.1 s later; then 3 tokens 0.3 s later
    chunks = [(0.5, 2), (0.6, 1), (0.9, 3)]
    assert inter_token_latencies(chunks) == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert inter_token_latencies([(0.5, 1)]) == []
    assert inter_token_latencies([]) == []


def test_tpot_exact_and_undefined_for_one_token():
    assert tpot(0.5, 1.5, 6) == pytest.approx(0.2)
    assert tpot(0.5, 0.5, 1) is None
    assert tpot(None, 1.0, 5) is None
    r = record([(0.2, 1), (0.3, 1), (0.4, 1)], 0.4)
    assert (r.ttft_s, r.tpot_s) == (0.2, pytest.approx(0.1))


def test_distribution_percentiles_interpolate_linearly():
    d = distribution([0.001, 0.002, 0.003, 0.004, 0.005])
    assert d == pytest.approx({"mean": 3.0, "p50": 3.0, "p90": 4.6, "p99": 4.96})
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_slo_needs_success_and_both_targets():
    fast = record([(0.1, 1), (0.15, 1), (0.2, 1)], 0.2)  # TTFT 100 ms, TPOT 50 ms
    assert meets_slo(fast, 100, 50)
    assert not meets_slo(fast, 99, 50) and not meets_slo(fast, 100, 49)
    assert meets_slo(record([(0.1, 1)], 0.1), 100, 1)  # one token: no TPOT to miss
    assert not meets_slo(record([(0.1, 1)], 0.1, status="UNAVAILABLE"), 1000, 1000)


def test_summary_throughput_goodput_and_failures():
    records = [
        record([(0.1, 1), (0.2, 1), (0.3, 2)], 0.3, sent_at=0.0),  # TTFT 100, TPOT 66.7
        record([(0.5, 1), (1.0, 1)], 1.0, sent_at=1.0),  # TTFT 500: misses the SLO
        record([], 0.2, status="UNAVAILABLE", sent_at=1.5),
        record([], 2.0, status="TIMEOUT", sent_at=2.0),  # ends at 4.0 s
    ]
    s = summarise(records, slo_ttft_ms=200, slo_tpot_ms=100)
    assert (s["num_requests"], s["num_ok"], s["num_failed"]) == (4, 2, 2)
    assert s["failures"] == {"UNAVAILABLE": 1, "TIMEOUT": 1}
    assert s["duration_s"] == 4.0
    assert s["num_output_tokens"] == 6 and s["num_prompt_tokens"] == 20
    assert s["request_throughput"] == 0.5
    assert s["output_throughput"] == 1.5
    assert s["total_token_throughput"] == 6.5
    assert s["slo"] == {"ttft_ms": 200, "tpot_ms": 100, "num_met": 1, "attainment": 0.25,
                        "goodput": 0.25}  # fmt: skip
    assert s["ttft_ms"]["mean"] == pytest.approx(300.0)
    assert s["itl_ms"]["mean"] == pytest.approx((100 + 50 + 50 + 500) / 4)


def test_server_side_summary_hidden_share_and_hit_rate():
    def served(transfer_s: float, exposed_s: float, cached: int) -> RequestRecord:
        r = record([(0.1, 1)], 0.1)  # 10 prompt tokens
        r.server = {"routing_s": 0.002, "prefill_s": 0.05, "kv_transfer_s": transfer_s,
                    "kv_transfer_exposed_s": exposed_s, "kv_mib": 3.0,
                    "num_cached_tokens": cached}  # fmt: skip
        return r

    s = summarise([served(0.3, 0.03, 8), served(0.1, 0.01, 0)], 1000, 1000)["server"]
    assert s["kv_hidden_share"] == pytest.approx(1 - 0.04 / 0.4)
    assert s["prefix_hit_rate"] == pytest.approx(8 / 20)
    assert s["routing_ms"]["mean"] == pytest.approx(2.0)
    assert s["kv_transfer_ms"]["p50"] == pytest.approx(200.0)
    assert s["kv_mib_mean"] == 3.0
    assert summarise([record([(0.1, 1)], 0.1)], 1000, 1000)["server"] is None  # openai://


def test_load_summary_skew_and_requests_per_worker():
    samples = [{"p0": 300, "p1": 100}, {"p0": 100, "p1": 0}, {"p0": 200}]
    records = [record([(0.1, 1)], 0.1) for _ in range(3)]
    for r, worker in zip(records, ("p0", "p0", "p1"), strict=True):
        r.server = {"prefill_worker": worker}
    load = load_summary(samples, records)
    assert load["mean_queued_prefill_tokens"] == {"p0": 200.0, "p1": 100 / 3}
    assert load["queued_skew"] == pytest.approx(200 / ((200 + 100 / 3) / 2))
    assert load["requests_per_prefill_worker"] == {"p0": 2, "p1": 1}
    assert load_summary([], [])["queued_skew"] is None


def test_summary_of_nothing_sent_has_no_rates():
    s = summarise([RequestRecord(0, 5, 5, 0.0)], 100, 100)
    assert s["failures"] == {"NOT_SENT": 1}
    assert s["request_throughput"] is None and s["slo"]["goodput"] is None


def test_markdown_table():
    records = [record([(0.1, 1), (0.2, 1)], 0.2), record([], 0.1, status="HTTP 503")]
    args = parse("--target", "grpc://127.0.0.1:1", "--num-requests", "2")
    spec = serve_bench.spec_from_args(args)
    report = serve_bench.build_report(
        serve_bench.config_of(args, spec, 2), {"date": "today"}, records
    )
    md = render_markdown(report)
    assert "target `grpc://127.0.0.1:1` · workload sharegpt-like · rate 1 req/s" in md
    assert "| requests ok / sent | 1 / 2 |" in md
    assert "| TTFT | 100.0 | 100.0 | 100.0 | 100.0 |" in md
    assert "| TPOT | 100.0 |" in md
    assert "| SLO attainment (TTFT ≤ 1000 ms, TPOT ≤ 100 ms) | 50.0% |" in md
    assert "Failures: HTTP 503 × 1" in md
    json.dumps(serve_bench.json_safe(report))  # serialisable as written


# ---- arguments ----------------------------------------------------------------------------


def test_defaults():
    args = parse("--target", "grpc://localhost:50051")
    assert args.target == Endpoint("grpc", "localhost", 50051)
    assert (args.workload, args.rate, args.burstiness, args.seed) == ("sharegpt-like", 1.0, 1.0, 0)
    assert (args.num_requests, args.duration, args.max_concurrency) == (None, None, None)
    assert args.vocab_range == (1000, 30000) and args.ignore_eos
    assert str(args.out).endswith("bench/results")
    assert parse("--target", "grpc://h:1", "--rate", "inf").rate == math.inf


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--target", "http://h:1"],
        ["--target", "grpc://h"],
        ["--target", "grpc://h:1/v1"],
        ["--target", "grpc://h:1", "--rate", "0"],
        ["--target", "grpc://h:1", "--rate", "nan"],
        ["--target", "grpc://h:1", "--burstiness", "-1"],
        ["--target", "grpc://h:1", "--num-requests", "0"],
        ["--target", "grpc://h:1", "--duration", "inf"],
        ["--target", "grpc://h:1", "--vocab-range", "5:5"],
        ["--target", "grpc://h:1", "--vocab-range", "100"],
        ["--target", "grpc://h:1", "--workload", "chat"],
    ],
)
def test_bad_arguments_are_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "error" in capsys.readouterr().err


def test_config_errors_before_sending():
    with pytest.raises(ConfigError, match="needs a request count"):
        args = parse("--target", "grpc://h:1", "--rate", "inf", "--duration", "5")
        serve_bench.plan_from_args(args, serve_bench.spec_from_args(args))
    with pytest.raises(ConfigError, match="range ratio"):
        serve_bench.spec_from_args(parse("--target", "grpc://h:1", "--range-ratio", "2"))
    with pytest.raises(ValueError, match="need --model"):
        make_target(parse_target("openai://h:1"), None, Sampling())


def test_plan_defaults_to_100_requests_and_deadline_covers_them():
    args = parse("--target", "grpc://h:1", "--rate", "inf", "--timeout", "5")
    plan = serve_bench.plan_from_args(args, serve_bench.spec_from_args(args))
    assert len(plan) == 100 and {at for _, at in plan} == {0.0}
    assert serve_bench.run_deadline(args, [0.0] * 100) == 5 + serve_bench.DEADLINE_GRACE_S
    capped = parse("--target", "grpc://h:1", "--timeout", "5", "--max-concurrency", "30")
    assert serve_bench.run_deadline(capped, [0.0, 2.0]) == 2.0 + 5 + serve_bench.DEADLINE_GRACE_S


# ---- sending loop, in memory --------------------------------------------------------------


class FakeTarget:
    """Streams ``max_tokens`` tokens in chunks of ``chunk``; index 1 fails, index 2 hangs."""

    def __init__(self, chunk: int = 1) -> None:
        self.chunk = chunk
        self.closed = 0

    def server_side(self, request: Request) -> dict[str, float]:
        return {"routing_s": 0.001, "prefill_s": 0.0, "kv_transfer_s": 0.0,
                "kv_transfer_exposed_s": 0.0, "kv_mib": 0.0, "num_cached_tokens": 0}  # fmt: skip

    async def prefill_queues(self) -> dict[str, int] | None:
        return None

    async def stream(self, request: Request, timeout_s: float) -> AsyncIterator[int]:
        try:
            if request.index == 1:
                raise TargetError("RESOURCE_EXHAUSTED", "no KV blocks")
            if request.index == 2:
                await asyncio.sleep(3600)
            left = request.max_tokens
            while left:
                await asyncio.sleep(0.001)
                n = min(self.chunk, left)
                left -= n
                yield n
        finally:
            self.closed += 1

    async def close(self) -> None:
        return None


def drive(plan, chunk=1, **flags):
    argv = ["--target", "grpc://h:1", "--timeout", "0.2", *sum(([f"--{k.replace('_', '-')}",
            str(v)] for k, v in flags.items()), [])]  # fmt: skip
    args = parse(*argv)
    target = FakeTarget(chunk)
    progress = serve_bench.Progress(len(plan), enabled=False)
    records = asyncio.run(serve_bench.drive(target, plan, args, progress))
    return records, target, progress


def test_drive_records_successes_failures_and_timeouts():
    plan = [(Request(i, [1, 2, 3], 4), 0.01 * i) for i in range(4)]
    records, target, progress = drive(plan, chunk=3)
    assert [r.status for r in records] == [OK, "RESOURCE_EXHAUSTED", "TIMEOUT", OK]
    assert [r.num_output_tokens for r in records] == [4, 0, 0, 4]
    assert [n for _, n in records[0].chunks] == [3, 1]
    assert len(records[0].itl_s) == 1
    assert records[3].sent_at_s >= 0.03
    assert (progress.done, progress.failed) == (4, 2)
    assert target.closed == 4  # every stream closed, the timed-out one included


def test_drive_stops_at_the_run_deadline():
    plan = [(Request(2, [1], 4), 0.0), (Request(0, [1], 4), 5.0)]
    records, target, _ = drive(plan, timeout=30, max_run_s=0.1)
    assert [r.status for r in records] == ["RUN_DEADLINE", "NOT_SENT"]
    assert target.closed == 1


def test_max_concurrency_serialises_requests():
    plan = [(Request(0, [1], 20), 0.0), (Request(3, [1], 20), 0.0)]
    records, _, _ = drive(plan, max_concurrency=1)
    assert all(r.ok for r in records)
    first, second = sorted(records, key=lambda r: r.sent_at_s)
    assert second.sent_at_s >= first.sent_at_s + first.e2e_s - 1e-3


# ---- openai client ------------------------------------------------------------------------


def test_completion_body_sends_token_ids():
    body = completion_body(Request(0, [5, 6], 7), "m", Sampling(temperature=0.5))
    assert body["prompt"] == [5, 6] and body["max_tokens"] == 7 and body["model"] == "m"
    assert body["stream"] and body["ignore_eos"] and body["temperature"] == 0.5


def test_sse_payloads_and_chunk_tokens():
    lines = ["", ": comment", 'data: {"choices": [{"text": "ab", "token_ids": [1, 2]}]}',
             'data: {"choices": [{"text": "c"}]}', 'data: {"choices": [{"text": ""}]}',
             "data: [DONE]", 'data: {"choices": [{"text": "late"}]}']  # fmt: skip
    assert [chunk_tokens(p) for p in sse_payloads(lines)] == [2, 1, 0]
    with pytest.raises(TargetError, match="STREAM_ERROR: boom"):
        chunk_tokens({"error": {"message": "boom"}})


def test_body_lines_undoes_chunked_encoding():
    async def lines() -> list[str]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"7\r\ndata: a\r\n9\r\n\ndata: b\n\r\n5\r\n\ntail\r\n0\r\n\r\n")
        reader.feed_eof()
        return [x async for x in body_lines(reader, {"transfer-encoding": "chunked"})]

    assert asyncio.run(lines()) == ["data: a", "data: b", "", "tail"]


async def fake_openai(reader, writer, status=200):
    """Answer one completions request: token ids 0..max_tokens-1 in chunks of two."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += await reader.readline()
    length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                  if h.lower().startswith(b"content-length"))  # fmt: skip
    body = json.loads(await reader.readexactly(length))
    events = [{"choices": [{"text": "x", "token_ids": list(range(i, min(i + 2, body["max_tokens"])))}]}
              for i in range(0, body["max_tokens"], 2)]  # fmt: skip
    events.append({"choices": [], "usage": {"completion_tokens": body["max_tokens"] + 1}})
    data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    data += b"data: [DONE]\n\n"
    if body["prompt"] == [0]:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 9\r\n\r\nbad input")
    else:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.mark.integration
def test_openai_target_against_a_local_http_server():
    async def scenario():
        server = await asyncio.start_server(fake_openai, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        target = OpenAITarget(Endpoint("openai", "127.0.0.1", port), "m", Sampling())
        async with server:
            counts = [n async for n in target.stream(Request(0, [7, 8], 5), 5.0)]
            with pytest.raises(TargetError, match="HTTP 400: bad input"):
                async for _ in target.stream(Request(1, [0], 5), 5.0):
                    pass
        return counts

    # 5 tokens as 2+2+1, then usage says 6: the extra one is counted at the end
    assert asyncio.run(scenario()) == [2, 2, 1, 1]
