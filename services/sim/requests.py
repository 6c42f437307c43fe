"""The simulator's requests: from a ``bench compare`` plan in, ``bench serve`` records out.

Workloads are ``bench/workloads.py``'s (the same generator, seeds and catalog as ``bench
compare``); the records are ``bench/serve_report.py``'s, so the simulator's summary is the very
arithmetic of the real benchmark's (``summarise``, ``compare_report.row``).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.serve_report import RequestRecord
from bench.workloads_synthetic import PlannedRequest


@dataclass(eq=False)
class SimRequest:
    request_id: str
    index: int
    prompt: tuple[int, ...]
    max_tokens: int
    at_s: float
    prefix_id: int | None = None
    decode_worker: str = ""
    first_token_s: float | None = None  # absolute simulated times
    done_s: float | None = None
    num_output_tokens: int = 0
    status: str = "NOT_SENT"
    message: str = ""

    def record(self) -> RequestRecord:
        """As ``bench serve`` records it: times since the request was sent. The chunks are the
        first token and the rest in one (the simulator keeps no per-token times)."""
        r = RequestRecord(self.index, len(self.prompt), self.max_tokens, self.at_s,
                          prefix_id=self.prefix_id)  # fmt: skip
        r.status, r.message = self.status, self.message
        if self.first_token_s is not None:
            r.chunks.append((self.first_token_s - self.at_s, 1))
        if self.status == "OK" and self.done_s is not None:
            r.e2e_s = self.done_s - self.at_s
            r.num_output_tokens = self.num_output_tokens
            if self.num_output_tokens > 1:
                r.chunks.append((r.e2e_s, self.num_output_tokens - 1))
        return r


def from_plan(planned: list[PlannedRequest], start_s: float = 0.0,
              prefix: str = "r") -> list[SimRequest]:  # fmt: skip
    """The plan's requests sent from ``start_s`` on; ids ``PREFIX<index>`` (unique per run)."""
    return [
        SimRequest(
            f"{prefix}{p.request.index}",
            p.request.index,
            tuple(p.request.prompt),
            p.request.max_tokens,
            start_s + p.at_s,
            p.request.prefix_id,
        )
        for p in planned
    ]
