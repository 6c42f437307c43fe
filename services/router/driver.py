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
router instead of failing; one that could never fit fails at once (RESOURCE_EXHAUSTED). One that
no registered worker can serve waits the same way for at most ``no_worker_wait_s`` (a worker
starting, restarting or back from a late report), then fails UNAVAILABLE.
A worker lost in 2-3 (before the first token) is removed and the request routed again, with
a growing wait, for as long as such losses in a row stay within ``DriverConfig.retry_window_s``
(10 s: a link cut for a few seconds, a worker restarting on its port, the same worker back at
its next report); one whose step computing the prompt failed there (INTERNAL) is routed again
once, the worker kept.
Resuming: a worker lost after the first token (P during its hand-off, D while decoding) is
removed too (a step that failed there, INTERNAL, leaves it registered: it freed the request and
serves on), and the request goes on on a decode-capable worker (``RouteRequest.decode_only``)
from the tokens its caller has: that worker prefills the prompt and those tokens and streams
what follows (ReserveKVRequest.resume_output_token_ids), exactly what the lost one would have
sent for greedy and seeded sampling alike (the sampler draws token ``i`` from ``(seed, i)``), at
most ``DriverConfig.max_resumes`` times, within the deadline; the caller sees one stream. A
worker found gone as the resumed try reserves (workers that died together, a link still cut)
costs no resume: it is tried again within the retry window, as before the first token;
tokens that end the request already (``max_tokens`` here; a stop token or string, the context,
on the worker: ``ResumeComplete``) finish it as it finished there.
Abort, client cancellation, the deadline, or a failure after step 2 release D's reservation
(``DecodeClient.release``): nothing a request held outlives it. Every call gets what is left of
the deadline as its own; a request without one gets ``DriverConfig.default_timeout_s``.

The work runs in its own task and hands events to the caller through a queue, so the caller
waits on one thing (the queue, bounded by the deadline), and abort, cancel and deadline all end
the request the same way: cancel the task, whose handler releases what it holds.

Request ids: an id is taken while its request runs and free again once the request has ended,
even while its cleanup still runs, or once its deadline has passed. A second request with the
id of a running one waits up to ``id_reuse_wait_s`` (0.5 s; the client's own timer or cancel
may be here before the old call's cancellation) for it to end, then gets
``DuplicateRequestError``, ALREADY_EXISTS, before any work, unless it is its client's resend
of that request (``take_over``: the old call ends, ABORTED). A new request with the id of ones
still releasing (not only the last: one ended while it waited for an earlier one's) waits for
those releases (at most ``release_timeout_s`` + 1 s, within its own
deadline) before it reserves anything, so the old request's Release can never free the new
one's reservation; a release that takes longer fails the new request with ALREADY_EXISTS, still
before any work.

Draining (the router stopping, ``--drain-timeout``): ``begin_drain`` refuses every new request
(``ShuttingDownError``, UNAVAILABLE, before any work) and ``drain`` waits for the running ones
to end; those still running once the drain's time is up fail the same way, their work stopped
and what they hold released, as an abort's.

Usage: ``Finished.num_completion_tokens`` is the number of tokens this driver delivered to the
caller, however the request ended.

Metrics: the ``observer`` (services/common/metrics.py ``RequestMetrics``) is told once how each
request ended (``Outcome``): its finish reason, ABORT, CANCELLED (its caller went away: a
cancelled gRPC call, an HTTP client gone, seen as ``cancel``, ``asyncio.CancelledError`` or
``GeneratorExit``, whichever comes first), ERROR, or REFUSED (``refused``), with what it
delivered and its TTFT if a first token reached the caller. A call its client sent again
(``take_over``) tells no outcome: the request goes on in the new call, which tells it; the old
one tells ``superseded`` the tokens it delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from services.common.errors import (
    REASON_MARGIN_S,
    PermissionDeniedError,
    RequestNotFoundError,
    ShuttingDownError,
    SupersededError,
)
from services.common.types import FinishReason
from services.router.attempt import (
    Attempt,
    FullOnReserve,
    LostBeforeFirstToken,
    WorkerLoss,
    request_finished,
)
from services.router.core import (
    Assignment,
    NoRoomNowError,
    NoWorkerError,
    Router,
    RouteRequest,
    check_request,
)
from services.router.driver_types import (  # the driver's API, imported from here by callers
    DecodeClient,
    DecodeResult,
    Delta,
    DriverConfig,
    DuplicateRequestError,
    Event,
    Finished,
    GenerateInput,
    KVTarget,
    Outcome,
    PrefillClient,
    PrefillResult,
    ReleaseReason,
    RequestObserver,
    Reservation,
    Started,
    Timings,
    WorkerCallError,
    WorkerClients,
    WorkerLostError,
    aborted_finished,
    admission_wait,
)

_log = logging.getLogger(__name__)


class _LossRun:
    """A request's tries in a row that ended with their worker lost before producing a token:
    when the run began, and how many retries it has had. A token starts a new run."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._num_tokens = -1
        self.started_at = 0.0
        self.num_retries = 0

    def note(self, num_tokens: int) -> None:
        """A try ended lost; ``num_tokens``: the tokens the caller has now."""
        if num_tokens != self._num_tokens:
            self._num_tokens, self.started_at, self.num_retries = num_tokens, self._clock(), 0

    def within(self, window_s: float, delay_s: float, remaining_s: float) -> bool:
        """Whether one more retry, ``delay_s`` from now, falls within the window (the first
        always does) and before the deadline (by ``REASON_MARGIN_S`` at least: else the
        request fails now, with the loss, which a try at the deadline would hide)."""
        if delay_s + REASON_MARGIN_S >= remaining_s:
            return False
        return self.num_retries == 0 or self.elapsed() + delay_s < window_s

    def elapsed(self) -> float:
        return self._clock() - self.started_at


__all__ = [
    "DecodeClient",
    "DecodeResult",
    "Delta",
    "DriverConfig",
    "DuplicateRequestError",
    "Event",
    "EventStream",
    "Finished",
    "GenerateInput",
    "KVTarget",
    "Outcome",
    "PrefillClient",
    "PrefillResult",
    "ReleaseReason",
    "RequestDriver",
    "RequestObserver",
    "Reservation",
    "Started",
    "Timings",
    "WorkerCallError",
    "WorkerClients",
    "WorkerLostError",
    "expire_periodically",
    "new_request_id",
]


@dataclass
class _Job:
    request_id: str
    deadline: float
    events: asyncio.Queue[Event | _Stop]
    ticket: object  # the EventStream of the call that opened it
    release_reason: ReleaseReason = ReleaseReason.ABORTED
    task: asyncio.Task[None] | None = None
    # Set once the caller has its outcome (or is gone): the id is free, the cleanup may still
    # run.
    ended: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # The tasks of earlier requests with this id still running at the open (their cleanup, or
    # their own wait for an earlier one's: a take-over of a take-over).
    predecessors: tuple[asyncio.Task[None], ...] = ()
    owner: str = ""
    # Every token handed to the caller, in order: what a resumed try goes on from.
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    started: bool = False  # the caller has this stream's Started (with its first token)
    routing_s: float = 0.0  # of the first try: from arrival to its worker pair
    ttft_s: float = 0.0
    prefill: PrefillResult | None = None  # the prefill worker's, once one has ended
    # For its one ``RequestObserver.ended``: when it arrived, its prompt, the tokens its
    # caller had before this call (a resend's) and has now, and whether it was told.
    arrival: float = 0.0
    num_prompt_tokens: int = 0
    num_resumed: int = 0
    num_delivered: int = 0
    observed: bool = False

    @property
    def delivered_first(self) -> bool:
        """This call handed its caller a token (the first this call delivered reached it)."""
        return self.num_delivered > self.num_resumed

    @property
    def ending(self) -> bool:
        return self.ended.is_set()


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
        self._tasks_by_id: dict[str, set[asyncio.Task[None]]] = {}  # every job's until done
        # Ids ended by ``abort`` → (owner, until when): a resend of one ends aborted.
        self._aborted: OrderedDict[str, tuple[str, float]] = OrderedDict()
        # Told of every request that ends (services/common/metrics.py); None: nobody listens.
        self.observer: RequestObserver | None = None
        self._draining = False
        self._cut = False  # ``cut_drain``

    @property
    def num_running(self) -> int:
        return sum(not job.ending for job in self._jobs.values())

    @property
    def draining(self) -> bool:
        """The router is stopping: new requests are refused (``begin_drain``)."""
        return self._draining

    def begin_drain(self) -> None:
        """Every request from now on fails ``ShuttingDownError`` before any work."""
        self._draining = True

    def cut_drain(self) -> None:
        """A second signal: the drain in flight (or the next) fails what is left now."""
        self._draining = self._cut = True

    async def drain(self, timeout_s: float, poll_s: float = 0.05) -> int:
        """Refuses new requests (``begin_drain``), waits up to ``timeout_s`` for the running ones
        to end, then fails those left with ``ShuttingDownError`` and waits (bounded) for their
        cleanup; how many it failed."""
        self.begin_drain()
        deadline = self._clock() + timeout_s
        while self.num_running and self._clock() < deadline and not self._cut:
            await asyncio.sleep(min(poll_s, max(0.0, deadline - self._clock())))
        left = [job for job in self._jobs.values() if not job.ending]
        why = (
            "was stopped at once (a second signal)"
            if self._cut
            else f"is shutting down and the request did not finish within its drain ({timeout_s:g}s)"
        )
        for job in left:
            message = f"request {job.request_id!r}: the router {why}; send it again"
            job.events.put_nowait(_Stop(ShuttingDownError(message)))
            self._end(job)
        tasks = {job.task for job in left if job.task is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.release_timeout_s + 1.0)
        return len(left)

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
        self._remember_aborted(job)

    def _remember_aborted(self, job: _Job) -> None:
        now = self._clock()
        while self._aborted and next(iter(self._aborted.values()))[1] <= now:  # oldest first
            self._aborted.popitem(last=False)
        if len(self._aborted) >= _MAX_ABORTED:
            self._aborted.popitem(last=False)
        self._aborted[job.request_id] = (job.owner, now + self.config.aborted_ttl_s)

    def _was_aborted(self, request: GenerateInput) -> bool:
        """``request`` resends one that ``abort`` ended (and forgets that), or is new: forgets
        any abort of its id."""
        owner, until = self._aborted.pop(request.request_id, ("", 0.0))
        return request.resend and owner == request.owner and self._clock() < until

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
        self._observe_gone(job)  # counted now: its stream may never run again
        self._end(job)

    def _end(self, job: _Job) -> None:
        """Stops ``job``'s work (its task's handler releases what it holds); its id is free."""
        job.ended.set()
        if self._clock() >= job.deadline:
            job.release_reason = ReleaseReason.DEADLINE_EXCEEDED
        if job.task is not None:
            job.task.cancel()

    def generate(self, request: GenerateInput, timeout_s: float | None = None) -> EventStream:
        """Events of one request: Started, Delta..., Finished (reason ABORT after ``abort``)."""
        return EventStream(lambda stream: self._generate(request, timeout_s, stream))

    async def _generate(
        self, request: GenerateInput, timeout_s: float | None, ticket: object
    ) -> AsyncGenerator[Event, None]:
        arrival = self._clock()
        # Completion tokens handed to the caller: by this stream, and before it by a broken one
        # (a request its client resumes, GenerateRequest.resume_output_token_ids).
        num_delivered = len(request.resume_output_token_ids)
        num_prompt = len(request.prompt_token_ids)
        if self._was_aborted(request):
            # Aborted while its stream was broken: the resend gets what that stream would have.
            aborted = aborted_finished(num_prompt, arrival, arrival, num_delivered)
            if self.observer is not None:  # (this call delivered nothing)
                self.observer.ended(
                    Outcome.ABORT, dataclasses.replace(aborted, num_completion_tokens=0)
                )
            yield self._started(request, request.request_id)
            yield aborted
            return
        try:
            job = self._open(
                request, arrival + (timeout_s or self.config.default_timeout_s), ticket
            )
        except Exception as exc:
            self.refused(exc)
            raise
        job.arrival, job.num_prompt_tokens = arrival, num_prompt
        job.num_resumed = job.num_delivered = num_delivered
        request = dataclasses.replace(request, request_id=job.request_id)
        task = job.task = asyncio.create_task(self._run(job, request, arrival))
        self._tasks_by_id.setdefault(job.request_id, set()).add(task)
        task.add_done_callback(lambda _: self._close(job))
        started = False  # this stream's: every stream has one, before its Finished
        try:
            while True:
                event = await self._next(job, task)
                if isinstance(event, _Stop):
                    aborted = self._so_far(job)
                    self._observe(job, Outcome.ABORT, aborted)
                    if not started:
                        yield self._started(request, job.request_id)
                    yield aborted
                    return
                if isinstance(event, Started):
                    started = True
                elif isinstance(event, Delta):
                    job.num_delivered += len(event.token_ids)
                elif isinstance(event, Finished):
                    event = dataclasses.replace(event, num_completion_tokens=job.num_delivered)
                    self._observe(job, Outcome.of(event.finish_reason), event)
                    if not started:  # ended without a worker's token (a resume complete)
                        yield self._started(request, job.request_id)
                yield event
                if isinstance(event, Finished):
                    return
        except SupersededError:
            self._observe_superseded(job)
            raise
        except Exception:
            self._observe(job, Outcome.ERROR)
            raise
        finally:
            # Not told yet: its caller went away (asyncio.CancelledError while it waited for an
            # event: a gRPC cancel, an HTTP client gone; GeneratorExit: its stream closed at a
            # yield), which neither of the above catches.
            self._observe_gone(job)
            job.ended.set()
            if self._clock() >= job.deadline:  # grpc may cancel us at the deadline first
                job.release_reason = ReleaseReason.DEADLINE_EXCEEDED
            await self._stop(task)

    @staticmethod
    def _started(request: GenerateInput, request_id: str) -> Started:
        """The Started of a stream that ends before any worker's token: no worker served it."""
        return Started(request_id, len(request.prompt_token_ids), "", "")

    def refused(self, exc: BaseException) -> None:
        """A request refused before any work (``exc``: why): by ``generate`` itself (the router
        draining, an empty prompt, its id in use), or by a front end's own checks of it (the
        prompt, the sampling parameters) before it called ``generate``."""
        if self.observer is not None:
            self.observer.ended(Outcome.REFUSED, None)

    def _so_far(self, job: _Job) -> Finished:
        """The ``Finished`` of ``job`` ending now, not by a worker's finish: what it delivered,
        its TTFT if a first token reached its caller, its prefill if one ended."""
        return aborted_finished(
            job.num_prompt_tokens,
            job.arrival,
            self._clock(),
            job.num_delivered,
            ttft_s=job.ttft_s if job.delivered_first else 0.0,
            routing_s=job.routing_s,
            prefill=job.prefill,
        )

    def _observe(self, job: _Job, outcome: Outcome, event: Finished | None = None) -> None:
        """Tells the observer, once per request, how ``job`` ended (``event``: as its caller was
        told; None: ``_so_far``). The tokens its client resumed from are the earlier call's."""
        if job.observed:
            return
        job.observed = True
        if self.observer is None:
            return
        event = event or self._so_far(job)
        ttft_s = event.timings.ttft_s if job.delivered_first else 0.0
        timings = dataclasses.replace(event.timings, ttft_s=ttft_s)
        new = max(0, event.num_completion_tokens - job.num_resumed)
        self.observer.ended(
            outcome, dataclasses.replace(event, num_completion_tokens=new, timings=timings)
        )

    def _observe_superseded(self, job: _Job) -> None:
        """``job``'s client sent it again (``take_over``): the request goes on in that call,
        which tells its outcome; this one counts only the tokens it delivered."""
        if job.observed:
            return
        job.observed = True
        if self.observer is not None:
            self.observer.superseded(max(0, job.num_delivered - job.num_resumed))

    def _observe_gone(self, job: _Job) -> None:
        """``job``'s caller went away: CANCELLED, or ERROR if that was its deadline (grpc may
        cancel the call at the deadline before the driver's own timer fires: its client saw
        DEADLINE_EXCEEDED)."""
        at_deadline = self._clock() >= job.deadline - REASON_MARGIN_S
        self._observe(job, Outcome.ERROR if at_deadline else Outcome.CANCELLED)

    async def wait_for_id(self, request_id: str, timeout_s: float | None) -> None:
        """Waits, at most ``id_reuse_wait_s`` (and until ``REASON_MARGIN_S`` before
        ``timeout_s``), for a running request that holds ``request_id`` to end; ``check_new``
        then says whether the id is free."""
        old = self._live(request_id)
        if old is None or self._clock() >= old.deadline:
            return
        wait = self.config.id_reuse_wait_s
        if timeout_s is not None:  # ALREADY_EXISTS is told before the deadline
            wait = min(wait, timeout_s - REASON_MARGIN_S)
        if wait <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(old.ended.wait(), wait)

    def take_over(self, request_id: str, owner: str) -> None:
        """A client sends again a request whose stream broke on its side (a connection that
        died without closing, GenerateRequest.resume): a request of that id and ``owner`` still
        running here ends now (its stream fails with ``SupersededError``) and the new call, which
        ``check_new`` then lets through, waits for its release. Another caller's is left."""
        old = self._live(request_id)
        if old is None or old.owner != owner:
            return
        _log.info(
            "request %r sent again by its client, whose stream broke: its running call ends",
            request_id,
        )
        message = f"request {request_id!r} was sent again by its client: it goes on there"
        old.events.put_nowait(_Stop(SupersededError(message)))
        self._end(old)

    def check_new(self, request_id: str) -> None:
        old = self._live(request_id)
        if old is not None and self._clock() >= old.deadline:
            # Its caller has (or is about to have) DEADLINE_EXCEEDED: the client's own timer
            # can fire, and the client reuse the id, before this loop has run the old call's
            # timeout or cancel callback. It ends now; the new request waits for its release.
            self._end(old)
            old = None
        if old is not None:
            raise DuplicateRequestError(f"request id {request_id!r} is already running")

    def _open(self, request: GenerateInput, deadline: float, ticket: object) -> _Job:
        if self._draining:
            raise ShuttingDownError("the router is shutting down; send the request again")
        check_request(len(request.prompt_token_ids) > 0, "prompt must have at least one token")
        request_id = request.request_id or new_request_id()
        self.check_new(request_id)
        job = _Job(request_id, deadline, asyncio.Queue(), ticket, owner=request.owner)
        job.output_token_ids.extend(request.resume_output_token_ids)  # its client resumes it
        # Every earlier request with this id whose task still runs (ending: its cleanup, or its
        # own wait for an earlier one), not only the last: one ended while it waited is done
        # before the one it waited for.
        running = self._tasks_by_id.get(request_id, set())
        job.predecessors = tuple(task for task in running if not task.done())
        self._jobs[request_id] = job
        return job

    def _close(self, job: _Job) -> None:
        """The job's task is done: nothing of it runs any more."""
        if self._jobs.get(job.request_id) is job:
            del self._jobs[job.request_id]
        tasks = self._tasks_by_id.get(job.request_id, set())
        tasks.discard(job.task)  # type: ignore[arg-type]
        if not tasks:
            self._tasks_by_id.pop(job.request_id, None)

    async def _after_predecessor(self, job: _Job) -> None:
        """Waits, bounded, for the cleanup of every earlier request with this id still running
        (module docstring)."""
        if not job.predecessors:
            return
        # (a release that takes longer fails it ALREADY_EXISTS, told before its deadline)
        left = self.remaining(job) - REASON_MARGIN_S
        bound = max(0.0, min(self.config.release_timeout_s + 1.0, left))
        _, pending = await asyncio.wait(set(job.predecessors), timeout=bound)
        job.predecessors = ()
        if pending:
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
        if not task.cancelling():  # cancelled once (``_end``): a second would cut its cleanup
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
        finally:  # what no worker's report counted yet stops counting as their load
            self.router.settle(job.request_id)

    async def _serve(self, job: _Job, request: GenerateInput, arrival: float) -> Finished:
        resumes, step_retried, last_loss = 0, False, None
        losses = _LossRun(self._clock)  # tries in a row that produced no token
        while True:
            outputs = tuple(job.output_token_ids)
            if len(outputs) >= request.sampling.max_tokens:  # lost after its last token
                done = DecodeResult(FinishReason.LENGTH, len(outputs))
                return request_finished(
                    job, len(request.prompt_token_ids), done, self._clock() - arrival
                )
            route = RouteRequest(
                request.request_id,
                request.prompt_token_ids + outputs,
                request.sampling.max_tokens - len(outputs),
                decode_only=bool(outputs),
                decode_may_prefill=self.config.local_prefill_queue_tokens > 0,
            )
            try:
                assignment = await self._admit(job, route)
            except NoWorkerError as exc:
                if last_loss is None:
                    raise
                raise self._failure(
                    request.request_id, last_loss, job, resumes, losses, exc
                ) from None
            this_try = dataclasses.replace(request, resume_output_token_ids=outputs)
            try:
                return await Attempt(self, job, this_try, assignment, arrival).run()
            except FullOnReserve as full:
                # The router's estimate was a report behind the worker: count it full until
                # its next report, and wait for room like any request that does not fit now.
                self.router.mark_full(full.worker_id)
                await asyncio.sleep(min(self.config.admission_poll_s, self.remaining(job)))
                continue
            except WorkerLoss as lost:
                if lost.gone:  # (a failed step: the worker serves on)
                    self._forget(lost.worker_id, str(lost.error))
                last_loss = lost
                losses.note(len(job.output_token_ids))
                # (a request its client resumed may have tokens before its first try)
                nothing = not job.started or isinstance(lost, LostBeforeFirstToken)
                if nothing and not lost.gone:  # its step failed: routed again once
                    if not step_retried:
                        step_retried = True
                        self._routing_again(request.request_id, lost, 1)
                        continue
                elif nothing:
                    # Lost before it produced anything (gone before the first token, or a
                    # resumed try whose worker was gone as it reserved): no resume spent on it;
                    # tried again while the run of such losses is within the retry window.
                    delay = self.config.retry_delay(losses.num_retries + 1)
                    if losses.within(self.config.retry_window_s, delay, self.remaining(job)):
                        losses.num_retries += 1
                        self._routing_again(request.request_id, lost, losses.num_retries)
                        await asyncio.sleep(delay)
                        continue
                elif resumes < self.config.max_resumes:
                    resumes += 1
                    self._resuming(request.request_id, lost, len(job.output_token_ids), resumes)
                    continue
                raise self._failure(request.request_id, lost, job, resumes, losses) from None

    def _resuming(self, request_id: str, lost: WorkerLoss, num_tokens: int, resumes: int) -> None:
        _log.warning(
            "request %r %s worker %r after %d tokens; resuming elsewhere (%d of %d)",
            request_id, "lost" if lost.gone else "failed on", lost.worker_id, num_tokens,
            resumes, self.config.max_resumes,
        )  # fmt: skip
        if self.observer is not None:
            self.observer.resumed()

    @staticmethod
    def _routing_again(request_id: str, lost: WorkerLoss, num_retries: int) -> None:
        _log.warning(
            "request %r %s worker %r before a token; trying again (retry %d)",
            request_id, "lost" if lost.gone else "failed on", lost.worker_id, num_retries,
        )  # fmt: skip

    @staticmethod
    def _failure(
        request_id: str,
        lost: WorkerLoss,
        job: _Job,
        resumes: int,
        losses: _LossRun,
        no_worker: NoWorkerError | None = None,
    ) -> BaseException:
        """What a request that may not be routed again or resumed fails with: its step's
        INTERNAL as it came, or the loss (UNAVAILABLE), saying how far it got (and, when no
        worker was left to try again on, that too)."""
        if not lost.gone and no_worker is None:
            return lost.error
        n = len(job.output_token_ids)
        when = f"after {n} tokens" if job.started else "before the first token"
        when += f", after {_count(resumes, 'resume', 'resumes')}" if resumes else ""
        if losses.num_retries:
            when += f", after {_count(losses.num_retries, 'retry', 'retries')} in {losses.elapsed():.1f}s"
        then = f"; then {no_worker}" if no_worker is not None else ""
        return WorkerLostError(
            f"request {request_id!r}: worker {lost.worker_id!r} was lost {when} "
            f"({lost.error}){then}"
        )

    async def _admit(self, job: _Job, route: RouteRequest) -> Assignment:
        """Route, waiting while every worker that could take the request is full, and for
        at most ``no_worker_wait_s`` while none that could is registered."""
        # (a request without a worker fails UNAVAILABLE, one without room DEADLINE_EXCEEDED,
        # each with the reason and ``REASON_MARGIN_S`` before its deadline)
        poll = self.config.admission_poll_s
        started = self._clock()
        last_try = job.deadline - REASON_MARGIN_S
        give_up = min(started + self.config.no_worker_wait_s, last_try)
        while True:
            wait = poll
            try:
                return self.router.route(route)
            except NoRoomNowError as e:
                wait = admission_wait(self._clock(), last_try, poll)
                if wait is None:
                    job.release_reason = ReleaseReason.DEADLINE_EXCEEDED
                    raise TimeoutError(
                        f"request {job.request_id!r} waited {self._clock() - started:.1f}s for "
                        f"KV room and its deadline is up: {e}"
                    ) from None
            except NoWorkerError:
                wait = admission_wait(self._clock(), give_up, poll)
                if wait is None:
                    raise
            await asyncio.sleep(min(wait, self.remaining(job)))

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


_MAX_ABORTED = 10_000  # ids of aborted requests remembered at most (the oldest forgotten first)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


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
