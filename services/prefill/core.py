"""The prefill worker's logic, without grpc: prompts in, first tokens out, KV to decode workers.

A request passes through (``JobStatus``, changed only by the coroutine that owns the job):

1. QUEUED        - validated; its KV transfer is opened (connecting overlaps the wait) and it
                   waits in ``_pending`` to be added to the engine between two steps;
2. COMPUTING     - in the engine's batch. Steps run one at a time on one worker thread, so the
                   event loop stays responsive. In the step that completes the prompt, the layer
                   hook exports each layer's KV the moment the layer is done and hands it to the
                   request's sender, which puts it on the wire while later layers compute;
3. TRANSFERRING  - the first token is sampled and returned at once; the request's blocks are
                   freed here (its full blocks stay in the prefix cache) while the sender waits
                   for the decode worker to acknowledge every layer;
4. DONE / ABORTED.

With a global KV store (``store``), step 1 also looks the prompt's full blocks up there and pins
the longest cached prefix; the request then enters the engine with that prefix marked computed
(``Engine.add_request_with_prefix``) and a fetch task writes its KV in layer by layer while the
step computes the suffix (layer l+1 in flight while layer l computes). A fetch that fails makes
the step raise ``PrefixFetchError``; the request is recomputed from scratch, output unchanged.
After the first token, the prompt's new full blocks are written back to the store in the
background, off the TTFT path.

Only ``_step_loop`` touches the engine, and only between steps (adds and aborts queue up in
``_pending`` and ``_to_abort``); the layer hook, which runs during a step, only reads it. Every
wait is bounded by the request's deadline; a cancel, a deadline or a failed transfer aborts the
sender and drops the request from the engine, so no block outlives its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from services.common.errors import BanaServeError, InvalidRequestError, RequestNotFoundError
from services.common.hashing import block_hashes
from services.common.load import LoadMeter, LoadSnapshot
from services.common.types import FinishReason, RequestOutput, SamplingParams
from services.engine.engine import Engine, StepContext
from services.engine.kv_cache import KVLayout
from services.engine.prefix_fetch import PrefixFetch, PrefixFetchError
from services.prefill.kvstore_client import CachedPrefix, KVStoreClient, StoreError
from services.prefill.transport import KVSender, KVTarget, KVTransport, TransferStats

T = TypeVar("T")
log = logging.getLogger(__name__)


LOAD_WINDOW_S = 1.0  # the window of the busy fraction in load reports


class JobStatus(enum.Enum):
    QUEUED = "queued"
    COMPUTING = "computing"
    TRANSFERRING = "transferring"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    target: KVTarget


@dataclass(frozen=True)
class FirstToken:
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class PrefillResult:
    """The last thing a prefill yields. ``finish_reason`` set: the first token ended the request
    and no KV was handed over."""

    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    queued_s: float
    prefill_s: float
    transfer: TransferStats | None


@dataclass(frozen=True)
class WorkerStats:
    num_blocks_total: int
    num_blocks_used: int
    num_blocks_free: int
    num_blocks_cached: int
    num_queued_prefill_tokens: int
    num_running_seqs: int
    num_open_transfers: int


@dataclass(eq=False)
class _Job:
    request: PrefillRequest
    arrived_at: float
    computed: asyncio.Future[tuple[RequestOutput, float]]
    status: JobStatus = JobStatus.QUEUED
    sender: KVSender | None = None
    scheduled_at: float | None = None  # written by the stepping thread
    prefix: CachedPrefix | None = None  # pinned in the global store
    num_store_blocks: int = 0  # prompt blocks the store had
    prefetched: list[torch.Tensor] | None = None  # every prefix layer (overlap off)
    # Layers handed to the sender: a step that failed on a prefix fetch runs again and must not
    # send a layer twice. With a store they are also kept, in layer order, for the write-back.
    num_layers_sent: int = 0
    kv_layers: list[tuple[torch.Tensor, KVLayout]] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id


class PrefillWorker:
    def __init__(
        self,
        engine: Engine,
        transport: KVTransport,
        clock: Callable[[], float] = time.monotonic,
        store: KVStoreClient | None = None,
        store_overlap: bool = True,
    ) -> None:
        self.engine = engine
        self._transport = transport
        self._store = store
        # False: a store prefix is fetched whole before its request computes (the baseline
        # the layer-wise overlap is measured against).
        self._store_overlap = store_overlap
        self._background: set[asyncio.Task[None]] = set()
        self.num_store_hit_tokens = 0
        self.num_store_fallbacks = 0
        self._clock = clock
        # Intra-op threads are per thread under OpenMP: give the stepping thread the engine's.
        self._executor = ThreadPoolExecutor(
            1,
            "prefill-step",
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        )
        self._jobs: dict[str, _Job] = {}
        self._pending: list[_Job] = []
        self._to_abort: list[str] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._step_started_at = 0.0
        self.meter = LoadMeter(LOAD_WINDOW_S, clock)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._step_loop())

    async def stop(self) -> None:
        """Ends the step loop after the step in flight (never mid-step) and closes the transport."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._executor.shutdown(wait=True)
        await self._transport.close()
        if self._store is not None:
            await self._store.close()

    # -- requests --------------------------------------------------------------------------

    def validate(self, request: PrefillRequest) -> None:
        if not request.request_id:
            raise InvalidRequestError("request_id is empty")
        if request.request_id in self._jobs:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if not request.target.address:
            raise InvalidRequestError("target.address is empty (a DecodeService HOST:PORT)")
        if not request.target.reservation_id:
            raise InvalidRequestError("target.reservation_id is empty (from ReserveKV)")
        self.engine.check_prompt(request.prompt_token_ids)

    async def prefill(
        self, request: PrefillRequest, timeout_s: float | None = None
    ) -> AsyncIterator[FirstToken | PrefillResult]:
        """Yields the first token, then the result once the decode worker has the KV."""
        self.validate(request)
        deadline = None if timeout_s is None else self._clock() + timeout_s
        job = _Job(request, self._clock(), asyncio.get_running_loop().create_future())
        self._jobs[request.request_id] = job
        try:
            job.sender = await self._bounded(
                self._transport.open(
                    request.target, request.request_id, self.engine.spec.num_layers, timeout_s
                ),
                deadline,
            )
            if self._store is not None:
                job.prefix = await self._lookup(request.prompt_token_ids)
                if job.prefix is not None and not self._store_overlap:
                    job.prefetched = await self._bounded(self._read_all(job.prefix), deadline)
            self._pending.append(job)
            self._wake.set()
            output, computed_at = await self._bounded(asyncio.shield(job.computed), deadline)
            if job.sender.failed is not None:
                raise job.sender.failed
            yield FirstToken(output.new_token_ids, output.text_delta)
            self._write_back_later(job)
            transfer = None
            if output.finish_reason is None:
                job.status = JobStatus.TRANSFERRING
                token = output.new_token_ids[0]
                transfer = await self._bounded(job.sender.finish(token, computed_at), deadline)
            job.status = JobStatus.DONE
            yield self._result(job, output, computed_at, transfer)
        finally:
            await self._end(job)

    def _result(
        self, job: _Job, output: RequestOutput, computed_at: float, transfer: TransferStats | None
    ) -> PrefillResult:
        scheduled_at = job.scheduled_at if job.scheduled_at is not None else computed_at
        return PrefillResult(
            output.finish_reason,
            output.num_prompt_tokens,
            output.num_cached_tokens,
            scheduled_at - job.arrived_at,
            computed_at - scheduled_at,
            transfer,
        )

    async def _bounded(self, awaitable: Awaitable[T], deadline: float | None) -> T:
        if deadline is None:
            return await awaitable
        remaining = deadline - self._clock()
        try:
            return await asyncio.wait_for(awaitable, max(0.0, remaining))
        except TimeoutError:
            raise TimeoutError("the request's deadline passed during prefill") from None

    async def _end(self, job: _Job) -> None:
        del self._jobs[job.request_id]
        if job.status is JobStatus.DONE:
            if job.sender is not None:
                await job.sender.abort()  # no-op after finish; frees the reservation otherwise
            return
        job.status = JobStatus.ABORTED
        if job.prefix is not None:  # pinned, never handed to a fetch
            self._spawn(self._store.release(job.prefix))
            job.prefix = None
        if job in self._pending:
            self._pending.remove(job)
        elif not job.computed.done():
            self._to_abort.append(job.request_id)
            self._wake.set()
        if job.sender is not None:
            await asyncio.shield(job.sender.abort())

    # -- the engine side -------------------------------------------------------------------

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._apply_pending()
            if not self.engine.has_unfinished_requests:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._step_started_at = self._clock()
            try:
                outputs = await loop.run_in_executor(
                    self._executor, self.engine.step, self._on_layer
                )
            except PrefixFetchError as exc:
                self._recompute(exc)
                continue
            self.meter.record(self._step_started_at, self._clock())
            self._finish_step(outputs)
        self._apply_pending()
        for request_id in list(self._jobs):
            self._drop(request_id)

    def _apply_pending(self) -> None:
        for request_id in self._to_abort:
            self._drop(request_id)
        self._to_abort.clear()
        for job in self._pending:
            try:
                self._add(job)
            except Exception as exc:  # validated already; anything here fails only this job
                job.computed.set_exception(exc)
                continue
            job.status = JobStatus.COMPUTING
        self._pending.clear()

    def _add(self, job: _Job) -> None:
        request, prefix = job.request, job.prefix
        job.prefix = None
        if prefix is not None:
            try:
                fetch = self.engine.add_request_with_prefix(
                    job.request_id,
                    request.prompt_token_ids,
                    request.params,
                    prefix.num_blocks * self.engine.config.block_size,
                )
            except BanaServeError as exc:  # no room for the prefix now: compute it instead
                self._spawn(self._store.release(prefix))
                log.info("request %s: store prefix not used: %s", job.request_id, exc)
            else:
                self.num_store_hit_tokens += prefix.num_blocks * self.engine.config.block_size
                job.num_store_blocks = prefix.num_blocks
                if job.prefetched is None:
                    self._spawn(self._fetch(fetch, prefix))
                else:
                    self._write_prefetched(fetch, job.prefetched)
                    self._spawn(self._store.release(prefix))
                return
        self.engine.add_request(job.request_id, request.prompt_token_ids, request.params)

    def _recompute(self, error: PrefixFetchError) -> None:
        log.warning("prefix fetch failed (%s); recomputing %s", error, error.request_ids)
        for request_id in error.request_ids:
            self.num_store_fallbacks += 1
            with contextlib.suppress(RequestNotFoundError):
                self.engine.recompute_prefix(request_id)

    # -- the global KV store ---------------------------------------------------------------

    async def _lookup(self, prompt: list[int]) -> CachedPrefix | None:
        """The prompt's longest prefix pinned in the store; None on a miss or any failure.
        Leaves at least one token to compute (the first token is sampled from it)."""
        bs = self.engine.config.block_size
        hashes = block_hashes(prompt[: (len(prompt) - 1) // bs * bs], bs, self.engine.fingerprint)
        # Read from the event loop while a step may run: a dict read, at worst stale, and a
        # stale answer only costs or saves one lookup.
        if not hashes or self.engine.block_manager.num_cached_hashes(hashes) == len(hashes):
            return None  # this worker's own prefix cache has all of it
        try:
            return await self._store.lookup(hashes)
        except StoreError as exc:
            log.warning("kvstore lookup failed, computing the whole prompt: %s", exc)
            return None

    async def _fetch(self, fetch: PrefixFetch, prefix: CachedPrefix) -> None:
        """Writes the prefix's KV into the engine layer by layer, reading layer l+1 from the
        store while layer l is written (and the step computes)."""
        like, positions = self._block_like(), fetch.block_indices
        num_layers = fetch.num_layers if fetch.pending else 0
        read: asyncio.Future[torch.Tensor] | None = None
        try:
            for layer in range(num_layers):
                data = await (read or self._store.read_layer(prefix, layer, positions, like))
                read = None
                if layer + 1 < num_layers:
                    nxt = self._store.read_layer(prefix, layer + 1, positions, like)
                    read = asyncio.ensure_future(nxt)
                if not self.engine.write_prefix_layer(fetch.request_id, layer, data):
                    break  # nobody needs it any more (aborted, recomputed)
        except Exception as exc:
            self.engine.fail_prefix(fetch.request_id, f"store read failed: {exc}")
        finally:
            if read is not None and not read.cancel():
                read.exception()  # a read that ended meanwhile: nobody wants its layer
            await self._store.release(prefix)

    async def _read_all(self, prefix: CachedPrefix) -> list[torch.Tensor] | None:
        like = self._block_like()
        positions = range(prefix.num_blocks)
        try:
            return [
                await self._store.read_layer(prefix, layer, positions, like)
                for layer in range(self.engine.spec.num_layers)
            ]
        except StoreError as exc:
            log.warning("kvstore read failed, computing the whole prompt: %s", exc)
            return None

    def _write_prefetched(self, fetch: PrefixFetch, layers: list[torch.Tensor]) -> None:
        if fetch.pending:
            for layer, data in enumerate(layers):
                self.engine.write_prefix_layer(
                    fetch.request_id, layer, data[:, fetch.block_indices]
                )

    def _block_like(self) -> torch.Tensor:
        """One block of one layer, as the store returns it: ``[2, bs, kv_heads, head_dim]``."""
        spec, kv = self.engine.spec, self.engine.kv_cache
        return torch.empty(
            2, self.engine.config.block_size, spec.num_kv_heads, spec.head_dim, dtype=kv.k.dtype
        )

    def _write_back_later(self, job: _Job) -> None:
        if self._store is not None and job.kv_layers:
            layers, job.kv_layers = job.kv_layers, []
            self._spawn(self._write_back(job.request_id, layers, job.num_store_blocks))

    async def _write_back(
        self, request_id: str, layers: list[tuple[torch.Tensor, KVLayout]], num_known: int
    ) -> None:
        hashes = layers[0][1].block_hashes[num_known:]
        if not hashes:
            return
        tensors = [data[:, num_known : num_known + len(hashes)] for data, _ in layers]
        try:
            await self._store.write_back(hashes, tensors)
        except StoreError as exc:
            log.warning("request %s: KV write-back to the store failed: %s", request_id, exc)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_layer(self, layer: int, ctx: StepContext) -> None:
        """Runs on the stepping thread after each layer: hand the layer's KV of every prompt
        that completes in this step to its sender."""
        if layer == 0:
            for request_id in ctx.num_tokens:
                job = self._jobs.get(request_id)
                if job is not None and job.scheduled_at is None:
                    job.scheduled_at = self._step_started_at
        for request_id in ctx.sampling:
            job = self._jobs.get(request_id)
            if job is not None and job.sender is not None and job.status is JobStatus.COMPUTING:
                if layer < job.num_layers_sent:
                    continue  # sent by an earlier try of this step (same KV)
                data, layout = self.engine.export_kv(request_id, layer)
                job.sender.send_layer(data, layout)
                job.num_layers_sent += 1
                if self._store is not None:
                    job.kv_layers.append((data, layout))

    def _finish_step(self, outputs: list[RequestOutput]) -> None:
        done_at = self._clock()
        for output in outputs:
            if not output.finished:
                self._drop(output.request_id)  # the decode worker continues it
            job = self._jobs.get(output.request_id)
            if job is not None and not job.computed.done():
                job.computed.set_result((output, done_at))

    def _drop(self, request_id: str) -> None:
        with contextlib.suppress(RequestNotFoundError):
            self.engine.abort(request_id)  # frees its blocks; full ones stay cached

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> WorkerStats:
        s = self.engine.stats()
        jobs = list(self._jobs.values())
        queued = [j for j in jobs if j.status in (JobStatus.QUEUED, JobStatus.COMPUTING)]
        return WorkerStats(
            num_blocks_total=s["num_blocks"],
            num_blocks_used=s["num_blocks"] - s["num_free_blocks"],
            num_blocks_free=s["num_free_blocks"],
            num_blocks_cached=s["num_cached_blocks"],
            num_queued_prefill_tokens=sum(len(j.request.prompt_token_ids) for j in queued),
            num_running_seqs=sum(j.status is JobStatus.COMPUTING for j in jobs),
            num_open_transfers=sum(j.status is JobStatus.TRANSFERRING for j in jobs),
        )

    async def load(self) -> LoadSnapshot:
        """This worker's load for a report to the router."""
        stats = self.stats()
        step_time, busy = self.meter.snapshot()
        return LoadSnapshot(
            stats.num_queued_prefill_tokens,
            stats.num_running_seqs,
            0,
            stats.num_blocks_used,
            stats.num_blocks_free,
            step_time,
            busy,
            LOAD_WINDOW_S,
        )
