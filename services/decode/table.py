"""The decode worker's table of requests: their entries (entries.py), each entry's end, and the
streams that read them. Touched only from the event loop; the engine side of ending an entry
(its abort) is a command queued on the worker's ``EngineLoop``. Only this module and core.py
change an entry's ``status``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from services.common.errors import (
    AlreadyExistsError,
    BanaServeError,
    PreconditionError,
    RequestNotFoundError,
)
from services.common.types import FinishReason, RequestOutput
from services.decode.entries import (
    DecodeConfig,
    Entry,
    Failed,
    Finished,
    RequestStatus,
    Reservation,
    StreamEvent,
    TokenDelta,
)
from services.engine.engine import Engine
from services.engine.loop import EngineLoop
from services.engine.ports import settle_like


class EntryTable:
    def __init__(self, loop: EngineLoop, config: DecodeConfig, clock: Callable[[], float]) -> None:
        self._loop = loop
        self._config = config
        self._clock = clock
        self._by_request: dict[str, Entry] = {}
        self._live: dict[str, Entry] = {}  # by engine id, until the entry is DONE
        self._numbers = itertools.count(1)

    def get(self, request_id: str) -> Entry | None:
        return self._by_request.get(request_id)

    def entries(self) -> list[Entry]:
        return list(self._by_request.values())

    def add(
        self, request_id: str, prompt: list[int], lease_s: float, timeout_s: float | None
    ) -> Entry:
        now = self._clock()
        entry = Entry(
            request_id,
            f"{request_id}#{next(self._numbers)}",
            uuid.uuid4().hex,
            list(prompt),
            -(-len(prompt) // self._loop.engine.config.block_size),
            now + lease_s,
            None if timeout_s is None else now + timeout_s,
        )
        self._by_request[request_id] = entry
        self._live[entry.engine_id] = entry
        return entry

    async def wait_for_id(self, request_id: str, timeout_s: float | None) -> None:
        """Returns once ``request_id`` is free here: an entry that ended only waits for its
        stream to read it, and is replaced; a running one is waited for, briefly."""
        old = self._by_request.get(request_id)
        if old is not None and old.status is not RequestStatus.DONE:
            wait = self._config.id_reuse_wait_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(old.ended.wait(), min(wait, timeout_s or wait))
        old = self._by_request.get(request_id)
        if old is not None and old.status is not RequestStatus.DONE:
            raise AlreadyExistsError(
                f"request id {request_id!r} already exists here (still running)"
            )
        if old is not None:
            del self._by_request[request_id]  # its stream, if one is open, keeps its own entry

    def check_live(self, entry: Entry) -> None:
        if (
            entry.status is RequestStatus.DONE
            or self._by_request.get(entry.request_id) is not entry
        ):
            raise self.gone(entry)

    def renew(self, request_id: str, reservation_id: str, lease_s: float) -> float:
        """Extends the reservation's lease to at least ``lease_s`` from now; returns the lease
        left, or 0.0 once its sequence runs (no lease applies then). Raises as ``gone`` for one
        that ended, or whose lease or deadline passed before the sweep freed it."""
        entry = self._by_request.get(request_id)
        if entry is None or entry.reservation_id != reservation_id:
            raise RequestNotFoundError(
                f"no reservation {reservation_id!r} for request {request_id!r}"
            )
        self.check_live(entry)
        now = self._clock()
        if entry.deadline is not None and now >= entry.deadline:
            raise self.gone(entry)
        if entry.status is RequestStatus.RUNNING:
            return 0.0
        if now >= entry.lease_expiry:
            raise self.gone(entry)
        entry.lease_expiry = max(entry.lease_expiry, now + lease_s)
        return entry.lease_expiry - now

    def gone(self, entry: Entry) -> Exception:
        """Why ``entry``'s reservation is no longer there for its transfer: its deadline
        (DEADLINE_EXCEEDED), its lease, or else a release (NOT_FOUND)."""
        now, request_id = self._clock(), entry.request_id
        if entry.deadline is not None and now >= entry.deadline:
            return TimeoutError(f"request {request_id!r} passed its deadline")
        if now >= entry.lease_expiry:
            return RequestNotFoundError(
                f"reservation of {request_id!r} expired: its lease ran out before its KV came"
            )
        return RequestNotFoundError(f"reservation of {request_id!r} was released")

    # -- outputs and ends ------------------------------------------------------------------

    def dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            entry = self._live.get(out.request_id)
            if entry is None or entry.status is RequestStatus.DONE:
                continue  # released while the step ran; its abort is queued
            entry.num_completion_tokens += len(out.new_token_ids)
            entry.num_cached_tokens = out.num_cached_tokens
            entry.events.put_nowait(TokenDelta(list(out.new_token_ids), out.text_delta))
            if out.finished:
                self.finish(entry, out.finish_reason or FinishReason.STOP)

    def live(self, engine_id: str) -> Entry | None:
        return self._live.get(engine_id)

    def finish(self, entry: Entry, reason: FinishReason) -> None:
        self._end(entry, Finished(reason, entry.num_completion_tokens, entry.num_cached_tokens))

    def _end(self, entry: Entry, last: Finished | Failed) -> None:
        self._live.pop(entry.engine_id, None)
        entry.status = RequestStatus.DONE
        entry.ended.set()
        entry.done_at = self._clock()
        entry.events.put_nowait(last)

    def free(self, entry: Entry, error: BanaServeError | None = None) -> Future[int]:
        """Ends ``entry`` now (its stream, if any, gets ``Finished(ABORT)``, or ``error``) and
        queues the engine abort; the future says how many blocks that freed. An entry that
        failed (``error``) stays, as a finished one does, until a stream has read the error."""
        holds_blocks = entry.status is not RequestStatus.DONE
        if holds_blocks:
            entry.freed = True
            if error is None:
                self.finish(entry, FinishReason.ABORT)
            else:
                self._end(entry, Failed(error))
        keep = error is not None or entry.streaming
        if not keep and self._by_request.get(entry.request_id) is entry:
            del self._by_request[entry.request_id]
        if not holds_blocks:
            done: Future[int] = Future()
            done.set_result(0)
            return done
        abort = _aborter(entry.engine_id)
        if entry.importing is None or entry.importing.done():
            return self._loop.submit(abort)
        freed: Future[int] = Future()

        def abort_after_import(_: Future[None]) -> None:  # on the import's thread
            self._loop.submit(abort).add_done_callback(lambda f: settle_like(freed, f))

        entry.importing.add_done_callback(abort_after_import)
        return freed

    def expire_overdue(self) -> list[str]:
        """Frees every entry whose lease or deadline has passed; returns their request ids."""
        now = self._clock()
        expired = []
        for entry in list(self._by_request.values()):
            waiting = entry.status in (RequestStatus.RESERVED, RequestStatus.RECEIVING)
            late = entry.deadline is not None and now >= entry.deadline
            if entry.status is not RequestStatus.DONE and (
                late or (waiting and now >= entry.lease_expiry)
            ):
                self.free(entry)
                expired.append(entry.request_id)
            elif not entry.streaming and now - entry.done_at > self._config.finished_retention_s:
                del self._by_request[entry.request_id]
        return expired

    def reservations(self) -> list[Reservation]:
        """The open reservations (RESERVED, RECEIVING) with the lease each has left."""
        now = self._clock()
        return [
            Reservation(
                e.request_id,
                e.reservation_id,
                e.status,
                e.num_blocks,
                max(0.0, e.lease_expiry - now),
            )
            for e in self._by_request.values()
            if e.status in (RequestStatus.RESERVED, RequestStatus.RECEIVING)
        ]

    async def stream(self, request_id: str) -> AsyncIterator[StreamEvent]:
        """Token deltas after the first token, then one ``Finished``. Closing early aborts."""
        entry = self._by_request.get(request_id)
        if entry is None:
            raise RequestNotFoundError(f"no request {request_id!r} here")
        if entry.streaming:
            raise PreconditionError(f"request {request_id!r} is already being streamed")
        entry.streaming = True
        finished = False
        try:
            while not finished:
                event = await self._next_event(entry)
                if isinstance(event, Failed):
                    finished = True
                    raise event.error
                finished = isinstance(event, Finished)
                yield event
        finally:
            if not finished:
                self.free(entry)
            if self._by_request.get(request_id) is entry:
                del self._by_request[request_id]

    async def _next_event(self, entry: Entry) -> StreamEvent:
        """The entry's next event. A request queued behind others (waiting for blocks,
        preempted) may go long without one while the engine steps for the rest: only
        ``stream_idle_timeout_s`` without a single step of the engine ends the wait."""
        idle = self._config.stream_idle_timeout_s
        steps = self._steps()
        while True:
            try:
                return await asyncio.wait_for(entry.events.get(), idle)
            except TimeoutError:
                if self._steps() == steps:
                    raise TimeoutError(
                        f"request {entry.request_id!r}: no engine step for {idle:g}s"
                    ) from None
                steps = self._steps()

    def _steps(self) -> tuple[int, int]:
        snap = self._loop.snapshot
        return snap.num_steps, snap.num_failed_steps


def _aborter(engine_id: str) -> Callable[[Engine], int]:
    def abort(engine: Engine) -> int:  # on the engine thread: how many blocks it freed
        before = engine.block_manager.num_free_blocks
        with contextlib.suppress(RequestNotFoundError):
            engine.abort(engine_id)
        return engine.block_manager.num_free_blocks - before

    return abort
