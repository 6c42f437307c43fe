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
background, off the TTFT path. The store side of all this is ``store_prefix.py``.

Only ``_step_loop`` touches the engine, and only between steps (adds and aborts queue up in
``_pending`` and ``_to_abort``); the layer hook, which runs during a step, only reads it. Every
wait is bounded by the request's deadline; a cancel, a deadline or a failed transfer aborts the
sender and drops the request from the engine, so no block outlives its request.

The engine knows each job by its own id (``_Job.engine_id``, the request id and a number), so
an ended request whose abort is still queued, or whose last step is still running, never meets
a new request that reuses its id. A request id is in use from ``prefill`` until its job starts
ending; a new request with the id of one still in use waits up to ``id_reuse_wait_s`` for it
(the old call's cancellation may still be on its way), then gets ``AlreadyExistsError``.

A step that raises (other than ``PrefixFetchError``) fails only the requests it computed: each
gets ``StepFailedError`` (INTERNAL, with a log reference), loses its blocks, and the loop steps
on. Should the loop itself end unexpectedly, every job still waiting for it fails with
``DependencyUnavailableError`` (UNAVAILABLE: the router retries elsewhere), later requests are
refused the same way, and ``died`` resolves, so the process can turn its health NOT_SERVING and
leave the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from services.common.errors import (
    AlreadyExistsError,
    BanaServeError,
    DependencyUnavailableError,
    InvalidRequestError,
    RequestNotFoundError,
    StepFailedError,
)
from services.common.load import LoadMeter, LoadSnapshot
from services.common.types import FinishReason, RequestOutput, SamplingParams
from services.engine.engine import Engine, StepContext
from services.engine.kv_cache import KVLayout
from services.engine.prefix_fetch import PrefixFetchError
from services.prefill.kvstore_client import CachedPrefix, KVStoreClient
from services.prefill.store_prefix import StorePrefixes
from services.prefill.transport import KVSender, KVTarget, KVTransport, TransferStats

T = TypeVar("T")
log = logging.getLogger(__name__)


LOAD_WINDOW_S = 1.0  # the window of the busy fraction in load reports
# How long a new request waits for an ended one with the same id to let go of it.
ID_REUSE_WAIT_S = 0.5


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
    engine_id: str  # unique per job: what the engine, the hook and the step outputs name
    arrived_at: float
    computed: asyncio.Future[tuple[RequestOutput, float]]
    status: JobStatus = JobStatus.QUEUED
    # Set once the job lets go of its request id (it has started ending).
    released: asyncio.Event = field(default_factory=asyncio.Event)
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
        id_reuse_wait_s: float = ID_REUSE_WAIT_S,
    ) -> None:
        self.engine = engine
        self._id_reuse_wait_s = id_reuse_wait_s
        self._transport = transport
        self._store = None if store is None else StorePrefixes(engine, store)
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
        self._jobs: dict[str, _Job] = {}  # by engine id
        self._in_use: dict[str, _Job] = {}  # by request id, until the job starts ending
        self._numbers = itertools.count(1)
        self._pending: list[_Job] = []
        self._to_abort: list[str] = []  # engine ids
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._step_started_at = 0.0
        self._step_ids: tuple[str, ...] | None = None  # the running step's engine ids
        self.meter = LoadMeter(LOAD_WINDOW_S, clock)
        # Resolves with the error that ended the step loop, if it ever ends unasked.
        self.died: asyncio.Future[BaseException] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.died = asyncio.get_running_loop().create_future()
        self._loop_task = asyncio.create_task(self._step_loop())

    async def stop(self) -> None:
        """Ends the step loop after the step in flight (never mid-step) and closes the transport."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await asyncio.wait({self._loop_task})  # a loop that died has reported it already
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
        self._check_alive()
        deadline = None if timeout_s is None else self._clock() + timeout_s
        await self._wait_for_id(request.request_id, deadline)
        engine_id = f"{request.request_id}#{next(self._numbers)}"
        job = _Job(request, engine_id, self._clock(), asyncio.get_running_loop().create_future())
        self._jobs[engine_id] = job
        self._in_use[request.request_id] = job
        try:
            job.sender = await self._bounded(
                self._transport.open(
                    request.target, request.request_id, self.engine.spec.num_layers, timeout_s
                ),
                deadline,
            )
            if self._store is not None:
                job.prefix = await self._store.lookup(request.prompt_token_ids)
                if job.prefix is not None and not self._store_overlap:
                    prefetch = self._store.read_all(job.prefix)
                    job.prefetched = await self._bounded(prefetch, deadline)
            self._check_alive()
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

    def _check_alive(self) -> None:
        if self.died is not None and self.died.done():
            raise DependencyUnavailableError(
                "this prefill worker's engine loop has stopped; it is shutting down"
            )

    async def _wait_for_id(self, request_id: str, deadline: float | None) -> None:
        """Returns once no running job holds ``request_id`` (see the module docstring)."""
        old = self._in_use.get(request_id)
        if old is not None:
            wait = self._id_reuse_wait_s
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - self._clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(old.released.wait(), wait)
        if request_id in self._in_use:
            raise AlreadyExistsError(
                f"request id {request_id!r} is already in use by a running request"
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
        if self._in_use.get(job.request_id) is job:
            del self._in_use[job.request_id]
        job.released.set()
        del self._jobs[job.engine_id]
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
            self._to_abort.append(job.engine_id)
            self._wake.set()
        if job.sender is not None:
            await asyncio.shield(job.sender.abort())

    # -- the engine side -------------------------------------------------------------------

    async def _step_loop(self) -> None:
        try:
            await self._steps()
        except Exception as exc:  # reported through ``died``; nobody awaits this task
            self._die(exc)
        finally:
            self._pending.clear()  # never added: nothing to free in the engine
            for engine_id in [*self._to_abort, *self._jobs]:
                self._drop(engine_id)
            self._to_abort.clear()

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._apply_pending()
            if not self.engine.has_unfinished_requests:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._step_started_at = self._clock()
            self._step_ids = None
            try:
                outputs = await loop.run_in_executor(
                    self._executor, self.engine.step, self._on_layer
                )
            except PrefixFetchError as exc:
                self._recompute(exc)
                continue
            except Exception as exc:
                self._fail_step(exc)
                continue
            self.meter.record(self._step_started_at, self._clock())
            self._finish_step(outputs)

    def _fail_step(self, error: Exception) -> None:
        """A step raised: fail the requests it computed, free their blocks, step on. They are
        the ones the engine names (an error with ``request_ids``), else those the layer hook
        saw, else (it failed before its first layer) every one in the engine."""
        ref = uuid.uuid4().hex[:12]
        ids = getattr(error, "request_ids", None) or self._step_ids
        if ids is None:
            ids = tuple(i for i, j in self._jobs.items() if j.status is JobStatus.COMPUTING)
        log.error("engine step failed (ref %s); failing %s", ref, list(ids), exc_info=error)
        for engine_id in ids:
            self._drop(engine_id)
            job = self._jobs.get(engine_id)
            if job is not None and not job.computed.done():
                job.computed.set_exception(
                    StepFailedError(
                        f"the engine step computing request {job.request_id!r} failed "
                        f"(ref {ref} in the prefill worker's log); the request was dropped"
                    )
                )

    def _die(self, error: BaseException) -> None:
        log.critical("the prefill step loop died; failing every waiting request", exc_info=error)
        for job in self._jobs.values():
            if not job.computed.done():
                job.computed.set_exception(
                    DependencyUnavailableError(
                        "this prefill worker's engine loop stopped while "
                        f"{job.request_id!r} waited for it"
                    )
                )
        if self.died is not None and not self.died.done():
            self.died.set_result(error)

    def _apply_pending(self) -> None:
        for engine_id in self._to_abort:
            self._drop(engine_id)
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
                    job.engine_id,
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
                    self._spawn(self._store.fetch(fetch, prefix))
                else:
                    self._store.write_prefetched(fetch, job.prefetched)
                    self._spawn(self._store.release(prefix))
                return
        self.engine.add_request(job.engine_id, request.prompt_token_ids, request.params)

    def _recompute(self, error: PrefixFetchError) -> None:
        log.warning("prefix fetch failed (%s); recomputing %s", error, error.request_ids)
        for request_id in error.request_ids:
            self.num_store_fallbacks += 1
            with contextlib.suppress(RequestNotFoundError):
                self.engine.recompute_prefix(request_id)

    def _write_back_later(self, job: _Job) -> None:
        if self._store is not None and job.kv_layers:
            layers, job.kv_layers = job.kv_layers, []
            self._spawn(self._store.write_back(job.request_id, layers, job.num_store_blocks))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_layer(self, layer: int, ctx: StepContext) -> None:
        """Runs on the stepping thread after each layer: hand the layer's KV of every prompt
        that completes in this step to its sender."""
        if layer == 0:
            self._step_ids = tuple(ctx.num_tokens)
            for engine_id in ctx.num_tokens:
                job = self._jobs.get(engine_id)
                if job is not None and job.scheduled_at is None:
                    job.scheduled_at = self._step_started_at
        for engine_id in ctx.sampling:
            job = self._jobs.get(engine_id)
            if job is not None and job.sender is not None and job.status is JobStatus.COMPUTING:
                if layer < job.num_layers_sent:
                    continue  # sent by an earlier try of this step (same KV)
                data, layout = self.engine.export_kv(engine_id, layer)
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

    def _drop(self, engine_id: str) -> None:
        with contextlib.suppress(RequestNotFoundError):
            self.engine.abort(engine_id)  # frees its blocks; full ones stay cached

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
