"""The engine: requests in, tokens out, one scheduled step at a time.

Lifecycle of a request:
1. ``add_request`` validates it and queues a WAITING sequence;
2. each ``step`` schedules a batch, runs the model once, samples a token for
   every sequence whose tokens are all computed, and reports new tokens and text;
3. a request leaves when it finishes (stop token, stop string, max_tokens,
   context limit) or is aborted; its blocks go back to the pool either way.

KV can also arrive from elsewhere (a prefill worker, a migration):
``begin_import`` reserves blocks, ``import_kv`` fills them one layer at a time,
``finish_import`` joins the sequence to the running batch (hook 3).

A prompt prefix can arrive from a remote store while its suffix computes:
``add_request_with_prefix`` reserves blocks for the prefix and returns a ``PrefixFetch``;
the fetcher calls ``write_prefix_layer`` per layer from any thread, and a step waits
before each layer until that layer of the prefix is in place (prefix_fetch.py). If a
fetch fails, ``step`` raises ``PrefixFetchError`` having kept nothing, and the caller
``recompute_prefix``es (or aborts) the request.

KV can leave while a step computes: ``step(on_layer_done=hook)`` calls
``hook(layer, ctx)`` after each layer, and ``export_kv`` inside the hook covers
the tokens this step is computing (``ctx.num_tokens``), not only those computed
before it. The hook runs on the stepping thread; exports are copies, so they may
be sent from another thread while the next layers compute.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch

from services.common.config import EngineConfig
from services.common.errors import (
    ConfigError,
    InvalidRequestError,
    OutOfRangeError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from services.common.hashing import ROOT_HASH, BlockHash, block_hashes, hash_block
from services.common.types import FinishReason, RequestOutput, SamplingParams
from services.engine.attention import (
    PartialAttention,
    gather_blocks,
    partial_attention,
)
from services.engine.block_manager import BlockManager
from services.engine.kv_cache import KVCache, KVLayout
from services.engine.model_runner import ModelRunner, StepInputs
from services.engine.models.loader import DTYPES, load_model
from services.engine.models.prepare import resolve_model
from services.engine.prefix_fetch import (
    DEFAULT_LAYER_TIMEOUT_S,
    PrefixFetch,
    fetch_error,
    wait_for_layer,
)
from services.engine.sampler import Sampler
from services.engine.scheduler import ScheduledBatch, Scheduler
from services.engine.sequence import Sequence
from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer

Prompt = str | list[int]
LogitsHook = Callable[[list[Sequence], torch.Tensor], None]


@dataclass(frozen=True)
class StepContext:
    """The step in progress, as a layer hook sees it."""

    # Request id -> tokens whose KV exists once every layer of this step has run.
    num_tokens: dict[str, int]
    # Requests whose tokens are all computed after this step (they sample a token).
    sampling: tuple[str, ...]


LayerDoneHook = Callable[[int, StepContext], None]


@dataclass(eq=False)
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop_ids: frozenset[int]
    num_emitted_chars: int = 0


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0


class Engine:
    def __init__(self, config: EngineConfig, logits_hook: LogitsHook | None = None) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        path = resolve_model(config.model)
        loaded = load_model(path, config.dtype, config.device)
        self.model, self.spec, self.fingerprint = loaded.model, loaded.spec, loaded.fingerprint
        self.tokenizer = Tokenizer(path)
        num_blocks = config.num_kv_blocks or config.kv_cache_bytes // KVCache.bytes_per_block(
            self.spec.num_layers,
            config.block_size,
            self.spec.num_kv_heads,
            self.spec.head_dim,
            DTYPES[config.dtype],
        )
        self.max_model_len = self._max_model_len(num_blocks)
        self.kv_cache = KVCache(
            self.spec.num_layers,
            num_blocks,
            config.block_size,
            self.spec.num_kv_heads,
            self.spec.head_dim,
            DTYPES[config.dtype],
            config.device,
        )
        self.block_manager = BlockManager(
            num_blocks, config.block_size, self.fingerprint, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            on_preempt=lambda seq: self._cancel_fetch(seq.request_id, "preempted"),
        )
        self.runner = ModelRunner(self.model, self.kv_cache, config.device)
        self.sampler = Sampler()
        self.logits_hook = logits_hook
        eos = set(self.spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._requests: dict[str, _Request] = {}
        self._importing: dict[str, _Request] = {}
        # Prefix fetches not yet settled; read (never changed) by fetcher threads.
        self._fetches: dict[str, PrefixFetch] = {}
        self._arrivals = itertools.count()
        self._step: StepContext | None = None  # set only while a hooked step runs

    def _max_model_len(self, num_blocks: int) -> int:
        limit = self.spec.max_position_embeddings
        if self.spec.sliding_window:
            limit = min(limit, self.spec.sliding_window)
        requested = self.config.max_model_len
        if requested is not None and requested > limit:
            raise ConfigError(f"max_model_len {requested} exceeds the model's limit {limit}")
        capacity = num_blocks * self.config.block_size
        if requested is not None and requested > capacity:
            raise ConfigError(f"max_model_len {requested} exceeds the KV pool ({capacity} tokens)")
        return min(requested or limit, capacity)

    # -- requests --------------------------------------------------------------------------

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)
        return list(prompt)

    def check_prompt(self, token_ids: list[int]) -> None:
        """Raise what ``add_request`` would for this prompt; reads no request state."""
        self._check_prompt(token_ids)

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        self._check_vocab(token_ids)
        if len(token_ids) >= self.max_model_len:
            raise OutOfRangeError(
                f"prompt has {len(token_ids)} tokens; this model serves at most "
                f"{self.max_model_len - 1} prompt tokens"
            )

    def _check_vocab(self, token_ids: list[int]) -> None:
        vocab = self.spec.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} outside the vocabulary [0, {vocab})")

    def _new_request(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        num_prompt_tokens: int | None = None,
    ) -> _Request:
        if request_id in self._requests or request_id in self._importing:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(
            request_id,
            token_ids,
            params,
            self.config.block_size,
            num_prompt_tokens=num_prompt_tokens or len(token_ids),
            arrival=next(self._arrivals),
        )
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        return _Request(seq, IncrementalDetokenizer(self.tokenizer), frozenset(stop_ids))

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams, chat: bool = False
    ) -> None:
        token_ids = self.encode(prompt, chat)
        self._check_prompt(token_ids)
        request = self._new_request(request_id, token_ids, params)
        self._requests[request_id] = request
        self.scheduler.add(request.seq)

    def abort(self, request_id: str) -> RequestOutput:
        request = self._requests.pop(request_id, None) or self._importing.pop(request_id, None)
        if request is None:
            raise RequestNotFoundError(f"no request {request_id!r}")
        request.seq.finish_reason = FinishReason.ABORT
        self._cancel_fetch(request_id, "aborted")
        self.scheduler.finish(request.seq)
        return RequestOutput(
            request_id,
            [],
            "",
            True,
            FinishReason.ABORT,
            request.seq.num_prompt_tokens,
            request.seq.num_cached_tokens,
        )

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # -- stepping --------------------------------------------------------------------------

    def step(self, on_layer_done: LayerDoneHook | None = None) -> list[RequestOutput]:
        if self._fetches:
            self._settle_fetches()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        inputs = self.runner.prepare(batch)
        sampled = [batch.seqs[i] for i in inputs.sample_seq_index]
        logits = self._run(batch, inputs, sampled, on_layer_done)
        if self.logits_hook is not None:
            self.logits_hook(sampled, logits.float())
        tokens = self.sampler(
            logits, [s.params for s in sampled], [s.num_output_tokens for s in sampled]
        )
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.commit_full_blocks(seq)
        return [
            self._append_token(self._requests[seq.request_id], token)
            for seq, token in zip(sampled, tokens, strict=True)
        ]

    def _run(
        self,
        batch: ScheduledBatch,
        inputs: StepInputs,
        sampled: list[Sequence],
        on_layer_done: LayerDoneHook | None,
    ) -> torch.Tensor:
        """The model over ``batch``, each layer waiting for the prefix KV it reads.

        Raises ``PrefixFetchError`` if that KV fails to arrive. Nothing is advanced or sampled
        then: the batch keeps the blocks it was scheduled with and the next step recomputes
        the same tokens, overwriting the KV slots this one wrote past ``num_computed_tokens``.
        """
        fetches = self._pending_fetches(batch) if self._fetches else ()
        gate = partial(wait_for_layer, fetches) if fetches else None
        if on_layer_done is None:
            logits = self.runner.run(inputs, before_layer=gate)
        else:
            pairs = zip(batch.seqs, batch.num_new_tokens, strict=True)
            ctx = StepContext(
                {s.request_id: s.num_computed_tokens + n for s, n in pairs},
                tuple(s.request_id for s in sampled),
            )
            self._step = ctx
            try:
                logits = self.runner.run(inputs, lambda layer: on_layer_done(layer, ctx), gate)
            finally:
                self._step = None
        for fetch in fetches:  # every layer arrived: the step's commit hashes the blocks
            self._fetches.pop(fetch.request_id, None)
        return logits

    def _pending_fetches(self, batch: ScheduledBatch) -> tuple[PrefixFetch, ...]:
        return tuple(
            self._fetches[s.request_id] for s in batch.seqs if s.request_id in self._fetches
        )

    def _append_token(self, request: _Request, token: int) -> RequestOutput:
        seq = request.seq
        seq.token_ids.append(token)
        if seq.params.detokenize:
            request.detokenizer.add([token])
        reason = self._finish_reason(request, token)
        text = request.detokenizer.text
        if reason is None:
            # Hold back what could be the start of a stop string.
            hold = max((len(s) - 1 for s in seq.params.stop), default=0)
            end = max(request.num_emitted_chars, len(text) - hold)
        else:
            end = self._stop_string_end(request, text) if seq.params.stop else len(text)
            self._finish(request, reason)
        delta = text[request.num_emitted_chars : end]
        request.num_emitted_chars = end
        return RequestOutput(
            seq.request_id,
            [token],
            delta,
            reason is not None,
            reason,
            seq.num_prompt_tokens,
            seq.num_cached_tokens,
        )

    def _finish_reason(self, request: _Request, token: int) -> FinishReason | None:
        seq = request.seq
        if token in request.stop_ids:
            return FinishReason.STOP
        if seq.params.stop and any(s in request.detokenizer.text for s in seq.params.stop):
            return FinishReason.STOP
        if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _stop_string_end(request: _Request, text: str) -> int:
        found = [text.find(s) for s in request.seq.params.stop if s in text]
        return min(found, default=len(text))

    def _finish(self, request: _Request, reason: FinishReason) -> None:
        request.seq.finish_reason = reason
        self.scheduler.finish(request.seq)
        del self._requests[request.seq.request_id]

    # -- convenience -----------------------------------------------------------------------

    def stream(
        self, prompt: Prompt, params: SamplingParams, request_id: str = "stream", chat: bool = False
    ) -> Iterator[RequestOutput]:
        """Run one request to completion, yielding its outputs as they are produced."""
        self.add_request(request_id, prompt, params, chat)
        try:
            while request_id in self._requests:
                yield from (o for o in self.step() if o.request_id == request_id)
        finally:
            if request_id in self._requests:
                self.abort(request_id)

    def generate(
        self,
        prompts: list[Prompt],
        params: SamplingParams | list[SamplingParams],
        chat: bool = False,
    ) -> list[Completion]:
        """Run every prompt to completion in one continuous batch; results in prompt order."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        base = next(self._arrivals)
        results = {}
        for i, (prompt, p) in enumerate(zip(prompts, all_params, strict=True)):
            rid = f"generate-{base}-{i}"
            self.add_request(rid, prompt, p, chat)
            seq = self._requests[rid].seq
            results[rid] = Completion(rid, list(seq.token_ids))
        while any(rid in self._requests for rid in results):
            for out in self.step():
                done = results.get(out.request_id)
                if done is not None:
                    done.token_ids += out.new_token_ids
                    done.text += out.text_delta
                    done.finish_reason = out.finish_reason
                    done.num_cached_tokens = out.num_cached_tokens
        return list(results.values())

    # -- hook 3: per-layer KV export / import -----------------------------------------------

    def _seq(self, request_id: str) -> Sequence:
        request = self._requests.get(request_id) or self._importing.get(request_id)
        if request is None:
            raise RequestNotFoundError(f"no request {request_id!r}")
        return request.seq

    def kv_layout(self, request_id: str, layer: int) -> KVLayout:
        seq = self._seq(request_id)
        num_tokens = seq.num_computed_tokens
        if self._step is not None:
            num_tokens = self._step.num_tokens.get(request_id, num_tokens)
        return KVLayout(
            self.fingerprint,
            layer,
            num_tokens,
            self._full_block_hashes(seq, num_tokens),
            self.kv_cache.dtype_name,
            self.config.block_size,
            self.spec.num_kv_heads,
            self.spec.head_dim,
        )

    def _full_block_hashes(self, seq: Sequence, num_tokens: int) -> tuple[BlockHash, ...]:
        # Inside a hooked step the blocks this step fills are not committed yet; their hashes
        # are the ones commit_full_blocks will give them after the step.
        hashes = list(seq.block_hashes)
        parent = hashes[-1] if hashes else ROOT_HASH
        for i in range(len(hashes), num_tokens // self.config.block_size):
            parent = hash_block(parent, seq.block_tokens(i), self.fingerprint)
            hashes.append(parent)
        return tuple(hashes)

    def export_kv(self, request_id: str, layer: int) -> tuple[torch.Tensor, KVLayout]:
        """One layer of a request's computed KV, as a tensor and its layout."""
        layout = self.kv_layout(request_id, layer)
        seq = self._seq(request_id)
        return self.kv_cache.export_layer(
            layer, seq.block_table[: layout.num_blocks], layout
        ), layout

    def begin_import(
        self,
        request_id: str,
        token_ids: list[int],
        num_prompt_tokens: int,
        num_kv_tokens: int,
        params: SamplingParams,
    ) -> None:
        """Reserve blocks for a sequence whose first ``num_kv_tokens`` tokens' KV will be imported."""
        # The imported KV plus the token computed next must fit the context, so the longest
        # prompt a prefill worker accepts (max_model_len - 1 tokens) imports with its first
        # token; a sequence longer than that would have finished where it came from.
        self._check_vocab(token_ids)
        if len(token_ids) > self.max_model_len:
            raise OutOfRangeError(
                f"sequence has {len(token_ids)} tokens; this model's context is "
                f"{self.max_model_len} tokens"
            )
        if not 0 < num_prompt_tokens <= len(token_ids):
            raise InvalidRequestError(
                f"num_prompt_tokens must be in [1, {len(token_ids)}], got {num_prompt_tokens}"
            )
        if not 0 < num_kv_tokens < len(token_ids):
            raise InvalidRequestError(
                f"num_kv_tokens must be in [1, {len(token_ids) - 1}], got {num_kv_tokens}"
            )
        request = self._new_request(request_id, list(token_ids), params, num_prompt_tokens)
        seq = request.seq
        if len(self.scheduler.running) + len(self._importing) >= self.config.max_num_seqs:
            raise ResourceExhaustedError(f"already running {self.config.max_num_seqs} sequences")
        if not self.block_manager.can_append(seq, num_kv_tokens):
            raise ResourceExhaustedError(
                f"{seq.blocks_needed(num_kv_tokens)} KV blocks needed, "
                f"{self.block_manager.num_free_blocks} free"
            )
        self.block_manager.append(seq, num_kv_tokens)
        seq.num_computed_tokens = num_kv_tokens
        request.detokenizer.add(seq.output_token_ids)
        request.num_emitted_chars = len(request.detokenizer.text)
        self._importing[request_id] = request

    def import_kv(self, request_id: str, data: torch.Tensor, layout: KVLayout) -> None:
        request = self._importing.get(request_id)
        if request is None:
            raise RequestNotFoundError(f"no import in progress for {request_id!r}")
        seq = request.seq
        if layout.fingerprint != self.fingerprint:
            raise InvalidRequestError("KV was computed by a different model or dtype")
        if layout.num_tokens != seq.num_computed_tokens:
            raise InvalidRequestError(
                f"KV covers {layout.num_tokens} tokens, {seq.num_computed_tokens} were reserved"
            )
        self.kv_cache.import_layer(seq.block_table, data, layout)

    def finish_import(self, request_id: str) -> None:
        """Join an imported sequence to the running batch."""
        request = self._importing.pop(request_id, None)
        if request is None:
            raise RequestNotFoundError(f"no import in progress for {request_id!r}")
        seq = request.seq
        self.block_manager.commit_full_blocks(seq)
        self.scheduler.join_running(seq)
        self._requests[request_id] = request

    def begin_prompt_import(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """``begin_import`` of a prompt's KV before its first token exists.

        A decode worker reserves blocks while the prefill worker still computes, so the first
        token (sampled after the last layer) arrives only at ``finish_prompt_import``; until
        then a placeholder stands in for it, which reserves the room it needs in the context.
        """
        self._check_prompt(prompt_token_ids)  # its messages speak of the prompt, not of +1
        n = len(prompt_token_ids)
        self.begin_import(request_id, [*prompt_token_ids, 0], n, n, params)

    def finish_prompt_import(self, request_id: str, first_token_id: int) -> RequestOutput:
        """Join a ``begin_prompt_import`` sequence to the batch with its real first token.

        Returns that token's output exactly as a local prefill step would have (so the text
        held back for stop strings matches the prefill worker's); it may finish the request.
        """
        request = self._importing.get(request_id)
        if request is None:
            raise RequestNotFoundError(f"no import in progress for {request_id!r}")
        if not 0 <= first_token_id < self.spec.vocab_size:
            raise InvalidRequestError(
                f"first token id {first_token_id} outside the vocabulary [0, {self.spec.vocab_size})"
            )
        request.seq.token_ids.pop()  # the placeholder
        request.detokenizer = IncrementalDetokenizer(self.tokenizer)
        request.num_emitted_chars = 0
        self.finish_import(request_id)
        return self._append_token(request, first_token_id)

    # -- prefix fetch: a cached prefix arriving layer by layer (DESIGN.md §4 step 3) ---------

    def add_request_with_prefix(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        num_prefix_tokens: int,
        timeout_s: float = DEFAULT_LAYER_TIMEOUT_S,
    ) -> PrefixFetch:
        """Add a prompt whose first ``num_prefix_tokens`` tokens' KV is fetched, not computed.

        Engine thread. Prefix blocks the local cache holds are reused; the rest get fresh blocks
        now, which the returned fetch names for the fetcher to fill. The sequence joins the
        running batch at once and steps compute only its suffix, layer ``l`` waiting (at most
        ``timeout_s``) until layer ``l`` of the prefix has arrived.
        """
        token_ids = list(prompt_token_ids)
        self._check_prompt(token_ids)
        bs = self.config.block_size
        if not 0 < num_prefix_tokens < len(token_ids) or num_prefix_tokens % bs:
            raise InvalidRequestError(
                f"num_prefix_tokens must be a multiple of {bs} in [{bs}, {len(token_ids) - 1}], "
                f"got {num_prefix_tokens}"
            )
        if timeout_s <= 0:
            raise InvalidRequestError(f"timeout_s must be positive, got {timeout_s}")
        request = self._new_request(request_id, token_ids, params)
        seq = request.seq
        hits = self.block_manager.find_cached_prefix(seq)[: num_prefix_tokens // bs]
        self._reserve_prefix(seq, hits, num_prefix_tokens)
        fetch = self._new_fetch(seq, len(hits), num_prefix_tokens // bs, timeout_s)
        self.scheduler.join_running(seq)
        self._requests[request_id] = request
        if fetch.pending:
            self._fetches[request_id] = fetch
        return fetch

    def _reserve_prefix(self, seq: Sequence, hits: list[int], num_prefix_tokens: int) -> None:
        if len(self.scheduler.running) + len(self._importing) >= self.config.max_num_seqs:
            raise ResourceExhaustedError(f"already running {self.config.max_num_seqs} sequences")
        num_fetched = num_prefix_tokens - len(hits) * self.config.block_size
        if not self.block_manager.can_admit(seq, hits, num_fetched):
            raise ResourceExhaustedError(
                f"{seq.blocks_needed(num_fetched)} KV blocks needed, "
                f"{self.block_manager.num_free_blocks} free"
            )
        self.block_manager.admit_with_prefix(seq, hits, num_prefix_tokens)

    def _new_fetch(
        self, seq: Sequence, num_local: int, num_blocks: int, timeout_s: float
    ) -> PrefixFetch:
        bs = self.config.block_size
        hashes = tuple(block_hashes(seq.token_ids[: num_blocks * bs], bs, self.fingerprint))
        hashes = hashes[num_local:]
        layouts = tuple(
            KVLayout(
                self.fingerprint,
                layer,
                len(hashes) * bs,
                hashes,
                self.kv_cache.dtype_name,
                bs,
                self.spec.num_kv_heads,
                self.spec.head_dim,
            )
            for layer in range(self.spec.num_layers)
        )
        indices = tuple(range(num_local, num_blocks))
        block_ids = tuple(seq.block_table[num_local:num_blocks])
        return PrefixFetch(seq.request_id, indices, hashes, layouts, timeout_s, block_ids)

    def write_prefix_layer(
        self, request_id: str, layer: int, data: torch.Tensor, layout: KVLayout | None = None
    ) -> bool:
        """Write one layer of a pending prefix fetch; any thread, while ``step`` runs or not.

        ``data`` is ``[2, len(fetch.block_indices), block_size, kv_heads, head_dim]`` (K then V,
        as ``export_kv`` gives), checked against ``fetch.layouts[layer]`` and against ``layout``
        if one is given. False, writing nothing, when no one needs the layer any more (the
        request was aborted, preempted or recomputed, or its fetch failed): stop fetching.
        A malformed write raises ``InvalidRequestError`` and fails the fetch.
        """
        fetch = self._fetches.get(request_id)
        if fetch is None:
            return False
        return fetch.write(layer, lambda: self._import_prefix_layer(fetch, layer, data, layout))

    def _import_prefix_layer(
        self, fetch: PrefixFetch, layer: int, data: torch.Tensor, layout: KVLayout | None
    ) -> None:
        expected = fetch.layouts[layer]
        if layout is not None and layout.fingerprint != self.fingerprint:
            raise InvalidRequestError("KV was computed by a different model or dtype")
        if layout is not None and (layout.layer, layout.block_hashes) != (
            layer,
            fetch.block_hashes,
        ):
            raise InvalidRequestError(f"KV is not layer {layer} of the fetched blocks")
        self.kv_cache.import_layer(list(fetch.block_ids), data, layout or expected)

    def fail_prefix(self, request_id: str, reason: str) -> bool:
        """Any thread: the prefix will not arrive; a step waiting for it raises at once."""
        fetch = self._fetches.get(request_id)
        return fetch is not None and fetch.fail(reason)

    def recompute_prefix(self, request_id: str) -> None:
        """Engine thread: give up on a request's prefix fetch and compute its whole prompt.

        The fetched blocks are freed without a hash; those the local cache had stay cached,
        so the recompute usually starts from them.
        """
        if request_id not in self._fetches:
            raise RequestNotFoundError(f"no prefix fetch in progress for {request_id!r}")
        self._cancel_fetch(request_id, "recomputing the prefix")
        self.scheduler.requeue(self._requests[request_id].seq)

    def _cancel_fetch(self, request_id: str, reason: str) -> None:
        # Before the request's blocks are freed: no write can land in them afterwards.
        fetch = self._fetches.pop(request_id, None)
        if fetch is not None:
            fetch.cancel(reason)

    def _settle_fetches(self) -> None:
        """Raise for failed fetches; give complete ones' blocks their hashes (cache hits now)."""
        failed = [f for f in self._fetches.values() if f.failed]
        if failed:
            raise fetch_error(failed)
        for request_id in [r for r, f in self._fetches.items() if f.complete]:
            del self._fetches[request_id]
            self.block_manager.commit_full_blocks(self._requests[request_id].seq)

    # -- hook 2: partial attention ---------------------------------------------------------

    def partial_attention(
        self,
        request_id: str,
        layer: int,
        q: torch.Tensor,
        q_positions: torch.Tensor,
        block_indices: list[int],
    ) -> PartialAttention:
        """Attention of ``q`` over the given blocks (indices into the request's block table)."""
        seq = self._seq(request_id)
        ctx = seq.num_computed_tokens
        if any(not 0 <= i < seq.blocks_needed(ctx) for i in block_indices):
            raise InvalidRequestError(
                f"block index outside the request's {seq.blocks_needed(ctx)} blocks"
            )
        ids = torch.tensor([seq.block_table[i] for i in block_indices], dtype=torch.long)
        bs = self.config.block_size
        slots = (torch.tensor(block_indices)[:, None] * bs + torch.arange(bs)).flatten()
        keep = slots < ctx  # the last block may be partly filled
        k_cache, v_cache = self.kv_cache.layer(layer)
        k = gather_blocks(k_cache, ids)[keep]
        v = gather_blocks(v_cache, ids)[keep]
        return partial_attention(q, q_positions, k, v, slots[keep], self.spec.head_dim**-0.5)

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        bm = self.block_manager
        return {
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "num_cached_blocks": bm.num_cached_blocks,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_importing": len(self._importing),
            "num_prefix_fetches": len(self._fetches),
        }
