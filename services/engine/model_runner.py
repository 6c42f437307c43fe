"""Turns a scheduled batch into tensors, runs the model and returns logits.

A step is flattened: every scheduled sequence contributes its new tokens
(one for a decoding sequence, a chunk for a prefilling one) to one
``[num_tokens]`` input. Logits are computed only for the rows whose sequence
has all its tokens computed after this step, i.e. the ones that sample.

A step may be gated: ``before_layer(i)`` runs before layer ``i`` starts and may
block until KV that layer reads is in place (a prefix arriving layer by layer)
or raise to abandon the step. Ungated steps run the model in one call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.engine.attention import AttentionMetadata, PrefillSpan
from services.engine.kv_cache import KVCache
from services.engine.models.llama import LlamaForCausalLM, OnLayerDone
from services.engine.scheduler import ScheduledBatch

BeforeLayer = Callable[[int], None]


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # rows whose logits are needed
    sample_seq_index: list[int]  # index into the batch of each sampled row


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, device: str = "cpu") -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = torch.device(device)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillSpan] = []
        decodes: list[tuple[int, int, list[int]]] = []  # row, ctx_len, block table
        sample_rows: list[int] = []
        sample_index: list[int] = []
        bs = self.block_size
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            row, start, ctx = len(ids), seq.num_computed_tokens, seq.num_computed_tokens + n
            ids += seq.token_ids[start:ctx]
            positions += range(start, ctx)
            table = seq.block_table[: seq.blocks_needed(ctx)]
            slots += [table[p // bs] * bs + p % bs for p in range(start, ctx)]
            if n == 1:
                decodes.append((row, ctx, table))
            else:
                prefills.append(PrefillSpan(row, n, ctx, self._tensor(table)))
            if ctx == seq.num_tokens:
                sample_rows.append(row + n - 1)
                sample_index.append(i)
        meta = AttentionMetadata(slot_mapping=self._tensor(slots), prefills=prefills)
        if decodes:
            self._add_decodes(meta, decodes)
        return StepInputs(
            self._tensor(ids),
            self._tensor(positions),
            meta,
            self._tensor(sample_rows),
            sample_index,
        )

    def _add_decodes(
        self, meta: AttentionMetadata, decodes: list[tuple[int, int, list[int]]]
    ) -> None:
        width = max(len(table) for _, _, table in decodes)
        padded = [table + [0] * (width - len(table)) for _, _, table in decodes]
        ctx = self._tensor([c for _, c, _ in decodes])
        meta.decode_rows = self._tensor([r for r, _, _ in decodes])
        meta.decode_blocks = self._tensor(padded).flatten()
        span = torch.arange(width * self.block_size, device=self.device)
        meta.decode_mask = (span[None, :] < ctx[:, None])[:, None, None, :]

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def run(
        self,
        inputs: StepInputs,
        on_layer_done: OnLayerDone | None = None,
        before_layer: BeforeLayer | None = None,
    ) -> torch.Tensor:
        """Logits ``[len(sample_rows), vocab]``, in the model's dtype, for the rows that sample.

        ``before_layer(i)`` (a prefix fetch's gate) runs before layer ``i`` reads the cache."""
        hidden = self.model(
            inputs.input_ids,
            inputs.positions,
            self.kv_cache,
            inputs.meta,
            on_layer_done,
            before_layer,
        )
        return self.model.compute_logits(hidden[inputs.sample_rows])
