"""Attention for sequences whose KV lives in several places (attention migration, DESIGN.md §5).

A *located* sequence has its first ``num_remote_blocks`` blocks (every layer) on a helper engine
and the rest here; the tokens a step computes always write their KV here. At every layer its
attention is computed in parts and merged exactly (DESIGN.md §3, hook 2):

1. the stepping thread submits the query rows of every located sequence to their helper's
   ``AttentionPort`` (one call per port per layer, ``submit``), as soon as the layer's queries
   exist: before the batched attention of the other sequences, so the round trip overlaps it;
2. while the helper works, it computes the local part: partial attention ``(O, m, l)`` over the
   local blocks, positions ``[num_remote_tokens, ctx_len)`` (``attend_local``);
3. it merges both parts by log-sum-exp and writes the normalised rows into the layer's output
   (``merge``, which waits for the helpers). Between 2 and 3 the model yields
   (``LlamaForCausalLM.layer_steps``): a step of two micro-batches computes the other one's
   layer there, so the round trip also overlaps that (model_runner.py, ``run_micro_batches``).

Sequences with only local blocks never come here: they keep the batched fast path of
``attention.paged_attention``. A failed helper call raises ``PortFailed``, which fails the step.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from services.common.errors import InvalidRequestError
from services.engine.attention import (
    PartialAttention,
    concat_partials,
    decode_partials,
    gather_blocks,
    merge_partials,
    split_partials,
)
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
    _sent: tuple[int, list[tuple[AttentionPort, list[LocatedSpan], Future]]] | None = field(
        default=None, repr=False
    )  # the layer whose queries are out, and the calls
    # the layer whose local parts are computed, and those parts (in the calls' order)
    _local: tuple[int, list[PartialAttention]] | None = field(default=None, repr=False)
    # decoding spans' local block tables, lengths and rows: built at the first layer of the step
    _decode_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(
        default=None, repr=False
    )

    def submit(self, layer: int, q: torch.Tensor) -> None:
        """Send ``layer``'s queries of every located sequence to its helper (step 1)."""
        calls = []
        for port in dict.fromkeys(s.port for s in self.spans):
            spans = [s for s in self.spans if s.port is port]
            queries = [
                AttentionQuery(s.request_id, q[s.rows], self.positions[s.rows], s.num_remote_tokens)
                for s in spans
            ]
            calls.append((port, spans, port.submit(layer, queries)))
        self._sent = (layer, calls)

    def attend_local(
        self,
        layer: int,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
    ) -> None:
        """Step 2: each located row's part over its local blocks (submitting ``layer``'s
        queries first unless ``submit`` did); ``merge`` completes the layer."""
        if self._sent is None or self._sent[0] != layer:
            self.submit(layer, q)
        assert self._sent is not None
        spans = [s for _, group, _ in self._sent[1] for s in group]
        self._local = (layer, self._local_parts(spans, q, k_cache, v_cache, scale))

    def merge(self, layer: int, out: torch.Tensor) -> None:
        """Step 3: wait for the helpers' parts of ``layer`` and write every located row's
        attention output into ``out``."""
        if self._sent is None or self._local is None or self._local[0] != layer:
            raise RuntimeError(f"layer {layer}: merge before its local parts")
        calls, local = self._sent[1], self._local[1]
        self._sent = self._local = None
        at = 0
        for port, group, future in calls:
            remote = wait(future, port, [s.request_id for s in group], self.timeout_s)
            near = concat_partials(local[at : at + len(group)])
            merged = merge_partials([near, concat_partials(remote)]).normalized()
            merged = merged.to(out.dtype)
            row = 0
            for span in group:
                out[span.rows] = merged[row : row + span.q_len]
                row += span.q_len
            at += len(group)

    def _local_parts(
        self,
        spans: list[LocatedSpan],
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
    ) -> list[PartialAttention]:
        """Each span's partial attention over its local blocks, in order. Decoding rows (one
        query after every local token) take one batched call; other spans one call each."""
        decoding = [i for i, s in enumerate(spans) if s.q_len == 1]
        batched: dict[int, PartialAttention] = {}
        if decoding:
            if self._decode_tables is None:  # the same every layer of the step
                rows = [spans[i] for i in decoding]
                tables = pad_sequence([s.block_table for s in rows], batch_first=True)
                lens = torch.tensor([s.ctx_len - s.num_remote_tokens for s in rows])
                index = torch.tensor([s.q_start for s in rows])
                self._decode_tables = (tables.to(q.device), lens.to(q.device), index)
            tables, lens, index = self._decode_tables
            batch = decode_partials(q[index], k_cache, v_cache, tables, lens, scale)
            batched = dict(zip(decoding, split_partials(batch, [1] * len(decoding)), strict=True))
        return [
            batched[i] if i in batched else self._local_part(span, q, k_cache, v_cache, scale)
            for i, span in enumerate(spans)
        ]

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
