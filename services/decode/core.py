"""The decode worker's logic, without grpc (decode.proto has the wire lifecycle).

A request passes through one table entry (entries.py) whose status only this module changes:

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
token, the first included. Any worker does the same for a ``reserve`` whose prompt lies in its
prefix cache but for at most ``local_prefill_max_tokens`` tokens (conditional disaggregation:
the router's ``--local-prefill-max-tokens``); the reservation says so (``prefilling_locally``).
So does any worker for a ``reserve`` that resumes a request whose worker was lost after its
first token (``resume_output_token_ids``: the tokens the client has; the router's driver): the
prompt and those tokens prefill here and the stream carries the tokens after them.

The engine runs on an ``EngineLoop`` (services/engine/loop.py): every engine call is a command,
run in submission order between two steps, so an abort submitted before a ``stats`` call is
always visible to it. The one exception is ``Engine.import_kv``, a copy into blocks only the
importing request holds: it runs beside the steps (``submit_beside``), so KV keeps arriving
while a decode step runs (queued behind the steps, a 30-layer transfer would wait 30 steps). An
abort of a request whose import is in flight waits for that import, so no copy ever lands in
blocks freed to someone else. While the worker is a layer migration's donor, the engine writes
the layers ``[k, L)`` of an import on the helper instead (services/engine/kv_routes.py): the
same call, which then waits for the data plane. The table itself is touched only from the
event loop, where the loop delivers each step's outputs. Every wait is bounded: a lease or deadline is enforced by
``expire_overdue`` (swept every ``sweep_interval_s``), a transfer waits for its header at
most ``transfer_header_timeout_s`` (once an open frame claimed its entry, as long as the
entry lives) and for each later frame at most ``transfer_idle_timeout_s``, or until its entry
ends, and a stream waits for its next event
at most ``stream_idle_timeout_s`` in which the engine made no step (a request queued behind
others, or preempted, waits as long as the engine makes progress).

Request ids: the engine knows each entry by its own id (``Entry.engine_id``: the request id
and a number), so an ended request's queued abort or last step output can never reach a new
request that reuses its id. A ``reserve`` of an id whose entry is DONE replaces that entry (its
unread tokens, if any, are dropped); one whose entry still runs waits up to
``DecodeConfig.id_reuse_wait_s`` for it to end, then gets ``AlreadyExistsError``.

A step that raises fails only the requests it computed: their streams end with
``StepFailedError`` (INTERNAL, with a log reference), their blocks are freed, and the loop
steps on. Should the loop itself die, every entry is freed, later reserves are refused
(UNAVAILABLE) and ``died`` resolves, so the process can turn its health NOT_SERVING and leave
the router.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, TypeVar

from services.common.errors import (
    ConfigError,
    DependencyUnavailableError,
    InvalidRequestError,
    RequestNotFoundError,
    StepFailedError,
)
from services.common.load import Admissions, LoadReport
from services.common.types import FinishReason, RequestOutput, SamplingParams
from services.decode.entries import (
    DecodeConfig,
    Entry,
    Finished,
    RequestStatus,
    Reservation,
    StreamEvent,
    TokenDelta,
    WorkerStats,
)
from services.decode.receive import check_layout
from services.decode.table import EntryTable
from services.decode.transfer import (
    LayerAssembler,
    LayerChunk,
    TransferEnd,
    TransferFrame,
    TransferHeader,
    TransferOpen,
    TransferResult,
    next_unless,
)
from services.engine.engine import Engine
from services.engine.loop import EngineLoop, LoopConfig, StepFailure
from services.engine.outputs import ResumeComplete
from services.engine.snapshot import LoopSnapshot

__all__ = [
    "DecodeConfig",
    "DecodeWorker",
    "Finished",
    "RequestStatus",
    "Reservation",
    "StreamEvent",
    "TokenDelta",
    "WorkerStats",
]

T = TypeVar("T")
log = logging.getLogger(__name__)


class DecodeWorker:
    """Owns an engine loop and the table of its requests; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        config: DecodeConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.config = config or DecodeConfig()
        self._clock = clock
        loop_config = LoopConfig("decode", self.config.idle_poll_s, self.config.load_window_s)
        self._loop = EngineLoop(engine, loop_config, clock=clock)
        self.meter = self._loop.meter  # step timings (load reports, metrics)
        self._table = EntryTable(self._loop, self.config, clock)
        self._admissions = Admissions()  # reserved since the last load report
        self._sweeper: asyncio.Task[None] | None = None
        # Resolves with the error that ended the engine loop, if it ever ends unasked.
        self.died: asyncio.Future[BaseException] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop.start(self._on_outputs, self._fail_step, self._die)
        self.died = self._loop.died
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="decode-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait({self._sweeper})
        for future in [self._table.free(e) for e in self._table.entries()]:
            await asyncio.wrap_future(future)
        await self._loop.stop()

    @property
    def snapshot(self) -> LoopSnapshot:
        """The engine's state and counters after the last step or command (never waits)."""
        return self._loop.snapshot

    async def engine_call(self, fn: Callable[[Engine], T]) -> T:
        """Runs ``fn(engine)`` on the engine thread between two steps and returns its result
        (an exception it raises propagates). ``fn`` must not block: every step waits for it."""
        return await self._loop.call(fn)

    # -- 1. reserve ------------------------------------------------------------------------

    async def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lease_s: float | None = None,
        timeout_s: float | None = None,
        prefill_locally: bool = False,
        local_prefill_max_tokens: int = 0,
        resume_output_token_ids: tuple[int, ...] | list[int] = (),
    ) -> Reservation:
        """Blocks for a prompt's KV under a lease, or (``prefill_locally``, or at most
        ``local_prefill_max_tokens`` of the prompt outside the prefix cache) the prompt joins
        the batch here at once; the reservation says which.

        ``resume_output_token_ids``: the request lost the worker that generated these tokens;
        it goes on here from them, prompt and tokens prefilled locally on any worker role (a
        recovery, not a routing choice; ``Engine.add_request``)."""
        resume = tuple(resume_output_token_ids)
        if prefill_locally and not self.config.prefill_locally and not resume:
            raise ConfigError("this is a decode worker: only a mixed worker prefills locally")
        prefill_locally = prefill_locally or bool(resume)
        if not request_id:
            raise InvalidRequestError("request_id is empty")
        if lease_s is not None and lease_s <= 0:
            raise InvalidRequestError(f"lease must be positive, got {lease_s}s")
        if timeout_s is not None and timeout_s <= 0:
            raise TimeoutError(f"request {request_id!r} arrived after its deadline")
        self._check_alive()
        await self._table.wait_for_id(request_id, timeout_s)
        lease = min(lease_s or self.config.default_lease_s, self.config.max_lease_s)
        entry = self._table.add(request_id, prompt_token_ids, lease, timeout_s)
        ids, prompt = entry.engine_id, entry.prompt_token_ids
        reuse = self.config.reuse_cached_prefix
        try:
            if prefill_locally:  # RUNNING first: its first outputs may come before we wake
                entry.status = RequestStatus.RUNNING
                entry.num_completion_tokens = len(resume)
                try:
                    await self._loop.call(
                        lambda e: e.add_request(ids, prompt, params, output_token_ids=resume)
                    )
                except ResumeComplete as complete:  # its stream says how it ended, and stops
                    self._table.finish(entry, complete.reason)
            else:

                def begin(e: Engine) -> int | None:
                    # One command: what the cache holds cannot change before the choice acts.
                    local = local_prefill_max_tokens
                    if local and len(prompt) - e.num_cached_prompt_tokens(prompt) <= local:
                        e.add_request(ids, prompt, params)
                        return None
                    return e.begin_prompt_import(ids, prompt, params, reuse)

                first_block = await self._loop.call(begin)
                if first_block is None:  # outputs may have come first: it may be DONE already
                    prefill_locally = True
                    if entry.status is RequestStatus.RESERVED:
                        entry.status = RequestStatus.RUNNING
                else:
                    entry.first_block = first_block
        except BaseException:
            self._table.free(entry)
            raise
        self._admissions.add(request_id)  # the snapshot counts it: the command published it
        if entry.freed:
            # The loop died meanwhile: UNAVAILABLE with the cause, as a new request would get.
            self._check_alive()
            # A local prefill whose first step failed keeps its entry: its stream reads why.
            if not (prefill_locally and self._table.get(request_id) is entry):
                raise RequestNotFoundError(f"request {request_id!r} was released")
        # As granted: a local prefill's first step may have finished it already.
        status = RequestStatus.RUNNING if prefill_locally else RequestStatus.RESERVED
        return Reservation(
            request_id,
            entry.reservation_id,
            status,
            entry.num_blocks,
            lease,
            entry.first_block,
            prefill_locally,
        )

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

    # -- 2. receive ------------------------------------------------------------------------

    async def receive(self, frames: AsyncIterator[TransferFrame]) -> TransferResult:
        """Runs one transfer: header, chunks, end. Anything else, a break, a sender that goes
        silent (``_next_frame``) or a reservation that ends meanwhile frees the entry."""
        entry: Entry | None = None
        try:
            header = await self._next_frame(frames, None)
            if isinstance(header, TransferOpen):  # the sender claims it before it computes
                entry = self._claim(header)
                header = await self._next_frame(frames, entry, awaiting_header=True)
                if isinstance(header, TransferHeader) and (
                    header.request_id,
                    header.reservation_id,
                ) != (entry.request_id, entry.reservation_id):
                    raise InvalidRequestError(
                        f"the header names reservation {header.reservation_id!r} of request "
                        f"{header.request_id!r}; the transfer opened "
                        f"{entry.reservation_id!r} of {entry.request_id!r}"
                    )
            if header is None:
                raise InvalidRequestError("the transfer ended before its header")
            if not isinstance(header, TransferHeader):
                raise InvalidRequestError("a transfer must start with its header")
            if entry is None:
                entry = self._claim(header)
            check_layout(self.engine, entry.prompt_token_ids, header, entry.first_block)
            assembler = LayerAssembler(header.layout, header.num_layers)
            while (frame := await self._next_frame(frames, entry)) is not None:
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
                    raise InvalidRequestError("a transfer has one header, after its open frame")
                self._table.check_live(entry)
            raise InvalidRequestError("the transfer ended without its end frame")
        finally:
            if entry is not None:
                self._table.free(entry)

    async def _next_frame(
        self,
        frames: AsyncIterator[TransferFrame],
        entry: Entry | None,
        awaiting_header: bool = False,
    ) -> TransferFrame | None:
        """The sender's next frame (None: it closed its stream). The first frame (open or
        header) must come within ``transfer_header_timeout_s``; after an open frame the header
        may take as long as the reservation lives (its prompt queues and computes meanwhile,
        and the router renews the lease while it does); each later frame must come within
        ``transfer_idle_timeout_s``. Should ``entry`` end meanwhile (lease, deadline, Release)
        the wait ends at once, so a silent sender never holds its call, nor the entry, past
        them."""
        config = self.config
        if entry is None:
            timeout: float | None = config.transfer_header_timeout_s
        elif awaiting_header:
            timeout = None  # the entry's end bounds it
        else:
            timeout = config.transfer_idle_timeout_s
        arrived = await next_unless(frames, entry.ended if entry else None, timeout)
        if not arrived.cancelled():
            return arrived.result()
        if entry is None:
            raise TimeoutError(f"the KV transfer sent no header within {timeout:g}s")
        if entry.ended.is_set():
            self._check_alive()
            raise self._table.gone(entry)
        raise TimeoutError(
            f"the KV transfer for {entry.request_id!r} sent nothing for {timeout:g}s"
        )

    async def _import(self, entry: Entry, data: Any, layout: Any) -> None:
        # Checked right before submitting, on the event loop: a ``free`` after this sees the
        # import in flight and waits for it; one before it makes this raise.
        self._table.check_live(entry)
        engine_id = entry.engine_id
        entry.importing = self._loop.submit_beside(lambda e: e.import_kv(engine_id, data, layout))
        await asyncio.wrap_future(entry.importing)

    def _claim(self, header: TransferOpen | TransferHeader) -> Entry:
        entry = self._table.get(header.request_id)
        if entry is None or entry.reservation_id != header.reservation_id:
            raise RequestNotFoundError(
                f"no reservation {header.reservation_id!r} for request {header.request_id!r}"
            )
        self._table.check_live(entry)
        if entry.status is not RequestStatus.RESERVED:
            raise InvalidRequestError(f"reservation {header.reservation_id!r} is already in use")
        entry.status = RequestStatus.RECEIVING
        return entry

    def ended(self, request_id: str) -> asyncio.Event:
        """Set once ``request_id`` holds nothing here (finished, released, expired): what a
        caller's per-client hold on it (servicer.py) waits for."""
        entry = self._table.get(request_id)
        if entry is not None:
            return entry.ended
        gone = asyncio.Event()
        gone.set()
        return gone

    async def _start_running(self, entry: Entry, first_token_id: int) -> None:
        # RUNNING before the call: the first step's outputs may arrive before this wakes up.
        entry.status = RequestStatus.RUNNING
        entry.num_completion_tokens = 1
        engine_id = entry.engine_id
        output = await self._loop.call(lambda e: e.finish_prompt_import(engine_id, first_token_id))
        if entry.freed:  # freed meanwhile: its abort is queued already
            raise self._table.gone(entry)
        if output.finished and entry.status is not RequestStatus.DONE:
            # The first token ended it; the engine holds nothing.
            self._table.finish(entry, output.finish_reason or FinishReason.STOP)

    # -- 3. run and stream (the loop's handlers run on the event loop) ----------------------

    def _on_outputs(self, outputs: list[RequestOutput], done_at: float) -> None:
        self._dispatch(outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        self._table.dispatch(outputs)

    def _fail_step(self, failure: StepFailure) -> None:
        """A step raised: the loop aborted the requests it computed; end their streams."""
        for engine_id in failure.request_ids:
            entry = self._table.live(engine_id)
            if entry is not None:
                message = (
                    f"the engine step computing request {entry.request_id!r} failed "
                    f"(ref {failure.ref} in the decode worker's log); the request was dropped"
                )
                self._table.free(entry, StepFailedError(message))

    def _die(self, error: BaseException) -> None:
        """The loop steps no more: free every entry (its commands still run)."""
        for entry in self._table.entries():
            message = f"this decode worker's engine loop stopped while {entry.request_id!r} ran"
            self._table.free(entry, DependencyUnavailableError(message))

    def stream(self, request_id: str) -> AsyncIterator[StreamEvent]:
        """Token deltas after the first token, then one ``Finished``. Closing early aborts."""
        return self._table.stream(request_id)

    # -- 4. release, expiry, stats ----------------------------------------------------------

    async def release(self, request_id: str) -> tuple[bool, int]:
        """Frees whatever ``request_id`` holds: (found, number of blocks freed)."""
        entry = self._table.get(request_id)
        if entry is None:
            return False, 0
        # Shielded: a Release call cancelled while the abort waits for the engine thread must
        # not cancel the abort too (the entry is already gone, its blocks would stay held).
        return True, await asyncio.shield(asyncio.wrap_future(self._table.free(entry)))

    def renew(self, request_id: str, reservation_id: str, lease_s: float | None = None) -> float:
        """Extends a reservation's lease (capped as ``reserve``'s): the router renews it while
        the prompt waits for and runs on its prefill worker, so a prompt may take longer than
        one lease. Returns the lease left; 0.0 once the sequence runs (``DecodeTable.renew``)."""
        if lease_s is not None and lease_s <= 0:
            raise InvalidRequestError(f"lease must be positive, got {lease_s}s")
        lease = min(lease_s or self.config.default_lease_s, self.config.max_lease_s)
        return self._table.renew(request_id, reservation_id, lease)

    def expire_overdue(self) -> list[str]:
        """Frees every entry whose lease or deadline has passed; returns their request ids."""
        return self._table.expire_overdue()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            for request_id in self.expire_overdue():
                log.info("request %s: lease or deadline passed, freed", request_id)

    def holds_work(self) -> bool:
        """A request is reserved, receiving its KV or running here (a drain waits for none)."""
        return bool(self._table.entries())

    async def stats(self) -> WorkerStats:
        """Exact for every call made before it (it waits for their commands, not a step)."""
        snap = (await self._loop.settled()).engine
        return WorkerStats(
            snap.num_blocks,
            snap.num_free_blocks,
            snap.num_cached_blocks,
            snap.num_running,
            snap.num_waiting,
            self._table.reservations(),
            snap.num_preemptions,
        )

    async def load(self) -> LoadReport:
        """This worker's load for a report, from the loop's snapshot: never waits behind a
        step (a 2,000-token prompt on a mixed worker takes seconds, and a worker that misses
        its reports looks dead). A decode worker queues no prompts of its own; a preempted
        sequence (or, on a mixed worker, a prompt) waits to compute its tokens, which counts
        as queued prefill."""
        snap = self._loop.snapshot
        step_time, busy = self._loop.meter.snapshot()
        return LoadReport(
            snap.num_waiting_tokens,
            snap.engine.num_running,
            snap.engine.num_waiting,
            snap.engine.num_blocks - snap.engine.num_free_blocks,
            snap.engine.num_free_blocks,
            step_time,
            busy,
            self.config.load_window_s,
            num_hosted_layers=snap.engine.num_hosted_layers,
            num_hosted_blocks=snap.engine.num_hosted_blocks,
            num_hosted_layer_blocks=snap.engine.num_hosted_layer_blocks,
            admitted=self._admissions.take(),
        )
