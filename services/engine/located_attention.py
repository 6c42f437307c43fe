"""Attention for sequences whose KV lives in several places (attention migration, DESIGN.md §5).

A *located* sequence has its first ``num_remote_blocks`` blocks (every layer) on a helper engine
and the rest here; the tokens a step computes always write their KV here. At every layer its
attention is computed in parts and merged exactly (DESIGN.md §3, hook 2):

1. the stepping thread submits the query rows of every located sequence to their helper's
   ``AttentionPort`` (one call per port per layer);
2. while the helper works, it computes the local part: partial attention ``(O, m, l)`` over the
   local blocks, positions ``[num_remote_tokens, ctx_len)``;
3. it merges both parts by log-sum-exp and writes the normalised rows into the layer's output.

Sequences with only local blocks never come here: they keep the batched fast path of
``attention.paged_attention``. A failed helper call raises ``PortFailed``, which fails the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.errors import InvalidRequestError
from services.engine.attention import PartialAttention, gather_blocks, merge_partials
from services.engine.attention import partial_attention as attend_partial
from services.engine.kv_cache import KVCache
from services.engine.ports import AttentionPort, AttentionQuery, wait
from services.engine.sequence import Sequence


@dataclass
class LocatedSpan:
    """One located sequence's rows in a step."""

    request_id: str
    q_start: int
    q_len: int
    ctx_len: int  # tokens the rows attend to, once this step's KV is written
    num_remote_tokens: int  # tokens [0, num_remote_tokens) are on the helper
    block_table: torch.Tensor  # local blocks, covering [num_remote_tokens, ctx_len)
    port: AttentionPort

    @property
    def rows(self) -> slice:
        return slice(self.q_start, self.q_start + self.q_len)


@dataclass
class LocatedBatch:
    spans: list[LocatedSpan]
    positions: torch.Tensor  # the step's positions, one per row
    timeout_s: float

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        out: torch.Tensor,
        scale: float,
    ) -> None:
        """Write the attention output of every located row of ``q`` into ``out``."""
        calls = []
        for port in dict.fromkeys(s.port for s in self.spans):
            spans = [s for s in self.spans if s.port is port]
            queries = [
                AttentionQuery(s.request_id, q[s.rows], self.positions[s.rows], s.num_remote_tokens)
                for s in spans
            ]
            calls.append((port, spans, port.submit(layer, queries)))
        local = [
            self._local_part(s, q, k_cache, v_cache, scale) for _, spans, _ in calls for s in spans
        ]
        parts = iter(local)
        for port, spans, future in calls:
            remote = wait(future, port, [s.request_id for s in spans], self.timeout_s)
            for span, far in zip(spans, remote, strict=True):
                merged = merge_partials([next(parts), far])
                out[span.rows] = merged.normalized().to(out.dtype)

    def _local_part(
        self,
        span: LocatedSpan,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
    ) -> PartialAttention:
        num_local = span.ctx_len - span.num_remote_tokens
        k = gather_blocks(k_cache, span.block_table)[:num_local]
        v = gather_blocks(v_cache, span.block_table)[:num_local]
        kv_positions = torch.arange(span.num_remote_tokens, span.ctx_len, device=q.device)
        return attend_partial(q[span.rows], self.positions[span.rows], k, v, kv_positions, scale)


def request_partial_attention(
    seq: Sequence,
    kv_cache: KVCache,
    layer: int,
    q: torch.Tensor,
    q_positions: torch.Tensor,
    block_indices: list[int],
    scale: float,
) -> PartialAttention:
    """Hook 2: attention of ``q`` over some of ``seq``'s local blocks (indices into all of its
    blocks), unnormalised. Causality follows absolute positions."""
    ctx = seq.num_computed_tokens
    valid = range(seq.num_remote_blocks, seq.blocks_needed(ctx))
    if any(i not in valid for i in block_indices):
        raise InvalidRequestError(
            f"block index outside the request's local blocks [{valid.start}, {valid.stop})"
        )
    ids = torch.tensor([seq.block_id(i) for i in block_indices], dtype=torch.long)
    bs = seq.block_size
    slots = (torch.tensor(block_indices)[:, None] * bs + torch.arange(bs)).flatten()
    keep = slots < ctx  # the last block may be partly filled
    k_cache, v_cache = kv_cache.layer(layer)
    k = gather_blocks(k_cache, ids.to(k_cache.device))[keep]
    v = gather_blocks(v_cache, ids.to(v_cache.device))[keep]
    return attend_partial(q, q_positions, k, v, slots[keep], scale)
