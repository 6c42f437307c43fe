"""The serving benchmark's arithmetic and report: per-request records → summary → markdown.

Pure (no network). A request's *chunks* are ``(seconds since it was sent, tokens in the
chunk)``, one per streamed delta. From them:

- TTFT: the first chunk's time;
- E2E: the end of the stream (after the last chunk, when the server closed it);
- TPOT: ``(E2E − TTFT) / (output tokens − 1)``, undefined for a single output token;
- ITL: one value per token after the first chunk. A chunk of ``n`` tokens arriving ``g``
  seconds after the previous one contributes ``n`` gaps of ``g / n`` (the tokens are assumed
  evenly spread over the wait, as SGLang's ``bench_serving`` does). Extra tokens in the *first*
  chunk contribute none: their wait is TTFT, not an inter-token gap.

Throughputs divide by the benchmark's duration (first send to last completion) and count only
successful requests. A request meets the SLO when it succeeded, its TTFT ≤ ``slo_ttft_ms`` and
its TPOT ≤ ``slo_tpot_ms`` (a single-token output has no TPOT and meets that half); attainment
is the share of *all* requests sent that met it, goodput the met ones per second.
Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

OK = "OK"
NOT_SENT = "NOT_SENT"  # the run's deadline came before the request could be sent
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
SERVER_METRICS = ("routing", "prefill", "kv_transfer", "kv_transfer_exposed")
SERVER_LABELS = {
    "routing": "routing (router)",
    "prefill": "prefill compute",
    "kv_transfer": "KV transfer",
    "kv_transfer_exposed": "KV transfer exposed",
}
LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E latency"}
PERCENTILES = (50, 90, 99)
MAX_MESSAGE = 200


@dataclass
class RequestRecord:
    """What happened to one request; times in seconds since it was sent."""

    index: int
    num_prompt_tokens: int
    max_tokens: int
    sent_at_s: float  # since the benchmark started
    status: str = NOT_SENT  # then "OK", a gRPC status name, "HTTP 503", "TIMEOUT", ...
    message: str = ""
    chunks: list[tuple[float, int]] = field(default_factory=list)
    e2e_s: float | None = None
    num_output_tokens: int = 0
    prefix_id: int | None = None
    # What the server reported (gRPC targets): SERVER_METRICS in s, kv_mib, num_cached_tokens.
    server: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def ttft_s(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None

    @property
    def tpot_s(self) -> float | None:
        return tpot(self.ttft_s, self.e2e_s, self.num_output_tokens)

    @property
    def itl_s(self) -> list[float]:
        return inter_token_latencies(self.chunks)

    def fail(self, status: str, message: str) -> None:
        self.status, self.message = status, message[:MAX_MESSAGE]

    def to_json(self) -> dict:
        return asdict(self) | {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "itl_s": self.itl_s}


def tpot(ttft_s: float | None, e2e_s: float | None, num_output_tokens: int) -> float | None:
    if ttft_s is None or e2e_s is None or num_output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (num_output_tokens - 1)


def inter_token_latencies(chunks: Sequence[tuple[float, int]]) -> list[float]:
    gaps: list[float] = []
    for (prev_t, _), (t, n) in zip(chunks, chunks[1:], strict=False):
        if n > 0:
            gaps += [(t - prev_t) / n] * n
    return gaps


def distribution(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean and percentiles, in milliseconds; all None when there are no values."""
    keys = ["mean", *(f"p{p}" for p in PERCENTILES)]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=float) * 1000.0
    stats = [ms.mean(), *np.percentile(ms, PERCENTILES)]
    return {k: float(v) for k, v in zip(keys, stats, strict=True)}


def meets_slo(record: RequestRecord, slo_ttft_ms: float, slo_tpot_ms: float) -> bool:
    if not record.ok or record.ttft_s is None:
        return False
    tpot_s = record.tpot_s
    return record.ttft_s * 1000 <= slo_ttft_ms and (tpot_s is None or tpot_s * 1000 <= slo_tpot_ms)


def duration(records: Sequence[RequestRecord]) -> float:
    """First send to last completion, in seconds."""
    ends = [r.sent_at_s + r.e2e_s for r in records if r.e2e_s is not None]
    if not ends:
        return 0.0
    return max(ends) - min(r.sent_at_s for r in records)


def per_second(count: float, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


def summarise(records: Sequence[RequestRecord], slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    ok = [r for r in records if r.ok]
    seconds = duration(records)
    num_out = sum(r.num_output_tokens for r in ok)
    num_in = sum(r.num_prompt_tokens for r in ok)
    num_met = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in records)
    values = {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [g for r in ok for g in r.itl_s],
        "e2e": [r.e2e_s for r in ok if r.e2e_s is not None],
    }
    return {
        "num_requests": len(records),
        "num_ok": len(ok),
        "num_failed": len(records) - len(ok),
        "failures": dict(Counter(r.status for r in records if not r.ok).most_common()),
        "duration_s": seconds,
        "num_prompt_tokens": num_in,
        "num_output_tokens": num_out,
        "request_throughput": per_second(len(ok), seconds),
        "output_throughput": per_second(num_out, seconds),
        "total_token_throughput": per_second(num_in + num_out, seconds),
        **{f"{m}_ms": distribution(values[m]) for m in LATENCY_METRICS},
        "server": server_summary(ok, num_in),
        "slo": {
            "ttft_ms": slo_ttft_ms,
            "tpot_ms": slo_tpot_ms,
            "num_met": num_met,
            "attainment": num_met / len(records) if records else None,
            "goodput": per_second(num_met, seconds),
        },
    }


def server_summary(ok: Sequence[RequestRecord], num_prompt_tokens: int) -> dict | None:
    """Server-reported timings, the share of KV transfer hidden behind compute (1 − exposed /
    transfer, summed over requests) and the prefix-cache hit rate (cached / prompt tokens)."""
    reported = [r.server for r in ok if r.server]
    if not reported:
        return None
    transfer = sum(s["kv_transfer_s"] for s in reported)
    exposed = sum(s["kv_transfer_exposed_s"] for s in reported)
    cached = sum(s["num_cached_tokens"] for s in reported)
    return {
        **{f"{m}_ms": distribution([s[f"{m}_s"] for s in reported]) for m in SERVER_METRICS},
        "kv_mib_mean": sum(s["kv_mib"] for s in reported) / len(reported),
        "kv_hidden_share": 1 - exposed / transfer if transfer > 0 else None,
        "num_cached_tokens": cached,
        "prefix_hit_rate": cached / num_prompt_tokens if num_prompt_tokens else None,
    }


def load_summary(samples: Sequence[dict[str, int]], records: Sequence[RequestRecord]) -> dict:
    """How evenly prefill work spread: per prefill worker, the mean of its queued prefill
    tokens over the run's samples and the requests it prefilled; skew = max / mean of those
    means (1.0 is perfectly even; N workers all on one worker gives N)."""
    workers = sorted({w for s in samples for w in s})
    queued = {w: float(np.mean([s.get(w, 0) for s in samples])) for w in workers}
    counts = Counter(r.server.get("prefill_worker") for r in records if r.ok and r.server)
    counts.pop(None, None)
    mean = float(np.mean(list(queued.values()))) if queued else 0.0
    return {
        "num_samples": len(samples),
        "mean_queued_prefill_tokens": queued,
        "queued_skew": max(queued.values()) / mean if mean > 0 else None,
        "requests_per_prefill_worker": dict(sorted(counts.items())),
    }


# ---- markdown -----------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def latency_table(summary: dict) -> list[str]:
    cols = ["mean", *(f"p{p}" for p in PERCENTILES)]
    lines = ["| latency (ms) | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in LATENCY_METRICS:
        dist = summary[f"{m}_ms"]
        lines.append(f"| {LABELS[m]} | " + " | ".join(fmt(dist[c]) for c in cols) + " |")
    return lines


def server_table(summary: dict) -> list[str]:
    server = summary.get("server")
    if not server:
        return []
    cols = ["mean", *(f"p{p}" for p in PERCENTILES)]
    lines = ["", "| server-side (ms) | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in SERVER_METRICS:
        dist = server[f"{m}_ms"]
        lines.append(f"| {SERVER_LABELS[m]} | " + " | ".join(fmt(dist[c], 2) for c in cols) + " |")
    hidden = server["kv_hidden_share"]
    hit = server["prefix_hit_rate"]
    lines += [
        "",
        f"KV per request: {fmt(server['kv_mib_mean'])} MiB mean · share of KV transfer hidden "
        f"behind compute: {'n/a' if hidden is None else f'{100 * hidden:.1f} %'} · prefix-cache "
        f"hit rate: {'n/a' if hit is None else f'{100 * hit:.1f} %'}",
    ]
    return lines


def load_lines(summary: dict) -> list[str]:
    load = summary.get("load") or {}
    if not load.get("num_samples") and not load.get("requests_per_prefill_worker"):
        return []
    skew = load.get("queued_skew")
    queued = ", ".join(f"{w} {v:.0f}" for w, v in load["mean_queued_prefill_tokens"].items())
    counts = ", ".join(f"{w} {n}" for w, n in load["requests_per_prefill_worker"].items())
    return [
        "",
        f"Prefill load: skew (max/mean queued prefill tokens) "
        f"{'n/a' if skew is None else f'{skew:.2f}'} · mean queued tokens: {queued or 'n/a'} · "
        f"requests per prefill worker: {counts or 'n/a'} ({load['num_samples']} samples)",
    ]


def throughput_table(summary: dict) -> list[str]:
    slo = summary["slo"]
    attainment = None if slo["attainment"] is None else 100 * slo["attainment"]
    rows = [
        ("requests ok / sent", f"{summary['num_ok']} / {summary['num_requests']}"),
        ("duration (s)", fmt(summary["duration_s"], 2)),
        ("request throughput (req/s)", fmt(summary["request_throughput"], 2)),
        ("output throughput (tok/s)", fmt(summary["output_throughput"])),
        ("total token throughput (tok/s)", fmt(summary["total_token_throughput"])),
        (
            f"SLO attainment (TTFT ≤ {slo['ttft_ms']:g} ms, TPOT ≤ {slo['tpot_ms']:g} ms)",
            f"{fmt(attainment)}%",
        ),
        ("goodput (req/s meeting the SLO)", fmt(slo["goodput"], 2)),
    ]
    return ["| measure | value |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)]


def failure_lines(summary: dict) -> list[str]:
    if not summary["failures"]:
        return []
    parts = ", ".join(f"{code} × {n}" for code, n in summary["failures"].items())
    return ["", f"Failures: {parts}"]


def config_line(config: dict) -> str:
    limit = (
        f"{config['num_requests']} requests"
        if config.get("num_requests") is not None
        else f"{config['duration_s']:g} s"
    )
    concurrency = config.get("max_concurrency") or "unlimited"
    return (
        f"target `{config['target']}` · workload {config['workload']} · rate "
        f"{config['rate']:g} req/s, burstiness {config['burstiness']:g} · {limit} · "
        f"max concurrency {concurrency} · seed {config['seed']} · timeout "
        f"{config['timeout_s']:g} s"
    )


def render_markdown(report: dict) -> str:
    summary = report["summary"]
    lines = [
        "# Serving benchmark",
        "",
        f"{report['machine']['date']} · " + config_line(report["config"]),
        "",
        *throughput_table(summary),
        "",
        *latency_table(summary),
        *server_table(summary),
        *load_lines(summary),
        *failure_lines(summary),
        "",
        "Method: " + METHOD,
    ]
    return "\n".join(lines) + "\n"


METHOD = (
    "token-id prompts (no tokenizer) from the seeded workload, sent at gamma-distributed "
    "arrival times (shape = burstiness, 1 = Poisson), each streamed with its own timeout; EOS "
    "ignored so every request asks for its full output length. TTFT is send → first streamed "
    "token, E2E send → end of stream, TPOT (E2E − TTFT) / (output tokens − 1), ITL the gap "
    "before each later token (a chunk of n tokens splits its gap evenly). Throughputs count "
    "successful requests over first send → last completion; SLO attainment is over all requests "
    "sent. Client-side clocks; all per-request records are in the JSON."
)
