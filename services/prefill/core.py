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

Only ``_step_loop`` touches the engine, and only between steps (adds and aborts queue up in
``_pending`` and ``_to_abort``); the layer hook, which runs during a step, only reads it. Every
wait is bounded by the request's deadline; a cancel, a deadline or a failed transfer aborts the
sender and drops the request from the engine, so no block outlives its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from services.common.errors import InvalidRequestError, RequestNotFoundError
from services.common.load import LoadMeter, LoadSnapshot
from services.common.types import FinishReason, RequestOutput, SamplingParams
from services.engine.engine import Engine, StepContext
from services.prefill.transport import KVSender, KVTarget, KVTransport, TransferStats

T = TypeVar("T")


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

    @property
    def request_id(self) -> str:
        return self.request.request_id


class PrefillWorker:
    def __init__(
        self,
        engine: Engine,
        transport: KVTransport,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self._transport = transport
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
        self._executor.shutdown(wait=True)
        await self._transport.close()

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
            self._pending.append(job)
            self._wake.set()
            output, computed_at = await self._bounded(asyncio.shield(job.computed), deadline)
            if job.sender.failed is not None:
                raise job.sender.failed
            yield FirstToken(output.new_token_ids, output.text_delta)
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
            outputs = await loop.run_in_executor(self._executor, self.engine.step, self._on_layer)
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
                self.engine.add_request(
                    job.request_id, job.request.prompt_token_ids, job.request.params
                )
            except Exception as exc:  # validated already; anything here fails only this job
                job.computed.set_exception(exc)
                continue
            job.status = JobStatus.COMPUTING
        self._pending.clear()

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
                data, layout = self.engine.export_kv(request_id, layer)
                job.sender.send_layer(data, layout)

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
