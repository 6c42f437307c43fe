"""The request driver: one Generate, from routing to the finished frame (no grpc).

Lifecycle of one request (DESIGN.md §4; router.proto, decode.proto, prefill.proto):
  1. ROUTED    - ``Router.route`` picks prefill worker P and decode worker D;
  2. RESERVED  - ``DecodeClient.reserve`` on D (the KV lease starts; D names its data plane);
  3. PREFILLING - ``PrefillClient.prefill`` on P into that reservation; its first token is
                 relayed at once (preceded by the ``Started`` event: the pair is final now);
  4. DECODING  - ``DecodeClient.stream_tokens`` on D; deltas relayed; ``Finished`` last.
A colocated assignment (P is D, a mixed worker) skips step 3: D reserves with
``prefill_locally`` and its stream starts with the first token.
A request no worker has room for *now* waits in step 1 (re-routed every
``DriverConfig.admission_poll_s``) until one has, or its deadline passes: a burst queues at the
router instead of failing; one that could never fit fails at once (RESOURCE_EXHAUSTED).
A worker lost in 2-3 (before the first token) is removed and the request routed again, once.
Abort, client cancellation, the deadline, or a failure after step 2 release D's reservation
(``DecodeClient.release``): nothing a request held outlives it. Every call gets what is left of
the deadline as its own; a request without one gets ``DriverConfig.default_timeout_s``.

The work runs in its own task and hands events to the caller through a queue, so the caller
waits on one thing (the queue, bounded by the deadline), and abort, cancel and deadline all end
the request the same way: cancel the task, whose handler releases what it holds.

Request ids: an id is taken while its request runs (a second request with it gets
``DuplicateRequestError``, ALREADY_EXISTS, before any work) and free again once the request has
ended, even while its cleanup still runs. A new request with the id of one still releasing waits
for that release (at most ``release_timeout_s`` + 1 s, within its own deadline) before it
reserves anything, so the old request's Release can never free the new one's reservation; a
release that takes longer fails the new request with ALREADY_EXISTS, still before any work.

Usage: ``Finished.num_completion_tokens`` is the number of tokens this driver delivered to the
caller, however the request ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import (
    AlreadyExistsError,
    BanaServeError,
    ErrorCode,
    PermissionDeniedError,
    RequestNotFoundError,
)
from services.common.types import FinishReason, SamplingParams
from services.router.core import (
    Assignment,
    NoRoomNowError,
    Router,
    RouteRequest,
    check_request,
    require_config,
)
from services.router.registry import WorkerInfo


class ReleaseReason(enum.Enum):
    ABORTED = "aborted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    PEER_LOST = "peer_lost"
    FINISHED_ON_PREFILL = "finished_on_prefill"


class WorkerCallError(BanaServeError):
    """A call to a worker failed with ``code`` (its gRPC status, mapped in services/rpc/status.py
    so that this module stays free of grpc); the servicer passes it on to the client."""

    def __init__(self, worker_id: str, call: str, code: ErrorCode, message: str) -> None:
        super().__init__(f"{call} on worker {worker_id!r} failed with {code}: {message}")
        self.worker_id = worker_id
        self.call = call
        self.code = code

    @property
    def lost(self) -> bool:
        return self.code is ErrorCode.UNAVAILABLE


class WorkerLostError(BanaServeError):
    """The request failed because a worker was lost and no retry was left (UNAVAILABLE)."""


class DuplicateRequestError(AlreadyExistsError):
    """A live request already has this id (ALREADY_EXISTS)."""


@dataclass(frozen=True)
class Reservation:
    """What ``DecodeClient.reserve`` got: the reservation, and D's data plane if it has one."""

    reservation_id: str
    data_address: str = ""  # "HOST:PORT"; "": D takes KV over TransferKV only
    data_transport: str = ""  # "ucx", "tcp" or "grpc" (services.rpc.dataplane.KINDS)


@dataclass(frozen=True)
class KVTarget:
    worker_id: str
    address: str
    reservation_id: str
    data_address: str = ""
    data_transport: str = ""


@dataclass(frozen=True)
class GenerateInput:
    request_id: str  # "" → the driver assigns one
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    # Who may abort it: the caller's identity (services.rpc.security.caller_identity).
    owner: str = ""


@dataclass(frozen=True)
class Started:
    request_id: str
    num_prompt_tokens: int
    prefill_worker_id: str
    decode_worker_id: str


@dataclass(frozen=True)
class Delta:
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class PrefillResult:
    """A prefill worker's last frame. ``finish_reason`` set: the first token ended the request."""

    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    prefill_s: float
    kv_transfer_s: float
    kv_transfer_exposed_s: float
    kv_bytes: int


@dataclass(frozen=True)
class DecodeResult:
    finish_reason: FinishReason
    num_completion_tokens: int  # the prefill worker's first token included
    num_cached_tokens: int = 0  # prefix-cache hits of a local (colocated) prefill


@dataclass(frozen=True)
class Timings:
    """Seconds from the call's arrival (routing, ttft, total) or as the workers measured them."""

    routing_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0
    kv_transfer_exposed_s: float = 0.0
    kv_bytes: int = 0


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_completion_tokens: int
    num_cached_tokens: int
    timings: Timings


Event = Started | Delta | Finished


class RequestObserver(Protocol):
    """Told by the driver, on its event loop, how each request ended."""

    def finished(self, event: Finished) -> None: ...

    def failed(self, exc: BaseException) -> None: ...


class DecodeClient(Protocol):
    """The router's calls to one decode (or mixed) worker; failures raise ``WorkerCallError``."""

    async def reserve(
        self,
        request: GenerateInput,
        lease_s: float,
        timeout_s: float,
        prefill_locally: bool = False,
    ) -> Reservation: ...

    def stream_tokens(
        self, request_id: str, timeout_s: float
    ) -> AsyncIterator[Delta | DecodeResult]: ...

    async def release(self, request_id: str, reason: ReleaseReason, timeout_s: float) -> None: ...


class PrefillClient(Protocol):
    """The router's call to one prefill (or mixed) worker: a first-token Delta, then a result."""

    def prefill(
        self, request: GenerateInput, target: KVTarget, timeout_s: float
    ) -> AsyncIterator[Delta | PrefillResult]: ...


class WorkerClients(Protocol):
    def decode(self, worker: WorkerInfo) -> DecodeClient: ...

    def prefill(self, worker: WorkerInfo) -> PrefillClient: ...


@dataclass(frozen=True)
class DriverConfig:
    # How long D holds a reservation for a transfer that has not ended (capped by the deadline).
    lease_s: float = 30.0
    # The deadline of a request whose call has none: every wait stays bounded.
    default_timeout_s: float = 600.0
    # Bound on the cleanup call after abort, cancel or failure.
    release_timeout_s: float = 2.0
    # How often a request waiting for room (NoRoomNowError) is routed again.
    admission_poll_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("lease_s", "default_timeout_s", "release_timeout_s", "admission_poll_s"):
            value = getattr(self, name)
            require_config(
                math.isfinite(value) and value > 0, f"{name} must be positive, got {value}"
            )


@dataclass
class _Job:
    request_id: str
    deadline: float
    events: asyncio.Queue[Event | _Stop]
    ticket: object  # the EventStream of the call that opened it
    release_reason: ReleaseReason = ReleaseReason.ABORTED
    task: asyncio.Task[None] | None = None
    # The caller has its outcome (or is gone): the id is free, the cleanup may still run.
    ending: bool = False
    # The cleanup of the last request with this id, if it was still running at the open.
    predecessor: asyncio.Task[None] | None = None
    owner: str = ""


class EventStream:
    """The events of one ``RequestDriver.generate`` call: an async iterator that ``cancel``
    also takes, to stop this call's request and never a later one with the same id."""

    def __init__(self, events: Callable[[EventStream], AsyncGenerator[Event, None]]) -> None:
        self._events = events(self)  # the generator knows its stream: the job's ticket

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()


@dataclass(frozen=True)
class _Stop:
    """Ends a job's event stream: ``error`` set → the request failed with it; else aborted."""

    error: BaseException | None = None


class RequestDriver:
    """Runs Generate requests over abstract worker clients. One event loop; not thread-safe."""

    def __init__(
        self,
        router: Router,
        clients: WorkerClients,
        config: DriverConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.config = config or DriverConfig()
        self._clients = clients
        self._clock = clock
        self._jobs: dict[str, _Job] = {}
        # Told of every request that ends (services/common/metrics.py); None: nobody listens.
        self.observer: RequestObserver | None = None

    @property
    def num_running(self) -> int:
        return sum(not job.ending for job in self._jobs.values())

    def _live(self, request_id: str) -> _Job | None:
        job = self._jobs.get(request_id)
        return None if job is None or job.ending else job

    def abort(self, request_id: str, caller: str | None = None) -> None:
        """``caller`` (None: the router itself) must be the request's owner."""
        job = self._live(request_id)
        if job is None:
            raise RequestNotFoundError(f"no running request {request_id!r}")
        if caller is not None and caller != job.owner:
            raise PermissionDeniedError(f"request {request_id!r} is another client's")
        job.events.put_nowait(_Stop())

    def cancel(self, request_id: str, stream: EventStream | None = None) -> None:
        """The caller's call is over (grpc's done callback): stop the request's work now.
        ``stream``: the call's own ``generate`` stream, so that a callback running late never
        stops a newer request that reuses the id.

        Not left to the event generator's ``finally``: grpc may drop a cancelled handler's
        generator unclosed, and then that runs only when the generator is garbage-collected.
        """
        job = self._jobs.get(request_id)
        if job is None or job.task is None or (stream is not None and job.ticket is not stream):
            return
        job.ending = True
        if self._clock() >= job.deadline:
            job.release_reason = ReleaseReason.DEADLINE_EXCEEDED
        job.task.cancel()

    def generate(self, request: GenerateInput, timeout_s: float | None = None) -> EventStream:
        """Events of one request: Started, Delta..., Finished (reason ABORT after ``abort``)."""
        return EventStream(lambda stream: self._generate(request, timeout_s, stream))

    async def _generate(
        self, request: GenerateInput, timeout_s: float | None, ticket: object
    ) -> AsyncGenerator[Event, None]:
        arrival = self._clock()
        job = self._open(request, arrival + (timeout_s or self.config.default_timeout_s), ticket)
        request = dataclasses.replace(request, request_id=job.request_id)
        task = job.task = asyncio.create_task(self._run(job, request, arrival))
        task.add_done_callback(lambda _: self._close(job))
        num_delivered = 0  # completion tokens handed to the caller
        try:
            while True:
                event = await self._next(job, task)
                if isinstance(event, _Stop):
                    aborted = _aborted(request, arrival, self._clock(), num_delivered)
                    self._observe(aborted)
                    yield aborted
                    return
                if isinstance(event, Delta):
                    num_delivered += len(event.token_ids)
                elif isinstance(event, Finished):
                    event = dataclasses.replace(event, num_completion_tokens=num_delivered)
                    self._observe(event)
                yield event
                if isinstance(event, Finished):
                    return
        except Exception as exc:
            if self.observer is not None:
                self.observer.failed(exc)
            raise
        finally:
            job.ending = True
            if self._clock() >= job.deadline:  # grpc may cancel us at the deadline first
                job.release_reason = ReleaseReason.DEADLINE_EXCEEDED
            await self._stop(task)

    def _observe(self, finished: Finished) -> None:
        if self.observer is not None:
            self.observer.finished(finished)

    def check_new(self, request_id: str) -> None:
        if self._live(request_id) is not None:
            raise DuplicateRequestError(f"request id {request_id!r} is already running")

    def _open(self, request: GenerateInput, deadline: float, ticket: object) -> _Job:
        check_request(len(request.prompt_token_ids) > 0, "prompt must have at least one token")
        request_id = request.request_id or new_request_id()
        self.check_new(request_id)
        job = _Job(request_id, deadline, asyncio.Queue(), ticket, owner=request.owner)
        old = self._jobs.get(request_id)  # ending, its cleanup still running
        if old is not None and old.task is not None and not old.task.done():
            job.predecessor = old.task
        self._jobs[request_id] = job
        return job

    def _close(self, job: _Job) -> None:
        """The job's task is done: nothing of it runs any more."""
        if self._jobs.get(job.request_id) is job:
            del self._jobs[job.request_id]

    async def _after_predecessor(self, job: _Job) -> None:
        """Waits, bounded, for the cleanup of the last request with this id (module docstring)."""
        if job.predecessor is None:
            return
        bound = min(self.config.release_timeout_s + 1.0, self.remaining(job))
        done, _ = await asyncio.wait({job.predecessor}, timeout=bound)
        job.predecessor = None
        if not done:
            raise DuplicateRequestError(
                f"request id {job.request_id!r} is still being released by the request that "
                "used it before; try again shortly"
            )

    async def _next(self, job: _Job, task: asyncio.Task[None]) -> Event | _Stop:
        remaining = job.deadline - self._clock()
        try:
            if remaining <= 0:
                raise TimeoutError
            event = await asyncio.wait_for(job.events.get(), remaining)
        except TimeoutError:
            job.release_reason = ReleaseReason.DEADLINE_EXCEEDED
            raise TimeoutError(f"request {job.request_id!r} ran past its deadline") from None
        if isinstance(event, _Stop) and event.error is not None:
            raise event.error
        return event

    async def _stop(self, task: asyncio.Task[None]) -> None:
        if task.done():
            return
        task.cancel()
        # The task's cleanup is one bounded release call; wait for it, bounded too.
        await asyncio.wait({task}, timeout=self.config.release_timeout_s + 1.0)

    async def _run(self, job: _Job, request: GenerateInput, arrival: float) -> None:
        try:
            await self._after_predecessor(job)
            finished = await self._serve(job, request, arrival)
            job.events.put_nowait(finished)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            job.events.put_nowait(_Stop(exc))

    async def _serve(self, job: _Job, request: GenerateInput, arrival: float) -> Finished:
        route = RouteRequest(
            request.request_id, request.prompt_token_ids, request.sampling.max_tokens
        )
        attempt = 1
        while True:
            assignment = await self._admit(job, route)
            try:
                return await _Attempt(self, job, request, assignment, arrival).run()
            except _FullOnReserve as full:
                # The router's estimate was a report behind the worker: count it full until
                # its next report, and wait for room like any request that does not fit now.
                self.router.mark_full(full.worker_id)
                await asyncio.sleep(min(self.config.admission_poll_s, self.remaining(job)))
                continue
            except _LostBeforeFirstToken as lost:
                self._forget(lost.worker_id, str(lost.error))
                if attempt == 2:
                    raise WorkerLostError(
                        f"request {request.request_id!r}: worker {lost.worker_id!r} was lost "
                        f"before the first token, after a retry ({lost.error})"
                    ) from None
                attempt += 1

    async def _admit(self, job: _Job, route: RouteRequest) -> Assignment:
        """Route, waiting while every worker that could take the request is full."""
        while True:
            try:
                return self.router.route(route)
            except NoRoomNowError:
                await asyncio.sleep(min(self.config.admission_poll_s, self.remaining(job)))

    def _forget(self, worker_id: str, reason: str) -> None:
        with contextlib.suppress(RequestNotFoundError):  # already removed (its stream broke)
            self.router.remove(worker_id, f"call failed: {reason}")

    def remaining(self, job: _Job) -> float:
        remaining = job.deadline - self._clock()
        if remaining <= 0:
            job.release_reason = ReleaseReason.DEADLINE_EXCEEDED
            raise TimeoutError(f"request {job.request_id!r} ran past its deadline")
        return remaining

    def now(self) -> float:
        return self._clock()

    def clients(self) -> WorkerClients:
        return self._clients


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


class _FullOnReserve(Exception):
    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id


class _LostBeforeFirstToken(Exception):
    def __init__(self, worker_id: str, error: WorkerCallError) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.error = error


class _Attempt:
    """One try at a request on one worker pair (steps 2-4 of the lifecycle above)."""

    def __init__(
        self,
        driver: RequestDriver,
        job: _Job,
        request: GenerateInput,
        assignment: Assignment,
        arrival: float,
    ) -> None:
        self._driver, self._job, self._request = driver, job, request
        self._assignment, self._arrival = assignment, arrival
        self._decode = driver.clients().decode(assignment.decode)
        self._prefill = driver.clients().prefill(assignment.prefill)
        self._routing_s = self._ttft_s = 0.0

    async def run(self) -> Finished:
        try:
            lease = min(self._driver.config.lease_s, self._driver.remaining(self._job))
            reservation = await self._decode.reserve(
                self._request,
                lease,
                self._driver.remaining(self._job),
                prefill_locally=self._assignment.colocated,
            )
        except asyncio.CancelledError:
            # Cancelled while D was reserving: the call may have reserved already, and
            # cancelling it does not undo that (the lease would hold the blocks for 30 s).
            await self._release(self._job.release_reason)
            raise
        except WorkerCallError as exc:
            if exc.lost:
                raise _LostBeforeFirstToken(self._assignment.decode.worker_id, exc) from None
            if exc.code is ErrorCode.RESOURCE_EXHAUSTED:
                raise _FullOnReserve(self._assignment.decode.worker_id) from None
            raise
        try:
            if self._assignment.colocated:
                return await self._colocated()
            return await self._prefill_then_decode(reservation)
        except asyncio.CancelledError:
            await self._release(self._job.release_reason)
            raise
        except _LostBeforeFirstToken:
            raise  # released already, to find out who was lost
        except BaseException:
            await self._release(ReleaseReason.PEER_LOST)
            raise

    async def _prefill_then_decode(self, reservation: Reservation) -> Finished:
        decode = self._assignment.decode
        target = KVTarget(
            decode.worker_id,
            decode.address,
            reservation.reservation_id,
            reservation.data_address,
            reservation.data_transport,
        )
        self._routing_s = self._driver.now() - self._arrival
        result = await self._run_prefill(target)
        if result.finish_reason is not None:
            await self._release(ReleaseReason.FINISHED_ON_PREFILL)
            return self._finished(result, DecodeResult(result.finish_reason, 1))
        outcome: DecodeResult | None = None
        stream = self._decode.stream_tokens(self._request.request_id, self._remaining())
        async for frame in stream:
            if isinstance(frame, Delta):
                self._job.events.put_nowait(frame)
            else:
                outcome = frame
        if outcome is None:
            raise self._protocol_error(decode.worker_id, "StreamTokens ended without finished")
        return self._finished(result, outcome)

    async def _colocated(self) -> Finished:
        """P is D: D prefills in its own batch; its stream's first delta is the first token."""
        self._routing_s = self._driver.now() - self._arrival
        outcome: DecodeResult | None = None
        first = True
        try:
            async for frame in self._decode.stream_tokens(
                self._request.request_id, self._remaining()
            ):
                if isinstance(frame, Delta) and first:
                    first = False
                    self._emit_first(frame)
                elif isinstance(frame, Delta):
                    self._job.events.put_nowait(frame)
                else:
                    outcome = frame
        except WorkerCallError as exc:
            if exc.lost and first:
                raise _LostBeforeFirstToken(self._assignment.decode.worker_id, exc) from None
            raise
        if outcome is None:
            raise self._protocol_error(self._assignment.decode.worker_id, "no finished frame")
        return self._finished(_LOCAL_PREFILL, outcome)

    async def _run_prefill(self, target: KVTarget) -> PrefillResult:
        first, result = False, None
        try:
            stream = self._prefill.prefill(self._request, target, self._remaining())
            async for frame in stream:
                if isinstance(frame, Delta) and not first:
                    first = True
                    self._emit_first(frame)
                elif isinstance(frame, PrefillResult) and first:
                    result = frame
                else:
                    raise self._protocol_error(self._assignment.prefill.worker_id, "bad frame")
        except WorkerCallError as exc:
            if exc.lost and not first:
                raise _LostBeforeFirstToken(await self._who_is_lost(), exc) from None
            raise
        if result is None:
            raise self._protocol_error(self._assignment.prefill.worker_id, "no done frame")
        return result

    def _emit_first(self, delta: Delta) -> None:
        a = self._assignment
        started = Started(
            self._request.request_id,
            len(self._request.prompt_token_ids),
            a.prefill.worker_id,
            a.decode.worker_id,
        )
        self._job.events.put_nowait(started)
        self._job.events.put_nowait(delta)
        self._ttft_s = self._driver.now() - self._arrival

    async def _who_is_lost(self) -> str:
        """P answered UNAVAILABLE: P is gone, or P could not reach D. Releasing the reservation
        (needed anyway) tells which: it fails too only if D is gone."""
        released = await self._release(ReleaseReason.PEER_LOST)
        return self._assignment.prefill.worker_id if released else self._assignment.decode.worker_id

    async def _release(self, reason: ReleaseReason) -> bool:
        """Best effort and bounded; False: D could not be reached."""
        timeout = self._driver.config.release_timeout_s
        try:
            await asyncio.wait_for(
                self._decode.release(self._request.request_id, reason, timeout), timeout
            )
        except (WorkerCallError, TimeoutError):
            return False
        return True

    def _remaining(self) -> float:
        return self._driver.remaining(self._job)

    def _protocol_error(self, worker_id: str, what: str) -> WorkerCallError:
        return WorkerCallError(
            worker_id, "stream", ErrorCode.INTERNAL, f"protocol violation: {what}"
        )

    def _finished(self, prefill: PrefillResult, decode: DecodeResult) -> Finished:
        timings = Timings(
            routing_s=self._routing_s,
            ttft_s=self._ttft_s,
            total_s=self._driver.now() - self._arrival,
            prefill_s=prefill.prefill_s,
            kv_transfer_s=prefill.kv_transfer_s,
            kv_transfer_exposed_s=prefill.kv_transfer_exposed_s,
            kv_bytes=prefill.kv_bytes,
        )
        return Finished(
            decode.finish_reason,
            len(self._request.prompt_token_ids),
            decode.num_completion_tokens,
            prefill.num_cached_tokens or decode.num_cached_tokens,
            timings,
        )


# What a colocated attempt knows of its prefill: it ran inside D's batch, not timed apart.
_LOCAL_PREFILL = PrefillResult(None, 0, 0, 0.0, 0.0, 0.0, 0)


def _aborted(request: GenerateInput, arrival: float, now: float, num_delivered: int) -> Finished:
    return Finished(
        FinishReason.ABORT,
        len(request.prompt_token_ids),
        num_delivered,
        0,
        Timings(total_s=now - arrival),
    )


async def expire_periodically(
    router: Router, interval_s: float, on_expired: Callable[[list[str]], None]
) -> None:
    """Sweeps silent workers out every ``interval_s`` (until cancelled), so ListWorkers and the
    logs show a hung worker promptly even when no request arrives."""
    while True:
        await asyncio.sleep(interval_s)
        expired = router.expire()
        if expired:
            on_expired(expired)
