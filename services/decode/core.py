"""The decode worker's logic, without grpc (decode.proto has the wire lifecycle).

A request passes through one table entry whose status only this module changes:

1. RESERVED  - ``reserve`` took the prompt's blocks (``Engine.begin_prompt_import``) under a
               lease, and a deadline when the request has one;
2. RECEIVING - ``receive`` got the transfer's header and writes each layer as its last chunk
               arrives (``Engine.import_kv``);
3. RUNNING   - the end frame brought the first token (``Engine.finish_prompt_import``); the
               engine loop steps the batch and queues every output for ``stream``;
4. DONE      - finished, released, expired (lease before step 3, deadline at any step), its
               transfer broke or its stream was cancelled: the engine holds nothing for it. The
               entry stays only until its stream has read the last event.

A mixed worker (``DecodeConfig.prefill_locally``) also takes ``reserve(prefill_locally=True)``:
the prompt joins the engine's batch at once (``Engine.add_request``) and the entry starts at
RUNNING; the engine prefills it alongside the running decodes and the stream carries every
token, the first included.

Every engine call runs on one worker thread, in submission order: steps are CPU-bound and the
engine is not thread-safe, so an abort submitted before a ``stats`` call is always visible to it.
The one exception is ``Engine.import_kv``, a copy into blocks only the importing request holds:
it runs on a second thread, so KV keeps arriving while a decode step runs (queued behind the
steps, a 30-layer transfer would wait 30 steps). An abort of a request whose import is in
flight waits for that import, so no copy ever lands in blocks freed to someone else.
The table itself is touched only from the event loop. Every wait is bounded: a lease or
deadline is enforced by ``expire_overdue`` (swept every ``sweep_interval_s``), and a stream
waits at most ``stream_idle_timeout_s`` for its next event.

Request ids: the engine knows each entry by its own id (``_Entry.engine_id``: the request id
and a number), so an ended request's queued abort or last step output can never reach a new
request that reuses its id. A ``reserve`` of an id whose entry is DONE replaces that entry (its
unread tokens, if any, are dropped); one whose entry still runs waits up to
``DecodeConfig.id_reuse_wait_s`` for it to end, then gets ``AlreadyExistsError``.

A step that raises fails only the requests it computed: their streams end with
``StepFailedError`` (INTERNAL, with a log reference), their blocks are freed, and the loop
steps on. Should the loop itself end unexpectedly, every entry is freed, later reserves are
refused (UNAVAILABLE) and ``died`` resolves, so the process can turn its health NOT_SERVING and
leave the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from services.common.errors import (
    AlreadyExistsError,
    BanaServeError,
    ConfigError,
    DependencyUnavailableError,
    InvalidRequestError,
    RequestNotFoundError,
    StepFailedError,
)
from services.common.hashing import block_hashes
from services.common.load import LoadMeter, LoadSnapshot
from services.common.types import FinishReason, RequestOutput, SamplingParams
from services.decode.transfer import (
    LayerAssembler,
    LayerChunk,
    TransferEnd,
    TransferFrame,
    TransferHeader,
    TransferResult,
)
from services.engine.engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeConfig:
    default_lease_s: float = 10.0
    max_lease_s: float = 60.0
    sweep_interval_s: float = 0.05
    # Longest a stream waits for its next event (the lease and deadline normally end it sooner).
    stream_idle_timeout_s: float = 60.0
    # How long a request that finished before anyone streamed it keeps its tokens.
    finished_retention_s: float = 30.0
    # The engine loop rechecks for work at least this often when idle.
    idle_poll_s: float = 0.5
    load_window_s: float = 1.0
    # A mixed (colocated) worker: ``reserve`` may ask it to prefill the prompt itself.
    prefill_locally: bool = False
    # How long a reserve waits for a running request with the same id to end.
    id_reuse_wait_s: float = 0.5

    def __post_init__(self) -> None:
        if not self.id_reuse_wait_s >= 0:
            raise ConfigError(f"id_reuse_wait_s must be >= 0, got {self.id_reuse_wait_s}")
        for name in ("default_lease_s", "max_lease_s", "sweep_interval_s", "idle_poll_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.default_lease_s > self.max_lease_s:
            raise ConfigError("default_lease_s must not exceed max_lease_s")


class RequestStatus(enum.Enum):
    RESERVED = "reserved"
    RECEIVING = "receiving"
    RUNNING = "running"
    DONE = "done"


# -- the stream's events and the views of the table (servicer.py maps them to protos) -------


@dataclass(frozen=True)
class TokenDelta:
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    num_completion_tokens: int  # the prefill worker's first token included
    num_cached_tokens: int = 0  # prefix-cache hits of a local prefill


StreamEvent = TokenDelta | Finished


@dataclass(frozen=True)
class _Failed:
    """Ends a stream with an error instead of ``Finished`` (the stream raises it)."""

    error: BanaServeError


@dataclass(frozen=True)
class Reservation:
    request_id: str
    reservation_id: str
    status: RequestStatus
    num_blocks: int
    lease_s: float  # granted (from ``reserve``) or left (in ``stats``)


@dataclass(frozen=True)
class WorkerStats:
    num_blocks_total: int
    num_blocks_free: int
    num_blocks_cached: int
    num_running_seqs: int
    num_waiting_seqs: int
    reservations: list[Reservation]

    @property
    def num_blocks_used(self) -> int:
        return self.num_blocks_total - self.num_blocks_free


@dataclass(eq=False)
class _Entry:
    request_id: str
    engine_id: str  # unique per entry: what the engine and its outputs name
    reservation_id: str
    prompt_token_ids: list[int]
    num_blocks: int
    lease_expiry: float
    deadline: float | None
    status: RequestStatus = RequestStatus.RESERVED
    events: asyncio.Queue[StreamEvent | _Failed] = field(default_factory=asyncio.Queue)
    streaming: bool = False
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    done_at: float = math.inf
    importing: Future[None] | None = None  # the layer being copied in, off the engine thread
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set with status DONE


class DecodeWorker:
    """Owns an engine and the table of its requests; see the module docstring for the flow."""

    def __init__(
        self,
        engine: Engine,
        config: DecodeConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.config = config or DecodeConfig()
        self._clock = clock
        self.meter = LoadMeter(self.config.load_window_s, clock)
        self._table: dict[str, _Entry] = {}  # by request id
        self._live: dict[str, _Entry] = {}  # by engine id, until the entry is DONE
        self._numbers = itertools.count(1)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="decode-engine")
        self._importer = ThreadPoolExecutor(1, thread_name_prefix="decode-import")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Resolves with the error that ended the engine loop, if it ever ends unasked.
        self.died: asyncio.Future[BaseException] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.died = asyncio.get_running_loop().create_future()
        self._tasks = [
            asyncio.create_task(self._engine_loop(), name="decode-engine-loop"),
            asyncio.create_task(self._sweep_loop(), name="decode-sweeper"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)  # a loop that died has reported it already
        freed = [self._free(e) for e in list(self._table.values())]
        for future in freed:
            await asyncio.wrap_future(future)
        self._importer.shutdown(wait=True)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    # -- 1. reserve ------------------------------------------------------------------------

    async def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lease_s: float | None = None,
        timeout_s: float | None = None,
        prefill_locally: bool = False,
    ) -> Reservation:
        if prefill_locally and not self.config.prefill_locally:
            raise ConfigError("this is a decode worker: only a mixed worker prefills locally")
        if not request_id:
            raise InvalidRequestError("request_id is empty")
        if lease_s is not None and lease_s <= 0:
            raise InvalidRequestError(f"lease must be positive, got {lease_s}s")
        if timeout_s is not None and timeout_s <= 0:
            raise TimeoutError(f"request {request_id!r} arrived after its deadline")
        self._check_alive()
        await self._wait_for_id(request_id, timeout_s)
        lease = min(lease_s or self.config.default_lease_s, self.config.max_lease_s)
        now = self._clock()
        entry = _Entry(
            request_id,
            f"{request_id}#{next(self._numbers)}",
            uuid.uuid4().hex,
            list(prompt_token_ids),
            -(-len(prompt_token_ids) // self.engine.config.block_size),
            now + lease,
            None if timeout_s is None else now + timeout_s,
        )
        self._table[request_id] = entry
        self._live[entry.engine_id] = entry
        add = self.engine.add_request if prefill_locally else self.engine.begin_prompt_import
        try:
            await self._call(add, entry.engine_id, entry.prompt_token_ids, params)
            if prefill_locally:
                self._start_local(entry)
        except BaseException:
            self._free(entry)
            raise
        return Reservation(request_id, entry.reservation_id, entry.status, entry.num_blocks, lease)

    def engine_id(self, request_id: str) -> str:
        """The id this worker's engine knows ``request_id``'s current entry by."""
        entry = self._table.get(request_id)
        if entry is None:
            raise RequestNotFoundError(f"no request {request_id!r} here")
        return entry.engine_id

    def _check_alive(self) -> None:
        if self.died is not None and self.died.done():
            raise DependencyUnavailableError(
                "this decode worker's engine loop has stopped; it is shutting down"
            )

    async def _wait_for_id(self, request_id: str, timeout_s: float | None) -> None:
        """Returns once ``request_id`` is free here: an entry that ended only waits for its
        stream to read it, and is replaced; a running one is waited for, briefly."""
        old = self._table.get(request_id)
        if old is not None and old.status is not RequestStatus.DONE:
            wait = self.config.id_reuse_wait_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(old.ended.wait(), min(wait, timeout_s or wait))
        old = self._table.get(request_id)
        if old is not None and old.status is not RequestStatus.DONE:
            raise AlreadyExistsError(
                f"request id {request_id!r} already exists here (still running)"
            )
        if old is not None:
            del self._table[request_id]  # its stream, if one is open, keeps its own entry

    def _start_local(self, entry: _Entry) -> None:
        if entry.status is RequestStatus.DONE:  # freed meanwhile: its abort is queued already
            raise RequestNotFoundError(f"request {entry.request_id!r} was released")
        entry.status = RequestStatus.RUNNING
        self._wake.set()

    # -- 2. receive ------------------------------------------------------------------------

    async def receive(self, frames: AsyncIterator[TransferFrame]) -> TransferResult:
        """Runs one transfer: header, chunks, end. Anything else, or a break, frees the entry."""
        entry: _Entry | None = None
        try:
            header = await anext(frames, None)
            if not isinstance(header, TransferHeader):
                raise InvalidRequestError("a transfer must start with its header")
            entry = self._claim(header)
            self._check_layout(entry, header)
            assembler = LayerAssembler(header.layout, header.num_layers)
            async for frame in frames:
                if isinstance(frame, LayerChunk):
                    data = assembler.add(frame)
                    if data is not None:
                        layout = replace(header.layout, layer=frame.layer)
                        await self._import(entry, data, layout)
                elif isinstance(frame, TransferEnd):
                    assembler.check_complete()
                    await self._start_running(entry, frame.first_token_id)
                    entry = None  # the stream owns it now
                    return TransferResult(assembler.num_layers, assembler.num_bytes)
                else:
                    raise InvalidRequestError("a transfer has exactly one header")
                self._check_live(entry)
            raise InvalidRequestError("the transfer ended without its end frame")
        finally:
            if entry is not None:
                self._free(entry)

    async def _import(self, entry: _Entry, data: Any, layout: Any) -> None:
        # Checked right before submitting, on the event loop: a ``_free`` after this sees the
        # import in flight and waits for it; one before it makes this raise.
        self._check_live(entry)
        entry.importing = self._importer.submit(
            self.engine.import_kv, entry.engine_id, data, layout
        )
        await asyncio.wrap_future(entry.importing)

    def _claim(self, header: TransferHeader) -> _Entry:
        entry = self._table.get(header.request_id)
        if entry is None or entry.reservation_id != header.reservation_id:
            raise RequestNotFoundError(
                f"no reservation {header.reservation_id!r} for request {header.request_id!r}"
            )
        self._check_live(entry)
        if entry.status is not RequestStatus.RESERVED:
            raise InvalidRequestError(f"reservation {header.reservation_id!r} is already in use")
        entry.status = RequestStatus.RECEIVING
        return entry

    def ended(self, request_id: str) -> asyncio.Event:
        """Set once ``request_id`` holds nothing here (finished, released, expired). A frame
        source that waits on its sender (the data-plane receiver) stops waiting then: unlike a
        broken gRPC stream, a silent sender there is noticed by nobody else."""
        entry = self._table.get(request_id)
        if entry is not None:
            return entry.ended
        gone = asyncio.Event()
        gone.set()
        return gone

    def _check_live(self, entry: _Entry) -> None:
        if entry.status is RequestStatus.DONE or self._table.get(entry.request_id) is not entry:
            raise RequestNotFoundError(f"reservation of {entry.request_id!r} expired or released")

    def _check_layout(self, entry: _Entry, header: TransferHeader) -> None:
        e, got = self.engine, header.layout
        mine = (e.kv_cache.dtype_name, e.config.block_size, e.spec.num_kv_heads, e.spec.head_dim)
        theirs = (got.dtype, got.block_size, got.num_kv_heads, got.head_dim)
        if got.fingerprint != e.fingerprint:
            raise InvalidRequestError("KV was computed by a different model or dtype")
        if theirs != mine or header.num_layers != e.spec.num_layers:
            raise InvalidRequestError(
                f"KV layout (dtype, block, heads, dim, layers) {(*theirs, header.num_layers)} "
                f"!= this worker's {(*mine, e.spec.num_layers)}"
            )
        if got.num_tokens != len(entry.prompt_token_ids):
            raise InvalidRequestError(
                f"KV covers {got.num_tokens} tokens, the reservation {len(entry.prompt_token_ids)}"
            )
        expected = block_hashes(entry.prompt_token_ids, got.block_size, e.fingerprint)
        if list(got.block_hashes) != expected:
            raise InvalidRequestError("KV block hashes do not match the reserved prompt")

    async def _start_running(self, entry: _Entry, first_token_id: int) -> None:
        output = await self._call(self.engine.finish_prompt_import, entry.engine_id, first_token_id)
        if entry.status is RequestStatus.DONE:  # freed meanwhile: its abort is queued already
            raise RequestNotFoundError(f"reservation of {entry.request_id!r} expired or released")
        entry.status = RequestStatus.RUNNING
        entry.num_completion_tokens = 1
        if output.finished:  # the first token ended it; the engine holds nothing
            self._finish(entry, output.finish_reason or FinishReason.STOP)
        self._wake.set()

    # -- 3. run and stream -----------------------------------------------------------------

    async def _engine_loop(self) -> None:
        try:
            await self._steps()
        except Exception as exc:  # reported through ``died``; nobody awaits this task
            log.critical("the decode engine loop died; freeing every request", exc_info=exc)
            for entry in list(self._table.values()):
                message = f"this decode worker's engine loop stopped while {entry.request_id!r} ran"
                self._free(entry, DependencyUnavailableError(message))
            if self.died is not None and not self.died.done():
                self.died.set_result(exc)

    async def _steps(self) -> None:
        while True:
            if not any(e.status is RequestStatus.RUNNING for e in self._table.values()):
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.idle_poll_s)
                continue
            start = self._clock()
            try:
                outputs = await self._call(self.engine.step)
            except Exception as exc:
                self._fail_step(exc)
                continue
            self.meter.record(start, self._clock())
            self._dispatch(outputs)

    def _fail_step(self, error: Exception) -> None:
        """A step raised: fail the requests it computed and step on. The engine names them
        when it can (an error with ``request_ids``); otherwise they are the sequences it was
        running (a preempted one waits, and was not in the step). No layer hook is passed to
        tell exactly: a hooked step runs without micro-batches."""
        ref = uuid.uuid4().hex[:12]
        ids = getattr(error, "request_ids", None)
        if ids is None:
            ids = [seq.request_id for seq in list(self.engine.scheduler.running)]
        log.error("engine step failed (ref %s); failing %s", ref, list(ids), exc_info=error)
        for engine_id in ids:
            entry = self._live.get(engine_id)
            if entry is not None:
                message = (
                    f"the engine step computing request {entry.request_id!r} failed "
                    f"(ref {ref} in the decode worker's log); the request was dropped"
                )
                self._free(entry, StepFailedError(message))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            entry = self._live.get(out.request_id)
            if entry is None or entry.status is RequestStatus.DONE:
                continue  # released while the step ran; its abort is queued
            entry.num_completion_tokens += len(out.new_token_ids)
            entry.num_cached_tokens = out.num_cached_tokens
            entry.events.put_nowait(TokenDelta(list(out.new_token_ids), out.text_delta))
            if out.finished:
                self._finish(entry, out.finish_reason or FinishReason.STOP)

    def _finish(self, entry: _Entry, reason: FinishReason) -> None:
        self._end(entry, Finished(reason, entry.num_completion_tokens, entry.num_cached_tokens))

    def _end(self, entry: _Entry, last: Finished | _Failed) -> None:
        self._live.pop(entry.engine_id, None)
        entry.status = RequestStatus.DONE
        entry.ended.set()
        entry.done_at = self._clock()
        entry.events.put_nowait(last)

    async def stream(self, request_id: str) -> AsyncIterator[StreamEvent]:
        """Token deltas after the first token, then one ``Finished``. Closing early aborts."""
        entry = self._table.get(request_id)
        if entry is None:
            raise RequestNotFoundError(f"no request {request_id!r} here")
        if entry.streaming:
            raise InvalidRequestError(f"request {request_id!r} is already being streamed")
        entry.streaming = True
        finished = False
        try:
            while not finished:
                event = await asyncio.wait_for(
                    entry.events.get(), self.config.stream_idle_timeout_s
                )
                if isinstance(event, _Failed):
                    finished = True
                    raise event.error
                finished = isinstance(event, Finished)
                yield event
        finally:
            if not finished:
                self._free(entry)
            if self._table.get(request_id) is entry:
                del self._table[request_id]

    # -- 4. release, expiry, stats ----------------------------------------------------------

    async def release(self, request_id: str) -> tuple[bool, int]:
        """Frees whatever ``request_id`` holds: (found, number of blocks freed)."""
        entry = self._table.get(request_id)
        if entry is None:
            return False, 0
        # Shielded: a Release call cancelled while the abort waits for the engine thread must
        # not cancel the abort too (the entry is already gone, its blocks would stay held).
        return True, await asyncio.shield(asyncio.wrap_future(self._free(entry)))

    def _free(self, entry: _Entry, error: BanaServeError | None = None) -> Future[int]:
        """Ends ``entry`` now (its stream, if any, gets ``Finished(ABORT)``, or ``error``) and
        queues the engine abort; the future says how many blocks that freed. An entry that
        failed (``error``) stays, as a finished one does, until a stream has read the error."""
        holds_blocks = entry.status is not RequestStatus.DONE
        if holds_blocks and error is None:
            self._finish(entry, FinishReason.ABORT)
        elif holds_blocks:
            self._end(entry, _Failed(error))
        keep = error is not None or entry.streaming
        if not keep and self._table.get(entry.request_id) is entry:
            del self._table[entry.request_id]
        if not holds_blocks:
            done: Future[int] = Future()
            done.set_result(0)
            return done
        if entry.importing is None or entry.importing.done():
            return self._executor.submit(self._abort, entry.engine_id)
        freed: Future[int] = Future()

        def abort_after_import(_: Future[None]) -> None:
            aborted = self._executor.submit(self._abort, entry.engine_id)
            aborted.add_done_callback(lambda f: _copy_result(f, freed))

        entry.importing.add_done_callback(abort_after_import)
        return freed

    def _abort(self, engine_id: str) -> int:  # on the engine thread
        before = self.engine.block_manager.num_free_blocks
        with contextlib.suppress(RequestNotFoundError):
            self.engine.abort(engine_id)
        return self.engine.block_manager.num_free_blocks - before

    def expire_overdue(self) -> list[str]:
        """Frees every entry whose lease or deadline has passed; returns their request ids."""
        now = self._clock()
        expired = []
        for entry in list(self._table.values()):
            waiting = entry.status in (RequestStatus.RESERVED, RequestStatus.RECEIVING)
            late = entry.deadline is not None and now >= entry.deadline
            if entry.status is not RequestStatus.DONE and (
                late or (waiting and now >= entry.lease_expiry)
            ):
                self._free(entry)
                expired.append(entry.request_id)
            elif not entry.streaming and now - entry.done_at > self.config.finished_retention_s:
                del self._table[entry.request_id]
        return expired

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            for request_id in self.expire_overdue():
                log.info("request %s: lease or deadline passed, freed", request_id)

    async def stats(self) -> WorkerStats:
        stats = await self._call(self.engine.stats)
        now = self._clock()
        open_ = [
            Reservation(
                e.request_id,
                e.reservation_id,
                e.status,
                e.num_blocks,
                max(0.0, e.lease_expiry - now),
            )
            for e in self._table.values()
            if e.status in (RequestStatus.RESERVED, RequestStatus.RECEIVING)
        ]
        return WorkerStats(
            stats["num_blocks"],
            stats["num_free_blocks"],
            stats["num_cached_blocks"],
            stats["num_running"],
            stats["num_waiting"],
            open_,
        )

    async def load(self) -> LoadSnapshot:
        """This worker's load for a report. A decode worker queues no prompts of its own; a
        preempted sequence (or, on a mixed worker, a prompt) waits to compute its tokens, which
        counts as queued prefill.

        Read on the event loop while a step may run, not queued behind it: a long step (a
        2,000-token prompt on a mixed worker takes seconds) must not make the worker miss its
        reports and look dead. The counters read are sizes and ints, so a report is at worst
        a moment stale; ``stats`` (the RPC, used for leak checks) stays exact."""
        stats = self.engine.stats()
        step_time, busy = self.meter.snapshot()
        return LoadSnapshot(
            self._queued_tokens(),
            stats["num_running"],
            stats["num_waiting"],
            stats["num_blocks"] - stats["num_free_blocks"],
            stats["num_free_blocks"],
            step_time,
            busy,
            self.config.load_window_s,
        )

    def _queued_tokens(self) -> int:
        waiting = list(self.engine.scheduler.waiting)  # a copy: the deque may change meanwhile
        return sum(seq.num_tokens - seq.num_computed_tokens for seq in waiting)


def _copy_result(source: Future[int], target: Future[int]) -> None:
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())
