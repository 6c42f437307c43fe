"""A sequence's KV leaving and arriving one layer at a time (DESIGN.md §3, hook 3).

Export (engine thread, or a layer hook during a step): ``export`` copies one layer of a request's
computed KV, or of a token range of it, as a tensor and its ``KVLayout``. Inside a hooked step
it covers the tokens the step is computing too (``step_tokens``), not only those before it.

Import, for a sequence whose KV was computed elsewhere (a prefill worker, a migration):

1. ``begin_import`` reserves blocks for the first ``num_kv_tokens`` tokens and parks the request;
2. ``import_kv`` writes one layer (any order), after checking its layout and fingerprint, where
   that layer runs: into the pool, or through the port of a stage run on a helper
   (kv_routes.py, which also moves the layers written so far when the layout switches);
3. ``finish_import`` joins the sequence to the running batch (Placement learns which of its
   layers are on a helper).

``restore`` writes a layer of KV into a *running* sequence's blocks for tokens it has already
computed: the layers of a layer migration coming back from the helper. ``export_tokens`` and
``restore_tokens`` do the same for token ranges of many sequences in many layers at once, a
delta that may start inside a block (a layer migration's copies both ways).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.common.errors import (
    InvalidRequestError,
    OutOfRangeError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from services.common.hashing import ROOT_HASH, BlockHash, hash_block
from services.common.kv_layout import KVLayout
from services.common.types import SamplingParams
from services.engine.block_manager import BlockManager
from services.engine.kv_cache import KVCache
from services.engine.kv_routes import ImportRoutes
from services.engine.placement import Placement
from services.engine.ports import StageSeq
from services.engine.requests import RequestState, RequestTable
from services.engine.scheduler import Scheduler
from services.engine.sequence import Sequence
from services.engine.tokenizer import IncrementalDetokenizer

NewRequest = Callable[[str, list[int], SamplingParams, int], RequestState]


class KVTransfer:
    def __init__(
        self,
        requests: RequestTable,
        block_manager: BlockManager,
        scheduler: Scheduler,
        kv_cache: KVCache,
        fingerprint: str,
        new_request: NewRequest,
    ) -> None:
        self.requests = requests
        self.block_manager = block_manager
        self.scheduler = scheduler
        self.kv_cache = kv_cache
        self.fingerprint = fingerprint
        self.new_request = new_request
        self.block_size = block_manager.block_size
        self.placement: Placement | None = None  # ``connect``
        self.max_num_seqs = 0
        # Request id -> tokens whose KV exists once the step in progress has run (hooked steps).
        self.step_tokens: dict[str, int] | None = None

    def connect(self, placement: Placement, max_num_seqs: int) -> None:
        """Where layers run (imports and exports follow it) and the running batch's limit."""
        self.placement, self.max_num_seqs = placement, max_num_seqs

    @property
    def routes(self) -> ImportRoutes:
        assert self.placement is not None, "connect() first"
        return self.placement.routes

    # -- export --------------------------------------------------------------------------

    def layout(
        self, request_id: str, layer: int, start_token: int = 0, end_token: int | None = None
    ) -> KVLayout:
        seq = self.requests.seq(request_id)
        num_tokens = seq.num_computed_tokens
        if self.step_tokens is not None:
            num_tokens = self.step_tokens.get(request_id, num_tokens)
        end = num_tokens if end_token is None else end_token
        if not 0 <= start_token <= end <= num_tokens:
            raise InvalidRequestError(f"tokens [{start_token}, {end}) of {num_tokens} computed")
        first = start_token // self.block_size
        if first < seq.num_remote_blocks:
            raise InvalidRequestError(
                f"blocks before {seq.num_remote_blocks} of {request_id} are held by a helper"
            )
        return KVLayout(
            self.fingerprint,
            layer,
            end,
            self.full_block_hashes(seq, end)[first:],
            self.kv_cache.dtype_name,
            self.block_size,
            self.kv_cache.num_kv_heads,
            self.kv_cache.head_dim,
            first,
        )

    def full_block_hashes(self, seq: Sequence, num_tokens: int) -> tuple[BlockHash, ...]:
        # Inside a hooked step the blocks this step fills are not committed yet; their hashes
        # are the ones commit_full_blocks will give them after the step.
        hashes = list(seq.block_hashes)
        parent = hashes[-1] if hashes else ROOT_HASH
        for i in range(len(hashes), num_tokens // self.block_size):
            parent = hash_block(parent, seq.block_tokens(i), self.fingerprint)
            hashes.append(parent)
        return tuple(hashes[: num_tokens // self.block_size])

    def export(
        self, request_id: str, layer: int, start_token: int = 0, end_token: int | None = None
    ) -> tuple[torch.Tensor, KVLayout]:
        assert self.placement is not None, "connect() first"
        if layer in self.placement.missing(request_id):
            raise InvalidRequestError(
                f"layer {layer} of {request_id} is on a helper: Engine.export_kv_async"
            )
        layout = self.layout(request_id, layer, start_token, end_token)
        blocks = self._blocks(self.requests.seq(request_id), layout)
        return self.kv_cache.export_layer(layer, blocks, layout), layout

    def read_cached_blocks(
        self,
        groups: list[list[tuple[BlockHash, tuple[int, ...]]]],
        outs: list[torch.Tensor],
        num_layers: int,
    ) -> bool:
        """Every layer's KV of each group of prefix-cached blocks (hash, tokens) into its
        ``outs`` tensor (``KVCache.gather_blocks``): a store write-back's payload. False, with
        nothing written, if a block is no longer cached here or some of the model's
        ``num_layers`` layers run elsewhere."""
        if self.kv_cache.layers != range(num_layers):
            return False
        ids = [self.block_manager.cached_block_ids(group) for group in groups]
        if any(group_ids is None for group_ids in ids):
            return False
        for group_ids, out in zip(ids, outs, strict=True):
            self.kv_cache.gather_blocks(group_ids, out)  # type: ignore[arg-type]
        return True

    def export_tokens(self, spans: list[StageSeq], layers: range) -> torch.Tensor:
        """Tokens ``[start, end)`` of each span's sequence in every layer of ``layers``, packed
        span after span: ``KVCache.gather_tokens``'s tensor. A delta that starts inside a block
        carries its tokens only (a layer migration's copy stages and switch)."""
        return self.kv_cache.gather_tokens(layers, self._token_slots(spans, layers, False))

    def _token_slots(self, spans: list[StageSeq], layers: range, restore: bool) -> torch.Tensor:
        """The pool slots of the spans' tokens, each checked: computed, in the local blocks,
        and (export) every layer of ``layers`` here or (restore) the sequence running."""
        assert self.placement is not None, "connect() first"
        slots: list[int] = []
        for span in spans:
            if restore and span.request_id not in self.requests.active:
                raise RequestNotFoundError(f"no running request {span.request_id!r}")
            seq = self.requests.seq(span.request_id)
            if not restore and set(layers) & set(self.placement.missing(span.request_id)):
                raise InvalidRequestError(f"layers of {span.request_id} are on a helper")
            first = seq.num_remote_blocks * self.block_size
            if not first <= span.start <= span.end <= seq.num_computed_tokens:
                raise InvalidRequestError(
                    f"tokens [{span.start}, {span.end}) of {span.request_id}: tokens "
                    f"[{first}, {seq.num_computed_tokens}) are here"
                )
            # the local block table starts at the first block a helper does not hold
            slots += self.kv_cache.slots(seq.block_table, span.start - first, span.end - first)
        return torch.tensor(slots, dtype=torch.long, device=self.kv_cache.device)

    @staticmethod
    def _blocks(seq: Sequence, layout: KVLayout) -> list[int]:
        first = layout.first_block - seq.num_remote_blocks
        return seq.block_table[first : first + layout.num_blocks]

    # -- import --------------------------------------------------------------------------

    def begin_import(
        self,
        request_id: str,
        token_ids: list[int],
        num_prompt_tokens: int,
        num_kv_tokens: int,
        params: SamplingParams,
        reuse_cached: bool = False,
    ) -> int:
        """Returns how many leading blocks the import reuses from this engine's prefix cache
        (``reuse_cached``; 0 otherwise): its KV then starts at that block (``first_block``)."""
        # The imported KV plus the token computed next must fit the context, so the longest
        # prompt a prefill worker accepts (max_model_len - 1 tokens) imports with its first
        # token; a sequence longer than that would have finished where it came from.
        self.requests.check_vocab(token_ids)
        if len(token_ids) > self.requests.max_model_len:
            raise OutOfRangeError(
                f"sequence has {len(token_ids)} tokens; this model's context is "
                f"{self.requests.max_model_len} tokens"
            )
        if not 0 < num_prompt_tokens <= len(token_ids):
            raise InvalidRequestError(
                f"num_prompt_tokens must be in [1, {len(token_ids)}], got {num_prompt_tokens}"
            )
        if not 0 < num_kv_tokens < len(token_ids):
            raise InvalidRequestError(
                f"num_kv_tokens must be in [1, {len(token_ids) - 1}], got {num_kv_tokens}"
            )
        request = self.new_request(request_id, list(token_ids), params, num_prompt_tokens)
        seq = request.seq
        if len(self.scheduler.running) + len(self.requests.importing) >= self.max_num_seqs:
            raise ResourceExhaustedError(f"already running {self.max_num_seqs} sequences")
        hits = self._reusable_prefix(seq, num_kv_tokens) if reuse_cached else []
        if not self.block_manager.can_admit(seq, hits, num_kv_tokens - len(hits) * self.block_size):
            raise ResourceExhaustedError(
                f"{seq.blocks_needed(num_kv_tokens) - len(hits)} KV blocks needed, "
                f"{self.block_manager.num_free_blocks} free"
            )
        self.block_manager.admit(seq, hits)
        self.block_manager.append(seq, num_kv_tokens - seq.num_computed_tokens)
        seq.num_computed_tokens = num_kv_tokens
        seq.num_cached_tokens = 0  # usage counts prompt tokens not computed; these were, elsewhere
        self.routes.begin(seq, len(hits))
        request.detokenizer.add(seq.output_token_ids)
        request.num_emitted_chars = len(request.detokenizer.text)
        self.requests.importing[request_id] = request
        return len(hits)

    def _reusable_prefix(self, seq: Sequence, num_kv_tokens: int) -> list[int]:
        """The cached blocks holding the longest prefix of the imported tokens, leaving the
        block of the last one to come (a transfer carries at least one block). Nothing while some
        layers run on a helper: the cache is paused then (block_manager.py), and an import's
        layers there must arrive whole (kv_routes.py)."""
        hits = self.block_manager.find_cached_prefix(seq)
        return hits[: (num_kv_tokens - 1) // self.block_size]

    def import_kv(self, request_id: str, data: torch.Tensor, layout: KVLayout) -> None:
        request = self.requests.importing.get(request_id)
        if request is None:
            raise RequestNotFoundError(f"no import in progress for {request_id!r}")
        seq = request.seq
        if layout.fingerprint != self.fingerprint:
            raise InvalidRequestError("KV was computed by a different model or dtype")
        if layout.num_tokens != seq.num_computed_tokens:
            raise InvalidRequestError(
                f"KV covers {layout.num_tokens} tokens, {seq.num_computed_tokens} were reserved"
            )
        self.routes.write(seq, data, layout)  # checks layout.first_block against the import

    def finish_import(self, request_id: str) -> RequestState:
        """Join an imported sequence to the running batch."""
        request = self.requests.importing.pop(request_id, None)
        if request is None:
            raise RequestNotFoundError(f"no import in progress for {request_id!r}")
        self.scheduler.join_running(request.seq)
        self.requests.active[request_id] = request
        assert self.placement is not None, "connect() first"
        if self.placement.joined(request.seq):  # not sent to recompute: its KV is whole
            self.block_manager.commit_full_blocks(request.seq)
        return request

    def begin_prompt_import(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        reuse_cached: bool = False,
    ) -> int:
        """``begin_import`` of a prompt's KV before its first token exists.

        A decode worker reserves blocks while the prefill worker still computes, so the first
        token (sampled after the last layer) arrives only at ``finish_prompt_import``; until
        then a placeholder stands in for it, which reserves the room it needs in the context.
        Returns the number of leading blocks reused from the prefix cache (``begin_import``).
        """
        self.requests.check_prompt(prompt_token_ids)  # its messages speak of the prompt
        n = len(prompt_token_ids)
        return self.begin_import(request_id, [*prompt_token_ids, 0], n, n, params, reuse_cached)

    def finish_prompt_import(
        self, request_id: str, first_token_id: int, vocab_size: int
    ) -> RequestState:
        """``finish_import`` of a ``begin_prompt_import`` sequence: its placeholder token goes
        and the detokenizer restarts, so the first token's output is a prefill step's."""
        request = self.requests.importing.get(request_id)
        if request is None:
            raise RequestNotFoundError(f"no import in progress for {request_id!r}")
        if not 0 <= first_token_id < vocab_size:
            raise InvalidRequestError(
                f"first token id {first_token_id} outside the vocabulary [0, {vocab_size})"
            )
        request.seq.token_ids.pop()  # the placeholder
        request.detokenizer = IncrementalDetokenizer(self.requests.tokenizer)
        request.num_emitted_chars = 0
        return self.finish_import(request_id)

    def restore_tokens(self, spans: list[StageSeq], layers: range, data: torch.Tensor) -> None:
        """Write ``export_tokens``'s tensor back into running sequences' blocks, for tokens
        each has computed: a layer migration's layers coming back from the helper."""
        self.kv_cache.scatter_tokens(layers, self._token_slots(spans, layers, True), data)

    def restore(self, request_id: str, data: torch.Tensor, layout: KVLayout) -> None:
        """Write a layer of KV for tokens a running sequence already computed."""
        request = self.requests.active.get(request_id)
        if request is None:
            raise RequestNotFoundError(f"no running request {request_id!r}")
        seq = request.seq
        if layout.fingerprint != self.fingerprint:
            raise InvalidRequestError("KV was computed by a different model or dtype")
        if (
            layout.num_tokens > seq.num_computed_tokens
            or layout.first_block < seq.num_remote_blocks
        ):
            raise InvalidRequestError(
                f"KV of tokens [{layout.first_token}, {layout.num_tokens}) does not lie in the "
                f"{seq.num_computed_tokens} local tokens of {request_id}"
            )
        expected = self.full_block_hashes(seq, layout.num_tokens)[layout.first_block :]
        if layout.block_hashes and layout.block_hashes != expected:
            raise InvalidRequestError(f"KV is not of {request_id}'s blocks")
        self.kv_cache.import_layer(self._blocks(seq, layout), data, layout)
