"""The engine: requests in, tokens out, one scheduled step at a time.

Lifecycle of a request:
1. ``add_request`` validates it and queues a WAITING sequence;
2. each ``step`` runs plan -> execute(stages) -> commit (step.py): schedules a batch, runs the
   model's stages, samples a token for every sequence whose tokens are all computed, and
   reports new tokens and text (outputs.py);
3. a request leaves when it finishes (stop token, stop string, max_tokens, context limit) or is
   aborted; its blocks go back to the pool either way, and helpers free their part.

KV can also arrive from elsewhere (a prefill worker, a migration): ``begin_import``,
``import_kv``, ``finish_import`` (kv_transfer.py, hook 3). A prompt prefix can arrive from the
store while its suffix computes: ``add_request_with_prefix`` (prefix_fetch.py). KV can leave
while a step computes: ``step(on_layer_done=hook)`` calls ``hook(layer, ctx)`` after each layer
run here; ``export_kv`` inside the hook covers the tokens the step is computing.

Migration (DESIGN.md §5), owner side (placement.py): ``set_stages`` runs a layer range through a
``StagePort``; ``drop_layers``/``restore_layers`` free and retake those layers' memory;
``offload_blocks`` and the recall calls move a sequence's leading blocks to a helper reached
through an ``AttentionPort``. Helper side (hosting.py): ``host_layers`` runs a layer range for
another engine; ``hosted_blocks`` holds other engines' blocks and answers their attention.

Threads: every method runs on the engine thread (the one that calls ``step``) unless its
docstring says otherwise. ``snapshot`` may be read from any thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import torch

from services.common.config import EngineConfig
from services.common.errors import (
    ConfigError,
    InvalidRequestError,
    OutOfRangeError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from services.common.hashing import BlockHash
from services.common.types import FinishReason, RequestOutput, SamplingParams
from services.engine import paged_decode
from services.engine.attention import PartialAttention
from services.engine.block_manager import BlockManager
from services.engine.kv_cache import KVCache, KVLayout
from services.engine.kv_routes import export_anywhere
from services.engine.kv_transfer import KVTransfer
from services.engine.located_attention import request_partial_attention
from services.engine.memory import check_fits, initial_num_blocks, max_model_len, module_bytes
from services.engine.migration import Migration
from services.engine.model_runner import ModelRunner
from services.engine.models.loader import DTYPES, load_layers, load_model
from services.engine.models.prepare import resolve_model
from services.engine.outputs import Completion, aborted, append_token, resume
from services.engine.pipeline import Pipeline
from services.engine.placement import Placement
from services.engine.ports import PortFailed, StageFailedError
from services.engine.prefix_fetch import (
    DEFAULT_LAYER_TIMEOUT_S,
    PrefixFetch,
    PrefixFetchError,
    PrefixFetches,
    check_prefix,
)
from services.engine.requests import RequestState, RequestTable
from services.engine.scheduler import Scheduler
from services.engine.sequence import Sequence
from services.engine.snapshot import EngineSnapshot
from services.engine.step import LayerDoneHook, LogitsHook, StepContext, Stepper
from services.engine.tokenizer import Tokenizer, end_of_sequence_ids

__all__ = ["Completion", "Engine", "LayerDoneHook", "StepContext"]

Prompt = str | list[int]


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        logits_hook: LogitsHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.path = resolve_model(config.model)
        if torch.device(config.device).type == "cpu":
            paged_decode.load()  # build/load the C++ kernels now, not in the first request's step
        loaded = load_model(
            self.path, config.dtype, config.device, num_layers=config.num_loaded_layers
        )
        self.model, self.spec, self.fingerprint = loaded.model, loaded.spec, loaded.fingerprint
        self.tokenizer = Tokenizer(self.path)
        self.eos_token_ids = end_of_sequence_ids(self.spec.eos_token_ids, self.tokenizer)
        self._build_pool()
        self._build_parts(logits_hook, clock)
        self._num_steps = self._num_failed_steps = 0
        self._publish()

    def _build_pool(self) -> None:
        """The KV pool (sized by the config or the budget), its blocks, the scheduler."""
        config, spec = self.config, self.spec
        dtype, bs = DTYPES[config.dtype], config.block_size
        num_layers = min(config.num_loaded_layers or spec.num_layers, spec.num_layers)
        block_bytes = KVCache.bytes_per_block(
            num_layers, bs, spec.num_kv_heads, spec.head_dim, dtype
        )
        weight_bytes = module_bytes([self.model])
        num_blocks = initial_num_blocks(config, weight_bytes, block_bytes)
        self.max_model_len = max_model_len(config, spec, num_blocks)
        what = f"a KV pool of {num_blocks:,} blocks ({block_bytes:,} bytes each)"
        check_fits(what, num_blocks * block_bytes, weight_bytes, config.device)
        layers = range(num_layers)
        try:
            self.kv_cache = KVCache(
                layers, num_blocks, bs, spec.num_kv_heads, spec.head_dim, dtype, config.device
            )
        except (RuntimeError, MemoryError) as exc:  # torch's OutOfMemoryError is one
            raise ConfigError(f"cannot allocate {what}: {exc}") from None
        self.block_manager = BlockManager(
            num_blocks, bs, self.fingerprint, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            on_preempt=lambda seq: self._forget(seq, "preempted"),
            defer_shared_prefix_tokens=config.defer_shared_prefix_tokens,
            max_prefill_tokens_while_decoding=config.max_prefill_tokens_while_decoding,
        )
        self.runner = ModelRunner(self.model, self.kv_cache, config.device)

    def _build_parts(self, logits_hook: LogitsHook | None, clock: Callable[[], float]) -> None:
        """One object per concept, each given only what it uses (see the module docstring)."""
        config, spec, bm, kv = self.config, self.spec, self.block_manager, self.kv_cache
        n = config.num_loaded_layers
        refusal = ""
        if n is not None and n < spec.num_layers:
            refusal = (
                f"this worker holds decoder layers [0, {n}) of {spec.num_layers} only "
                "(--load-layers): it hosts migrated layers and serves no request"
            )
        self.requests = RequestTable(
            self.tokenizer, bm.block_size, spec.vocab_size, self.max_model_len, refusal
        )
        self.fetches = PrefixFetches(bm, kv, self.fingerprint, spec.num_layers)
        self.placement = Placement(
            self.model, kv, bm, lambda: list(self.scheduler.running), self._requeue
        )
        self.kv = KVTransfer(
            self.requests, bm, self.scheduler, kv, self.fingerprint, self._new_request
        )
        self.kv.connect(self.placement, config.max_num_seqs)

        def load(layers: range) -> dict[int, torch.nn.Module]:
            return load_layers(self.path, spec, config.dtype, config.device, layers)

        self.migration = Migration(
            self.placement,
            self.kv,
            self.requests,
            self.scheduler,
            self.fetches,
            load,
            config.memory_budget_bytes,
            self._publish,
            self._settle_between_steps,
            clock,
        )
        self.stepper = Stepper(
            self.scheduler,
            self.runner,
            self.requests,
            self.fetches,
            self.kv,
            self.placement,
            self._finish,
            logits_hook,
            config.located_micro_batches,
        )
        self.pipeline = Pipeline(self.stepper, config.pipelined_steps)
        self._settled: list[RequestOutput] = []  # outputs of a step settled between steps

    # -- requests --------------------------------------------------------------------------

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)
        return list(prompt)

    def check_prompt(self, token_ids: list[int]) -> None:
        """Raise what ``add_request`` would for this prompt; reads no request state."""
        self.requests.check_prompt(token_ids)

    def _new_request(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        num_prompt_tokens: int | None = None,
    ) -> RequestState:
        return self.requests.new(
            request_id, token_ids, params, self.eos_token_ids, num_prompt_tokens
        )

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        chat: bool = False,
        output_token_ids: tuple[int, ...] | list[int] = (),
    ) -> None:
        """Queue a request. ``output_token_ids``: tokens it generated elsewhere before that
        worker was lost (a resumed request, outputs.py ``resume``): they are recomputed with
        the prompt, count against ``max_tokens``, seed the sampler's token index and the text
        already emitted, so the request goes on exactly where it stopped; ``ResumeComplete``
        (adding nothing) when they end it already."""
        token_ids = self.encode(prompt, chat)
        self.requests.check_prompt(token_ids)
        if output_token_ids:
            request = self._resumed_request(request_id, token_ids, list(output_token_ids), params)
        else:
            request = self._new_request(request_id, token_ids, params)
        self.requests.active[request_id] = request
        self.scheduler.add(request.seq)

    def _resumed_request(
        self, request_id: str, prompt: list[int], outputs: list[int], params: SamplingParams
    ) -> RequestState:
        """``ResumeComplete`` when ``outputs`` end the request already (outputs.py)."""
        self.requests.check_vocab(outputs)
        total = len(prompt) + len(outputs)
        if total > self.max_model_len:
            raise OutOfRangeError(
                f"prompt and resumed output have {total} tokens; this model's context is "
                f"{self.max_model_len} tokens"
            )
        if len(outputs) > params.max_tokens:
            raise InvalidRequestError(
                f"{len(outputs)} resumed output tokens, past max_tokens {params.max_tokens}"
            )
        request = self._new_request(request_id, prompt, params)
        resume(request, outputs, self.max_model_len)  # at the limits above: ResumeComplete
        return request

    def num_cached_prompt_tokens(self, token_ids: list[int]) -> int:
        """How many of a prompt's tokens the prefix cache holds now (what a prefill of it would
        not compute, were nothing evicted first). Engine thread."""
        return len(self.block_manager.cached_blocks(token_ids)) * self.config.block_size

    def abort(self, request_id: str) -> RequestOutput:
        if request_id in self.pipeline.request_ids:
            self._settle_between_steps()
        request = self.requests.get(request_id)
        self.requests.active.pop(request_id, None)
        self.requests.importing.pop(request_id, None)
        request.seq.finish_reason = FinishReason.ABORT
        self._forget(request.seq, "aborted")
        self.scheduler.finish(request.seq)
        return aborted(request)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests.active)

    @property
    def hosts_only(self) -> bool:
        """Holds some decoder layers only (``--load-layers``): hosts, serves no request."""
        return bool(self.requests.refusal)

    def _finish(self, request: RequestState, reason: FinishReason) -> None:
        request.seq.finish_reason = reason
        self._forget(request.seq, "finished")
        self.scheduler.finish(request.seq)
        del self.requests.active[request.request_id]

    def _forget(self, seq: Sequence, reason: str) -> None:
        """Before ``seq``'s blocks are freed: no fetch writes into them, helpers free theirs."""
        self.fetches.cancel(seq.request_id, reason)
        self.placement.forget(seq)

    def _requeue(self, seq: Sequence) -> None:
        self._forget(seq, "recomputing")
        self.scheduler.requeue(seq)

    # -- stepping --------------------------------------------------------------------------

    def step(self, on_layer_done: LayerDoneHook | None = None) -> list[RequestOutput]:
        """One step (step.py), or under a pipelined layout one step started and the one in
        flight finished (pipeline.py). Raises ``PrefixFetchError`` when a prefix did not arrive
        and ``StageFailedError`` when a port failed requests this engine cannot serve alone
        (they are finished and freed); either way the failed step kept nothing."""
        self._housekeeping()
        if self.pipeline.applies(on_layer_done is not None):
            outputs, self._settled = self._settled, []
            return outputs + self._pipelined(self.pipeline.step)
        outputs = self.settle()  # (none in flight unless the layout changed unsettled)
        plan = self.stepper.plan()
        if plan is None:
            self._publish()
            return outputs
        try:
            logits = self.stepper.execute(plan, on_layer_done)
        except PortFailed as failure:
            self._num_failed_steps += 1
            self._recover(failure)
            return outputs
        except PrefixFetchError:
            self._num_failed_steps += 1
            raise
        outputs += self.stepper.commit(plan, logits)
        self._num_steps += 1
        self._publish()
        return outputs

    @property
    def in_flight(self) -> bool:
        """A pipelined step is in flight (pipeline.py): ``settle`` before changing anything."""
        return self.pipeline.in_flight is not None

    def settle(self) -> list[RequestOutput]:
        """Finish the step in flight, if any, starting none; its outputs (and any a settle
        inside another call kept for the next step). Raises as ``step`` does."""
        outputs, self._settled = self._settled, []
        if self.pipeline.in_flight is None:
            return outputs
        return outputs + self._pipelined(self.pipeline.settle)

    def _settle_between_steps(self) -> None:
        """Before a call that changes the engine between steps: the next ``step`` returns the
        outputs of the step this finishes."""
        self._settled = self.settle()

    def _pipelined(self, run: Callable[[], list[RequestOutput]]) -> list[RequestOutput]:
        before = self.pipeline.in_flight
        try:
            outputs = run()
        except PortFailed as failure:
            self._num_failed_steps += 1
            self._recover(failure)
            return []
        self._num_steps += before is not None
        self._publish()
        return outputs

    def _housekeeping(self) -> None:
        if self.fetches:
            for request_id in self.fetches.settle():
                self.block_manager.commit_full_blocks(self.requests.active[request_id].seq)
        self.migration.housekeeping()

    def _recover(self, failure: PortFailed) -> None:
        failed = [r for r in self.placement.recover(failure) if r in self.requests.active]
        for request_id in failed:
            self.abort(request_id)
        self._publish()
        if failed:
            raise StageFailedError(failed, failure.reason)

    # -- convenience -----------------------------------------------------------------------

    def stream(
        self, prompt: Prompt, params: SamplingParams, request_id: str = "stream", chat: bool = False
    ) -> Iterator[RequestOutput]:
        """Run one request to completion, yielding its outputs as they are produced."""
        self.add_request(request_id, prompt, params, chat)
        try:
            while request_id in self.requests.active:
                yield from (o for o in self.step() if o.request_id == request_id)
        finally:
            if request_id in self.requests.active:
                self.abort(request_id)

    def generate(
        self,
        prompts: list[Prompt],
        params: SamplingParams | list[SamplingParams],
        chat: bool = False,
    ) -> list[Completion]:
        """Run every prompt to completion in one continuous batch; results in prompt order."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        base = self.requests.next_arrival()
        results = {}
        for i, (prompt, p) in enumerate(zip(prompts, all_params, strict=True)):
            rid = f"generate-{base}-{i}"
            self.add_request(rid, prompt, p, chat)
            results[rid] = Completion(rid, list(self.requests.active[rid].seq.token_ids))
        while any(rid in self.requests.active for rid in results):
            for out in self.step():
                done = results.get(out.request_id)
                if done is not None:
                    done.token_ids += out.new_token_ids
                    done.text += out.text_delta
                    done.finish_reason = out.finish_reason
                    done.num_cached_tokens = out.num_cached_tokens
        return list(results.values())

    # -- hook 3: per-layer KV export / import (kv_transfer.py) --------------------------------

    def _seq(self, request_id: str) -> Sequence:
        return self.requests.seq(request_id)

    def kv_layout(
        self, request_id: str, layer: int, start_token: int = 0, end_token: int | None = None
    ) -> KVLayout:
        return self.kv.layout(request_id, layer, start_token, end_token)

    def export_kv(
        self, request_id: str, layer: int, start_token: int = 0, end_token: int | None = None
    ) -> tuple[torch.Tensor, KVLayout]:
        """One layer of a request's computed KV: the blocks holding tokens ``[start_token,
        end_token)`` (default: all of them), as a tensor and its layout."""
        return self.kv.export(request_id, layer, start_token, end_token)

    def export_kv_async(
        self, request_id: str, layer: int, start_token: int = 0
    ) -> Future[tuple[torch.Tensor, KVLayout]]:
        """One layer of a request's computed KV from the block holding ``start_token`` on,
        wherever it lies (kv_routes.py)."""
        return export_anywhere(self.kv, self.placement, request_id, layer, start_token)

    def read_cached_blocks(
        self, groups: list[list[tuple[BlockHash, tuple[int, ...]]]], outs: list[torch.Tensor]
    ) -> bool:
        """Every layer's KV of each group of prefix-cached blocks into its ``outs`` tensor
        (``KVTransfer.read_cached_blocks``). Engine thread, between steps."""
        return self.kv.read_cached_blocks(groups, outs, self.spec.num_layers)

    def begin_import(
        self,
        request_id: str,
        token_ids: list[int],
        num_prompt_tokens: int,
        num_kv_tokens: int,
        params: SamplingParams,
    ) -> None:
        """Reserve blocks for a sequence whose first ``num_kv_tokens`` tokens' KV will be
        imported (each layer's KV goes where that layer runs)."""
        self.kv.begin_import(request_id, token_ids, num_prompt_tokens, num_kv_tokens, params)

    def import_kv(self, request_id: str, data: torch.Tensor, layout: KVLayout) -> None:
        self.kv.import_kv(request_id, data, layout)

    def finish_import(self, request_id: str) -> None:
        """Join an imported sequence to the running batch."""
        self.kv.finish_import(request_id)

    def begin_prompt_import(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        reuse_cached: bool = False,
    ) -> int:
        """``begin_import`` of a prompt's KV before its first token exists (kv_transfer.py);
        with ``reuse_cached`` its leading blocks in the prefix cache are reused, and the number
        of them returned: the KV to import starts at that block."""
        return self.kv.begin_prompt_import(request_id, prompt_token_ids, params, reuse_cached)

    def finish_prompt_import(self, request_id: str, first_token_id: int) -> RequestOutput:
        """Join a ``begin_prompt_import`` sequence to the batch with its real first token.

        Returns that token's output exactly as a local prefill step would have (so the text
        held back for stop strings matches the prefill worker's); it may finish the request.
        """
        request = self.kv.finish_prompt_import(request_id, first_token_id, self.spec.vocab_size)
        out = append_token(request, first_token_id, self.max_model_len)
        if out.finish_reason is not None:
            self._finish(request, out.finish_reason)
        return out

    # -- prefix fetch: a cached prefix arriving layer by layer (prefix_fetch.py) ------------

    def add_request_with_prefix(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        num_prefix_tokens: int,
        timeout_s: float = DEFAULT_LAYER_TIMEOUT_S,
    ) -> PrefixFetch:
        """Add a prompt whose first ``num_prefix_tokens`` tokens' KV is fetched, not computed.

        Prefix blocks the local cache holds are reused; the rest get fresh blocks now, which the
        returned fetch names for the fetcher to fill. The sequence joins the running batch at
        once and steps compute only its suffix, layer ``l`` waiting (at most ``timeout_s``)
        until layer ``l`` of the prefix has arrived.
        """
        token_ids = list(prompt_token_ids)
        self.requests.check_prompt(token_ids)
        check_prefix(len(token_ids), num_prefix_tokens, self.config.block_size, timeout_s)
        self._check_all_local("a fetched prefix")
        request = self._new_request(request_id, token_ids, params)
        if len(self.scheduler.running) + len(self.requests.importing) >= self.config.max_num_seqs:
            raise ResourceExhaustedError(f"already running {self.config.max_num_seqs} sequences")
        fetch = self.fetches.start(request.seq, num_prefix_tokens, timeout_s)
        self.scheduler.join_running(request.seq)
        self.requests.active[request_id] = request
        return fetch

    def _check_all_local(self, what: str) -> None:
        # A fetch writes its layers into this pool while the suffix computes; a remote stage's
        # helper would lack the prefix's KV for its layers. The prefill worker computes instead.
        if self.placement.layout.remote:
            raise ResourceExhaustedError(
                f"layers {list(self.placement.layout.remote_layers)} run on a helper now: "
                f"{what} cannot join until they are back"
            )

    def write_prefix_layer(
        self, request_id: str, layer: int, data: torch.Tensor, layout: KVLayout | None = None
    ) -> bool:
        """Write one layer of a pending prefix fetch; any thread, while ``step`` runs or not.

        False, writing nothing, when no one needs the layer any more: stop fetching. A
        malformed write raises ``InvalidRequestError`` and fails the fetch."""
        return self.fetches.write_layer(request_id, layer, data, layout)

    def fail_prefix(self, request_id: str, reason: str) -> bool:
        """Any thread: the prefix will not arrive; a step waiting for it raises at once."""
        return self.fetches.fail(request_id, reason)

    def recompute_prefix(self, request_id: str) -> None:
        """Give up on a request's prefix fetch and compute its whole prompt.

        The fetched blocks are freed without a hash; those the local cache had stay cached,
        so the recompute usually starts from them.
        """
        if request_id not in self.fetches:
            raise RequestNotFoundError(f"no prefix fetch in progress for {request_id!r}")
        self.fetches.cancel(request_id, "recomputing the prefix")
        self.scheduler.requeue(self.requests.active[request_id].seq)

    # -- hook 2: partial attention ---------------------------------------------------------

    def partial_attention(
        self,
        request_id: str,
        layer: int,
        q: torch.Tensor,
        q_positions: torch.Tensor,
        block_indices: list[int],
    ) -> PartialAttention:
        """Attention of ``q`` over the given blocks (indices into the request's blocks)."""
        return request_partial_attention(
            self._seq(request_id),
            self.kv_cache,
            layer,
            q,
            q_positions,
            block_indices,
            self.spec.head_dim**-0.5,
        )

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Live counters (any thread may call it; sizes only, so at worst a moment stale)."""
        bm = self.block_manager
        return {
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "num_cached_blocks": bm.num_cached_blocks,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_importing": len(self.requests.importing),
            "num_prefix_fetches": len(self.fetches),
            "num_located_seqs": len(self.placement.located),
            "num_hosted_seqs": sum(
                h.num_sequences for h in list(self.migration.hosted_layers.values())
            ),
            "num_hosted_blocks": self.migration.hosted_blocks.num_blocks,
            "num_hosted_layer_blocks": sum(
                h.num_blocks_used for h in list(self.migration.hosted_layers.values())
            ),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_overlapped_steps": self.pipeline.num_overlapped_steps,
        }

    def _publish(self) -> None:
        self.snapshot = self._snapshot()

    def _snapshot(self) -> EngineSnapshot:
        bm, scheduler, placement = self.block_manager, self.scheduler, self.placement
        return EngineSnapshot(
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_cached_blocks=bm.num_cached_blocks,
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_importing=len(self.requests.importing),
            num_prefix_fetches=len(self.fetches),
            num_steps=self._num_steps,
            num_failed_steps=self._num_failed_steps,
            stages=placement.layout.ranges,
            num_layers_held=self.kv_cache.num_layers,
            num_located_seqs=len(placement.located),
            num_remote_blocks=sum(s.num_remote_blocks for s in scheduler.running),
            hosted_layers=self.migration.hosted_ranges(),
            num_hosted_blocks=self.migration.hosted_blocks.num_blocks,
            memory=self.migration.memory.report(),
            num_preemptions=scheduler.num_preemptions,
        )
