"""Replaying a Mooncake trace (FAST'25, ``../shared/traces/``), scaled to what a machine serves.

Pure and torch-free (the cluster simulator replays the same requests, at full size with both
scales 1). A trace line is ``{"timestamp": ms, "input_length": n, "output_length": m,
"hash_ids": [...]}``; hash id ``h`` at position ``j`` names the ``j``-th 512-token block of the
prompt, and equal ids mean equal content (the last block may be partial).

Scaling (``TraceWorkload``): the window is ``start`` and the requests after it whose scaled
arrival falls within the duration. Lengths are divided by ``length_scale``, the block size
too, so the hash structure survives: block ``h`` becomes ``512 / length_scale`` seeded tokens,
the same wherever ``h`` appears, and a prompt is its blocks' tokens cut to
``ceil(input_length / length_scale)``, then clipped to ``max_input_len`` (with the hash ids
that still fit). Outputs are ``max(1, round(output_length / output_scale))``. Arrival offsets
(from the window's first request) are multiplied by ``time_scale``. The offered token rate is
then the trace's divided by ``length_scale × time_scale`` (default 32 × 4 = 128); with
``length_scale`` 32 a trace block is 16 tokens, one engine block, so prefix-cache hits line
up with the trace's block reuse.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench.serve_workload import Request, clip
from bench.workloads_synthetic import VOCAB, PlannedRequest
from services.common.errors import ConfigError

TRACE_BLOCK_TOKENS = 512
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACES_DIR = REPO_ROOT.parent / "shared" / "traces"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class TraceRequest:
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def parse_trace_line(line: str, number: int) -> TraceRequest:
    """One JSON line; ValueError names the line and what is wrong."""
    try:
        row = json.loads(line)
        request = TraceRequest(
            int(row["timestamp"]),
            int(row["input_length"]),
            int(row["output_length"]),
            tuple(int(h) for h in row["hash_ids"]),
        )
    except (ValueError, KeyError, TypeError, OverflowError) as exc:  # Infinity, 1e400: Overflow
        raise ConfigError(f"trace line {number}: {exc!r}") from None
    blocks = math.ceil(request.input_length / TRACE_BLOCK_TOKENS)
    _require(request.timestamp_ms >= 0, f"trace line {number}: negative timestamp")
    _require(request.input_length > 0, f"trace line {number}: input_length must be positive")
    _require(request.output_length >= 0, f"trace line {number}: negative output_length")
    _require(
        len(request.hash_ids) == blocks,
        f"trace line {number}: {len(request.hash_ids)} hash ids for {request.input_length} "
        f"tokens (expected {blocks}, one per {TRACE_BLOCK_TOKENS})",
    )
    return request


def parse_trace(lines: Iterable[str]) -> list[TraceRequest]:
    """Every non-blank line, in order; arrivals must not go back in time."""
    rows = [parse_trace_line(line, n) for n, line in enumerate(lines, 1) if line.strip()]
    for n, (a, b) in enumerate(zip(rows, rows[1:], strict=False), 2):
        _require(b.timestamp_ms >= a.timestamp_ms, f"trace request {n} arrives before {n - 1}")
    return rows


def load_trace(path: Path) -> list[TraceRequest]:
    with open(path) as f:
        return parse_trace(f)


@dataclass(frozen=True)
class TraceWorkload:
    name: str
    description: str
    file: str  # in the traces directory
    slo_ttft_ms: float
    slo_tpot_ms: float
    length_scale: int = 32
    output_scale: int = 32
    time_scale: float = 4.0
    start: int = 0  # first trace request of the window
    max_input_len: int = 1536

    def __post_init__(self) -> None:
        _require(
            self.length_scale >= 1 and TRACE_BLOCK_TOKENS % self.length_scale == 0,
            f"length_scale must divide {TRACE_BLOCK_TOKENS}, got {self.length_scale}",
        )
        _require(self.output_scale >= 1, "output_scale must be >= 1")
        _require(self.time_scale > 0, "time_scale must be positive")
        _require(self.start >= 0 and self.max_input_len >= 1, "start >= 0, max_input_len >= 1")

    @property
    def block_tokens(self) -> int:
        return TRACE_BLOCK_TOKENS // self.length_scale


def block_tokens(seed: int, w: TraceWorkload, hash_id: int, vocab: tuple[int, int]) -> list[int]:
    rng = random.Random(f"{seed}:{w.name}:block:{hash_id}")
    return [rng.randrange(*vocab) for _ in range(w.block_tokens)]


def scaled_request(
    w: TraceWorkload,
    row: TraceRequest,
    index: int,
    seed: int,
    max_model_len: int,
    vocab: tuple[int, int] = VOCAB,
) -> Request:
    num_in = math.ceil(row.input_length / w.length_scale)
    num_out = max(1, round(row.output_length / w.output_scale))
    num_in, num_out = clip(min(num_in, w.max_input_len), num_out, max_model_len)
    num_blocks = math.ceil(num_in / w.block_tokens)
    prompt = [t for h in row.hash_ids[:num_blocks] for t in block_tokens(seed, w, h, vocab)]
    # prefix_id: the first block's hash, so requests that share it can be told apart.
    return Request(index, prompt[:num_in], num_out, row.hash_ids[0])


def plan_trace(
    w: TraceWorkload,
    rows: list[TraceRequest],
    duration_s: float,
    seed: int,
    max_model_len: int,
    vocab: tuple[int, int] = VOCAB,
) -> list[PlannedRequest]:
    """The window's requests whose scaled arrival is before ``duration_s`` (at least one)."""
    _require(duration_s > 0, f"duration must be positive, got {duration_s}")
    _require(w.start < len(rows), f"{w.name}: start {w.start} is past the trace's {len(rows)}")
    t0 = rows[w.start].timestamp_ms
    planned: list[PlannedRequest] = []
    for row in rows[w.start :]:
        at = (row.timestamp_ms - t0) / 1000 * w.time_scale
        if planned and at >= duration_s:
            break
        request = scaled_request(w, row, len(planned), seed, max_model_len, vocab)
        planned.append(PlannedRequest(request, at, w.name))
    return planned
