"""Paged attention over the KV cache, and the partial-attention hook.

Every layer of a step first writes the new tokens' K/V into their cache slots,
then attends: decoding sequences (one query each) in one batched call over
their gathered blocks, prefilling sequences one by one with a causal mask that
is offset by the context they already have.

Partial attention (DESIGN.md §3, hook 2): attention over a chosen subset of a
sequence's blocks returns the *unnormalised* output ``O = sum_j e^(s_j - m) v_j``
with the row max ``m`` and denominator ``l = sum_j e^(s_j - m)``, so results
computed in different places merge exactly with ``merge_partials``.

GQA is handled by grouping query heads under their KV head
(``[kv_heads, group * q_len, head_dim]``), so K/V are never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from services.engine import paged_decode

if TYPE_CHECKING:
    from services.engine.located_attention import LocatedBatch


@dataclass
class PrefillSpan:
    """One sequence's rows in a flattened step: ``q_len`` new tokens after ``ctx_len - q_len``."""

    q_start: int
    q_len: int
    ctx_len: int
    block_table: torch.Tensor  # [blocks needed for ctx_len]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of each new token
    prefills: list[PrefillSpan]
    # Decode rows (one token each), batched:
    decode_rows: torch.Tensor | None = None  # [B] row of each decode token in the step, ascending
    decode_blocks: torch.Tensor | None = None  # [B * max_blocks] block ids, padded
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] True = attend
    decode_lens: torch.Tensor | None = None  # [B] context length of each decode row
    # Sequences with blocks on a helper: in neither list above (located_attention.py).
    located: LocatedBatch | None = None

    @property
    def num_decodes(self) -> int:
        return 0 if self.decode_rows is None else int(self.decode_rows.numel())


@dataclass
class PartialAttention:
    out: torch.Tensor  # [q_len, heads, head_dim], unnormalised
    max: torch.Tensor  # [q_len, heads]
    denom: torch.Tensor  # [q_len, heads]

    def normalized(self) -> torch.Tensor:
        return self.out / self.denom.unsqueeze(-1)


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Store new K/V ``[tokens, kv_heads, head_dim]`` into a layer's paged cache."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """``[len(block_ids) * block_size, kv_heads, head_dim]``, contiguous."""
    return cache.index_select(0, block_ids).flatten(0, 1)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention output ``[tokens, heads, head_dim]`` for a step's queries ``q``."""
    if 0 < meta.num_decodes == q.shape[0]:  # decodes only: their rows are q's, in order
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    for span in meta.prefills:
        rows = slice(span.q_start, span.q_start + span.q_len)
        k = gather_blocks(k_cache, span.block_table)[: span.ctx_len]
        v = gather_blocks(v_cache, span.block_table)[: span.ctx_len]
        if paged_decode.supports_prefill(q, k):  # ~3x SDPA's flash kernel (float32 and bf16)
            paged_decode.prefill(q[rows], k, v, scale, out[rows])
        else:
            out[rows] = _prefill_attention(q[rows], k, v, scale)
    if meta.num_decodes:
        out[meta.decode_rows] = _decode_attention(
            q[meta.decode_rows], k_cache, v_cache, meta, scale
        )
    return out


def _group(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[n, heads, d]`` -> ``[kv_heads, group * n, d]`` (query heads under their KV head)."""
    n, heads, d = q.shape
    return (
        q.view(n, num_kv_heads, heads // num_kv_heads, d)
        .permute(1, 2, 0, 3)
        .reshape(num_kv_heads, -1, d)
    )


def _ungroup(o: torch.Tensor, n: int) -> torch.Tensor:
    kv_heads, gn, d = o.shape
    return o.view(kv_heads, gn // n, n, d).permute(2, 0, 1, 3).reshape(n, -1, d)


def _prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    # 4-D inputs with enable_gqa take torch's CPU flash kernel; 3-D ones fall back to
    # the math path, which is 3-10x slower. With no earlier context, the causal mask
    # is the kernel's own (top-left aligned); after a cached prefix or an earlier
    # chunk the diagonal is offset by the context already there.
    n, ctx = q.shape[0], k.shape[0]
    q4, k4, v4 = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if n == ctx:
        o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)
    else:
        q_pos = torch.arange(ctx - n, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=mask[None, None], scale=scale, enable_gqa=True
        )
    return o[0].transpose(0, 1)


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    b, heads, d = q.shape
    if paged_decode.supports(q, k_cache):
        # Reads each sequence's blocks where they lie: no gathered copy, no padding.
        lens = meta.decode_lens
        if lens is None:
            lens = meta.decode_mask.view(b, -1).sum(-1)
        tables = meta.decode_blocks.view(b, -1)
        return paged_decode.decode(q, k_cache, v_cache, tables, lens, scale)
    kv_heads = k_cache.shape[2]
    k = k_cache.index_select(0, meta.decode_blocks).view(b, -1, kv_heads, d).transpose(1, 2)
    v = v_cache.index_select(0, meta.decode_blocks).view(b, -1, kv_heads, d).transpose(1, 2)
    qg = q.view(b, kv_heads, heads // kv_heads, d)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=meta.decode_mask, scale=scale)
    return o.reshape(b, heads, d)


# -- hook 2: partial attention ----------------------------------------------------------


def partial_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_positions: torch.Tensor,
    scale: float,
) -> PartialAttention:
    """Unnormalised attention of ``q`` ``[n, heads, d]`` over keys ``[s, kv_heads, d]``.

    Causality comes from the absolute positions: query i sees key j iff
    ``kv_positions[j] <= q_positions[i]``. A row that sees no key gets
    ``max = -inf``, ``denom = 0`` and a zero output, which merges as "nothing".
    """
    n, heads, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qg = _group(q, kv_heads).float()
    scores = torch.matmul(qg, k.float().transpose(0, 1).transpose(1, 2)) * scale
    visible = (kv_positions[None, :] <= q_positions[:, None]).repeat(group, 1)
    scores = scores.masked_fill(~visible, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    o = torch.matmul(p, v.float().transpose(0, 1))
    return PartialAttention(
        out=_ungroup(o, n),
        max=_ungroup(m, n).squeeze(-1),
        denom=_ungroup(p.sum(-1, keepdim=True), n).squeeze(-1),
    )


def decode_partials(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> PartialAttention:
    """Partial attention of one query row per sequence, ``q`` ``[b, heads, d]``, over the first
    ``lens[i]`` tokens of the blocks ``tables[i]`` (int64 ``[b, max_blocks]``, padded), every
    one of them visible: a decoding token comes after all the tokens of those blocks.

    One call of the paged decode kernel for the whole batch where it runs: its normalised output
    with ``max`` = the row's log-sum-exp and ``denom`` = 1 is the same partial result (the
    merge weighs it by ``exp(lse - m)``). Elsewhere ``partial_attention`` row by row."""
    if paged_decode.supports(q, k_cache):
        out, lse = paged_decode.decode_lse(q, k_cache, v_cache, tables, lens, scale)
        return PartialAttention(out=out.float(), max=lse, denom=torch.ones_like(lse))
    parts = []
    block_size = k_cache.shape[1]
    for i, n in enumerate(lens.tolist()):
        ids = tables[i, : -(-n // block_size)]
        k, v = gather_blocks(k_cache, ids)[:n], gather_blocks(v_cache, ids)[:n]
        at = torch.tensor([n], device=q.device)
        parts.append(
            partial_attention(q[i : i + 1], at, k, v, torch.arange(n, device=q.device), scale)
        )
    return concat_partials(parts)


def concat_partials(parts: list[PartialAttention]) -> PartialAttention:
    """Row-wise concatenation of one or more partial results."""
    if len(parts) == 1:
        return parts[0]
    return PartialAttention(
        out=torch.cat([p.out for p in parts]),
        max=torch.cat([p.max for p in parts]),
        denom=torch.cat([p.denom for p in parts]),
    )


def split_partials(part: PartialAttention, sizes: list[int]) -> list[PartialAttention]:
    """The inverse of ``concat_partials``: views of ``sizes`` consecutive rows each."""
    out, at = [], 0
    for n in sizes:
        rows = slice(at, at + n)
        out.append(PartialAttention(part.out[rows], part.max[rows], part.denom[rows]))
        at += n
    return out


def merge_partials(parts: list[PartialAttention]) -> PartialAttention:
    """Exact log-sum-exp merge: ``m = max m_i``, ``O = sum e^(m_i-m) O_i``, ``l = sum e^(m_i-m) l_i``."""
    if not parts:
        raise ValueError("merge_partials needs at least one partial result")
    m = torch.stack([p.max for p in parts]).amax(dim=0)
    safe_m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    out = torch.zeros_like(parts[0].out)
    denom = torch.zeros_like(parts[0].denom)
    for p in parts:
        w = torch.exp(p.max - safe_m)
        out += w.unsqueeze(-1) * p.out
        denom += w * p.denom
    return PartialAttention(out=out, max=m, denom=denom)
