"""The load ``banaserve bench migration`` puts on a cluster, and the arithmetic on what it saw.

A ``Stream`` is one streamed request: when it was sent and every delta's arrival time and token
count, on ``time.perf_counter``'s clock (the migration driver stamps its events on the same
clock, so windows and gaps line up). Pure functions below turn streams into figures:

- ``decode_window``: the decode figures over a window in which the batch is whole: output
  tokens whose delta arrived in it per second, and the per-token gaps (TPOT: a delta of ``n``
  tokens ``g`` s after the previous one counts ``n`` gaps of ``g / n``) whose both ends lie in
  it, p50/p99 in ms;
- ``prefill_figures``: prompt tokens per second from the first send to the last first token,
  and TTFT p50/p99;
- ``max_gap``: the longest wait between two deltas of any request that overlaps a window (the
  pause the requests see around a switch).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from bench.serve_report import distribution
from services.client.client import AsyncBanaServeClient


@dataclass
class Stream:
    index: int
    num_prompt_tokens: int
    sent_at: float
    chunks: list[tuple[float, int]] = field(default_factory=list)
    ended_at: float | None = None
    error: str = ""
    token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def first_token_at(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None


def prompts(num: int, length: int, seed: int, vocab: tuple[int, int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab[0], vocab[1], (num, length), generator=g).tolist()


async def stream_one(
    client: AsyncBanaServeClient, record: Stream, prompt: list[int], max_tokens: int,
    timeout_s: float,
) -> Stream:  # fmt: skip
    """One greedy request streamed to its end into ``record``; never raises (the error is
    recorded)."""
    record.sent_at = time.perf_counter()
    try:
        generation = client.generate(
            prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, timeout_s=timeout_s
        )
        async for delta in generation:
            record.chunks.append((time.perf_counter(), len(delta.token_ids)))
            record.token_ids.extend(delta.token_ids)
    except Exception as exc:  # a failed request is a figure, not a crash
        record.error = f"{type(exc).__name__}: {exc}"
    record.ended_at = time.perf_counter()
    return record


def send_all(
    client: AsyncBanaServeClient, batch: Sequence[list[int]], max_tokens: int, timeout_s: float
) -> tuple[list[Stream], list[asyncio.Task[Stream]]]:
    """Every prompt sent at once: the records (filled as deltas arrive) and their tasks."""
    records = [Stream(i, len(p), time.perf_counter()) for i, p in enumerate(batch)]
    tasks = [
        asyncio.create_task(stream_one(client, r, p, max_tokens, timeout_s))
        for r, p in zip(records, batch, strict=True)
    ]
    return records, tasks


def gaps_in(stream: Stream, start: float, end: float) -> list[float]:
    gaps: list[float] = []
    for (t0, _), (t1, n) in zip(stream.chunks, stream.chunks[1:], strict=False):
        if n > 0 and start <= t0 and t1 <= end:
            gaps += [(t1 - t0) / n] * n
    return gaps


def decode_window(streams: Sequence[Stream], start: float, end: float) -> dict:
    """Decode throughput and TPOT over ``[start, end]`` (see the module doc)."""
    span = end - start
    tokens = sum(n for s in streams for t, n in s.chunks if start < t <= end)
    gaps = [g for s in streams for g in gaps_in(s, start, end)]
    ms = distribution(gaps)
    # the longest wait between two deltas inside the window: what ``max_gap`` measures while a
    # migration starts, seen here without one (a baseline run) or after it (a migrated run)
    waits = [
        t1 - t0
        for s in streams
        for (t0, _), (t1, n) in zip(s.chunks, s.chunks[1:], strict=False)
        if n > 0 and start <= t0 and t1 <= end
    ]
    return {
        "window_s": span,
        "num_tokens": tokens,
        "tokens_per_s": tokens / span if span > 0 else None,
        "tpot_p50_ms": ms["p50"],
        "tpot_p99_ms": ms["p99"],
        "tpot_mean_ms": ms["mean"],
        "max_wait_ms": 1000 * max(waits) if waits else None,
    }


def full_batch_window(streams: Sequence[Stream], start: float) -> tuple[float, float]:
    """From ``start`` to the first request's last token: every request decodes throughout."""
    return start, min(s.chunks[-1][0] for s in streams)


def prefill_figures(streams: Sequence[Stream]) -> dict:
    firsts = [s.first_token_at for s in streams if s.first_token_at is not None]
    if not firsts:
        return {"prompt_tokens_per_s": None, "ttft_p50_ms": None, "ttft_p99_ms": None}
    began = min(s.sent_at for s in streams)
    span = max(firsts) - began
    ttft = distribution([s.first_token_at - s.sent_at for s in streams if s.first_token_at])
    return {
        "window_s": span,
        "num_prompt_tokens": sum(s.num_prompt_tokens for s in streams),
        "prompt_tokens_per_s": sum(s.num_prompt_tokens for s in streams) / span,
        "ttft_p50_ms": ttft["p50"],
        "ttft_p99_ms": ttft["p99"],
        "ttft_mean_ms": ttft["mean"],
    }


def max_gap(streams: Sequence[Stream], start: float, end: float) -> float | None:
    """Longest wait in seconds between two deltas of one request overlapping ``[start, end]``."""
    gaps = [
        t1 - t0
        for s in streams
        for (t0, _), (t1, _) in zip(s.chunks, s.chunks[1:], strict=False)
        if t1 >= start and t0 <= end
    ]
    return max(gaps, default=None)
