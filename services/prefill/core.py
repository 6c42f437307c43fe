"""The prefill worker's logic, without grpc: prompts in, first tokens out, KV to decode workers.

A request passes through (``JobStatus``, changed only by the coroutine that owns the job):

1. QUEUED        - validated; its KV transfer is opened (connecting overlaps the wait) and it
                   waits in ``_pending`` to be added to the engine between two steps;
2. COMPUTING     - in the engine's batch. The engine runs on an ``EngineLoop``
                   (services/engine/loop.py): steps on its own thread, so the event loop stays
                   responsive. In the step that completes the prompt, the layer hook (engine
                   thread) exports each layer's KV the moment the layer is done and hands it to
                   the request's sender, which puts it on the wire while later layers compute;
3. TRANSFERRING  - the first token is sampled and returned at once; the request's blocks are
                   freed here (its full blocks stay in the prefix cache) while the sender waits
                   for the decode worker to acknowledge every layer. While this worker is a
                   layer migration's donor, the layers ``[k, L)`` ran on the helper: they are
                   read back from it (engine_side.py) and sent before the end frame;
4. DONE / ABORTED.

With a global KV store (``store``), step 1 also looks the prompt's full blocks up there and pins
the longest cached prefix; the request then enters the engine with that prefix marked computed
(``Engine.add_request_with_prefix``) and a fetch task writes its KV in layer by layer while the
step computes the suffix (layer l+1 in flight while layer l computes). A fetch that fails makes
the step raise ``PrefixFetchError``; the request is recomputed from scratch, output unchanged.
After the first token, the prompt's new full blocks are written back to the store in the
background, off the TTFT path. The store side of all this is ``store_prefix.py``.

Only the engine thread touches the engine: adds and aborts are the loop's commands, run between
two steps; the layer hook runs during a step; after each step the loop drops every request that
got its first token (``_drop_unfinished``: the decode worker continues it) before the next one,
and hands the outputs to the event loop, which resolves the waiting jobs. Every wait is bounded
by the request's deadline; a cancel, a deadline or a failed transfer aborts the sender and drops
the request from the engine, so no block outlives its request.

The engine knows each job by its own id (``Job.engine_id``, the request id and a number), so
an ended request whose abort is still queued, or whose last step is still running, never meets
a new request that reuses its id. A request id is in use from ``prefill`` until its job starts
ending; a new request with the id of one still in use waits up to ``id_reuse_wait_s`` for it
(the old call's cancellation may still be on its way), then gets ``AlreadyExistsError``.

A step that raises (other than ``PrefixFetchError``, which the loop answers by recomputing)
fails only the requests it computed: each gets ``StepFailedError`` (INTERNAL, with a log
reference), loses its blocks, and the loop steps on. Should the loop itself die, every job
still waiting for it fails with ``DependencyUnavailableError`` (UNAVAILABLE: the router retries elsewhere), later requests are
refused the same way, and ``died`` resolves, so the process can turn its health NOT_SERVING and
leave the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from services.common.errors import (
    AlreadyExistsError,
    DependencyUnavailableError,
    InvalidRequestError,
    StepFailedError,
)
from services.common.load import Admissions, LoadReport
from services.common.types import RequestOutput
from services.engine.engine import Engine
from services.engine.loop import EngineLoop, LoopConfig, StepFailure
from services.engine.snapshot import LoopSnapshot
from services.prefill.engine_side import EngineSide, dropper
from services.prefill.jobs import (
    FirstToken,
    Job,
    JobStatus,
    PrefillRequest,
    PrefillResult,
    WorkerStats,
)
from services.prefill.kvstore_client import KVStoreClient
from services.prefill.store_prefix import WRITE_BACK_CHUNK_BYTES, StorePrefixes
from services.prefill.transport import KVTransport, TransferStats
from services.prefill.write_backs import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DELAY_S,
    WriteBacks,
    WriteBackStats,
    WritePolicy,
    blocks_to_write,
)

__all__ = [
    "FirstToken",
    "JobStatus",
    "PrefillRequest",
    "PrefillResult",
    "PrefillWorker",
    "WorkerStats",
]

T = TypeVar("T")

LOAD_WINDOW_S = 1.0  # the window of the busy fraction in load reports
# How long a new request waits for an ended one with the same id to let go of it.
ID_REUSE_WAIT_S = 0.5


class PrefillWorker:
    def __init__(
        self,
        engine: Engine,
        transport: KVTransport,
        clock: Callable[[], float] = time.monotonic,
        store: KVStoreClient | None = None,
        store_overlap: bool = True,
        id_reuse_wait_s: float = ID_REUSE_WAIT_S,
        write_back_delay_s: float = DEFAULT_MAX_DELAY_S,
        write_back_max_bytes: int = DEFAULT_MAX_BYTES,
        write_back_chunk_bytes: int = WRITE_BACK_CHUNK_BYTES,
        write_policy: WritePolicy = WritePolicy.REUSED,
    ) -> None:
        self.engine = engine
        self._write_policy = write_policy
        self._id_reuse_wait_s = id_reuse_wait_s
        self._transport = transport
        self._store = (
            None
            if store is None
            else StorePrefixes(engine, store, self.engine_call, write_back_chunk_bytes)
        )
        # False: a store prefix is fetched whole before its request computes (the baseline
        # the layer-wise overlap is measured against).
        self._store_overlap = store_overlap
        # New blocks (those the write policy picks) go to the store once nothing is queued or
        # computing (write_backs.py).
        self._write_backs = (
            None
            if store is None
            else WriteBacks(self._busy, write_back_delay_s, write_back_max_bytes, clock)
        )
        self._background: set[asyncio.Task[None]] = set()
        self._clock = clock
        self._jobs: dict[str, Job] = {}  # by engine id
        self._in_use: dict[str, Job] = {}  # by request id, until the job starts ending
        self._admissions = Admissions()  # jobs queued since the last load report
        self._numbers = itertools.count(1)
        self._side = EngineSide(self._jobs, self._store, self._spawn_threadsafe)
        self._loop = EngineLoop(
            engine,
            LoopConfig("prefill", load_window_s=LOAD_WINDOW_S),
            on_layer_done=self._side.on_layer,
            after_step=self._side.after_step,
            clock=clock,
        )
        self._side.loop = self._loop
        self.meter = self._loop.meter  # step timings (load reports, metrics)

    @property
    def died(self) -> asyncio.Future[BaseException] | None:
        """Resolves with the error that ended the engine loop, if it ever ends unasked."""
        return self._loop.died

    @property
    def num_store_hit_tokens(self) -> int:
        return self._side.num_store_hit_tokens

    @property
    def write_back_stats(self) -> WriteBackStats | None:
        return None if self._write_backs is None else self._write_backs.stats

    def _busy(self) -> bool:
        """A request is queued or computing (a write-back waits for neither)."""
        return any(
            job.status in (JobStatus.QUEUED, JobStatus.COMPUTING) for job in self._jobs.values()
        )

    @property
    def num_store_fallbacks(self) -> int:
        return self._loop.snapshot.num_prefix_fallbacks

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop.start(self._on_outputs, self._fail_step, self._die)

    async def stop(self) -> None:
        """Ends the engine loop after the step in flight (never mid-step), every request
        dropped from the engine, and closes the transport."""
        for job in list(self._jobs.values()):
            _fail(job, DependencyUnavailableError("this prefill worker is stopping"))
            self._loop.submit(dropper(job.engine_id))
        await self._loop.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._transport.close()
        if self._write_backs is not None:
            await self._write_backs.close()
        if self._store is not None:
            await self._store.close()

    @property
    def snapshot(self) -> LoopSnapshot:
        """The engine's state and counters after the last step or command (never waits)."""
        return self._loop.snapshot

    async def engine_call(self, fn: Callable[[Engine], T]) -> T:
        """Runs ``fn(engine)`` on the engine thread between two steps and returns its result
        (an exception it raises propagates). ``fn`` must not block: every step waits for it."""
        return await self._loop.call(fn)

    # -- requests --------------------------------------------------------------------------

    def validate(self, request: PrefillRequest) -> None:
        if not request.request_id:
            raise InvalidRequestError("request_id is empty")
        if not request.target.address:
            raise InvalidRequestError("target.address is empty (a DecodeService HOST:PORT)")
        if not request.target.reservation_id:
            raise InvalidRequestError("target.reservation_id is empty (from ReserveKV)")
        self.engine.check_prompt(request.prompt_token_ids)
        first, n = request.target.first_block, len(request.prompt_token_ids)
        if first and first * self.engine.config.block_size >= n:
            raise InvalidRequestError(
                f"target.first_block {first} leaves none of the prompt's {n} tokens to send "
                f"(blocks of {self.engine.config.block_size}; the last token's block is sent)"
            )

    async def prefill(
        self, request: PrefillRequest, timeout_s: float | None = None
    ) -> AsyncIterator[FirstToken | PrefillResult]:
        """Yields the first token, then the result once the decode worker has the KV."""
        self.validate(request)
        self._check_alive()
        deadline = None if timeout_s is None else self._clock() + timeout_s
        await self._wait_for_id(request.request_id, deadline)
        engine_id = f"{request.request_id}#{next(self._numbers)}"
        job = Job(request, engine_id, self._clock(), asyncio.get_running_loop().create_future())
        job.first_token = request.target.first_block * self.engine.config.block_size
        self._jobs[engine_id] = job
        self._in_use[request.request_id] = job
        self._admissions.add(request.request_id)  # queued: ``stats`` counts it now
        try:
            await self._prepare(job, timeout_s, deadline)
            self._check_alive()
            job.added = self._loop.submit(lambda engine: self._side.add(job, engine))
            await self._bounded(asyncio.wrap_future(job.added), deadline)
            output, computed_at = await self._bounded(asyncio.shield(job.computed), deadline)
            if job.sender.failed is not None:
                raise job.sender.failed
            yield FirstToken(output.new_token_ids, output.text_delta)
            if job.remote_layers:  # this worker is a migration's donor (engine_side.py)
                await self._bounded(self._send_remote_layers(job), deadline)
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

    async def _prepare(self, job: Job, timeout_s: float | None, deadline: float | None) -> None:
        """Opens the job's KV transfer and, with a store, pins its cached prefix."""
        request = job.request
        job.sender = await self._bounded(
            self._transport.open(
                request.target, request.request_id, self.engine.spec.num_layers, timeout_s
            ),
            deadline,
        )
        if self._store is not None:
            found = await self._store.lookup(request.prompt_token_ids)
            job.prefix, job.num_seen_blocks = found.prefix, found.num_seen
            if job.prefix is not None and not self._store_overlap:
                prefetch = self._store.read_all(job.prefix)
                job.prefetched = await self._bounded(prefetch, deadline)

    def _result(
        self, job: Job, output: RequestOutput, computed_at: float, transfer: TransferStats | None
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

    async def _end(self, job: Job) -> None:
        if self._in_use.get(job.request_id) is job:
            del self._in_use[job.request_id]
        job.released.set()
        del self._jobs[job.engine_id]
        if self._write_backs is not None:
            self._write_backs.kick()  # perhaps idle now
        if job.status is JobStatus.DONE:
            if job.sender is not None:
                await job.sender.abort()  # no-op after finish; frees the reservation otherwise
            return
        job.status = JobStatus.ABORTED
        if job.added is None or job.added.cancel():  # never reached the engine
            if job.prefix is not None:  # pinned, never handed to a fetch
                self._spawn(self._store.release(job.prefix))
                job.prefix = None
        else:
            self._loop.submit(dropper(job.engine_id))  # a no-op if it left already
        if job.sender is not None:
            await asyncio.shield(job.sender.abort())

    # -- the loop's handlers (event loop) --------------------------------------------------

    def _on_outputs(self, outputs: list[RequestOutput], done_at: float) -> None:
        self._finish_step(outputs, done_at)

    def _finish_step(self, outputs: list[RequestOutput], done_at: float) -> None:
        """The engine thread dropped every request here already (``drop_unfinished``)."""
        for output in outputs:
            job = self._jobs.get(output.request_id)
            if job is not None and not job.computed.done():
                job.computed.set_result((output, done_at))

    def _fail_step(self, failure: StepFailure) -> None:
        """A step raised: the loop freed the requests it computed; fail their jobs."""
        for engine_id in failure.request_ids:
            job = self._jobs.get(engine_id)
            if job is not None:
                _fail(
                    job,
                    StepFailedError(
                        f"the engine step computing request {job.request_id!r} failed "
                        f"(ref {failure.ref} in the prefill worker's log); the request was dropped"
                    ),
                )

    def _die(self, error: BaseException) -> None:
        """The loop steps no more: every job still waiting for it fails (and, ending, drops
        its request from the engine: commands still run)."""
        for job in self._jobs.values():
            message = (
                f"this prefill worker's engine loop stopped while {job.request_id!r} waited for it"
            )
            _fail(job, DependencyUnavailableError(message))

    async def _send_remote_layers(self, job: Job) -> None:
        """The layers a migration's helper computed for the prompt, to the sender in layer
        order. (No store write-back for such a prompt: its KV is not all in this worker's
        prefix cache, so ``read_cached_blocks`` declines it.)"""
        futures, job.remote_layers = job.remote_layers, []
        for future in futures:
            try:
                data, layout = await asyncio.wrap_future(future)
            except Exception as e:  # noqa: BLE001 - the helper's copy is gone: UNAVAILABLE
                raise DependencyUnavailableError(
                    f"request {job.request_id!r}: the KV its migration helper computed could "
                    f"not be read back: {e}"
                ) from e
            assert job.sender is not None
            job.sender.send_layer(data, layout)

    def _write_back_later(self, job: Job) -> None:
        """Queues the prompt's new full blocks for the store; they are read back from the
        prefix cache when the write-back runs, so nothing is held for it meanwhile."""
        if self._store is None or self._write_backs is None:
            return
        store, request_id, prompt = self._store, job.request_id, job.request.prompt_token_ids
        num_full = len(prompt) // self.engine.config.block_size
        blocks = blocks_to_write(
            self._write_policy, job.num_store_blocks, job.num_seen_blocks, num_full
        )
        if not blocks:
            if job.num_store_blocks < num_full:  # new blocks, none of them reused
                self._write_backs.not_reused()
            return
        num_bytes = len(blocks) * store.block_bytes()
        self._write_backs.add(
            lambda: store.write_back(request_id, prompt, blocks.start, blocks.stop), num_bytes
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _spawn_threadsafe(self, job: Job, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """From the engine thread: start ``make()`` on ``job``'s event loop."""
        job.computed.get_loop().call_soon_threadsafe(lambda: self._spawn(make()))

    def holds_work(self) -> bool:
        """A prompt is queued, computing or handing its KV off here (a drain waits for none)."""
        return bool(self._jobs)

    # -- stats (from the loop's snapshot: never waits behind a step) -------------------------

    def stats(self) -> WorkerStats:
        s = self._loop.snapshot.engine
        jobs = list(self._jobs.values())
        queued = [j for j in jobs if j.status in (JobStatus.QUEUED, JobStatus.COMPUTING)]
        return WorkerStats(
            num_blocks_total=s.num_blocks,
            num_blocks_used=s.num_blocks - s.num_free_blocks,
            num_blocks_free=s.num_free_blocks,
            num_blocks_cached=s.num_cached_blocks,
            num_queued_prefill_tokens=sum(len(j.request.prompt_token_ids) for j in queued),
            num_running_seqs=sum(j.status is JobStatus.COMPUTING for j in jobs),
            num_open_transfers=sum(j.status is JobStatus.TRANSFERRING for j in jobs),
        )

    async def load(self) -> LoadReport:
        """This worker's load for a report to the router."""
        stats = self.stats()
        step_time, busy = self._loop.meter.snapshot()
        engine = self._loop.snapshot.engine
        return LoadReport(
            stats.num_queued_prefill_tokens,
            stats.num_running_seqs,
            0,
            stats.num_blocks_used,
            stats.num_blocks_free,
            step_time,
            busy,
            LOAD_WINDOW_S,
            num_hosted_layers=engine.num_hosted_layers,
            num_hosted_blocks=engine.num_hosted_blocks,
            num_hosted_layer_blocks=engine.num_hosted_layer_blocks,
            admitted=self._admissions.take(),
        )


def _fail(job: Job, error: Exception) -> None:
    if not job.computed.done():
        job.computed.set_exception(error)
