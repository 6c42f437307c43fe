"""The engine loop: the one thread that runs an engine, for prefill, decode and mixed workers.

The engine is not thread-safe and its steps are CPU-bound, so one thread (the *engine thread*)
owns it. Who calls what, from which thread, and when:

1. **commands** - ``submit(fn)`` (any thread) queues ``fn(engine)``; ``call(fn)`` is its
   awaitable form. The engine thread runs every queued command, in submission order, between two
   steps, publishes a snapshot, and only then hands back each command's result or exception (so
   a caller that got its result already sees its effect in ``snapshot``). A command cancelled
   before it ran never runs. Commands must not block: the next step waits for them.
2. **steps** - once ``start`` attached the event loop's handlers, the engine thread steps while
   the engine has unfinished requests, passing ``on_layer_done`` (called on the engine thread
   after each local layer). After each step: ``after_step(engine, outputs)`` on the engine
   thread, a new snapshot, then the outputs and the step's timing go to the event loop
   (``call_soon_threadsafe``), where the meter records them and ``on_outputs`` runs. Under a
   pipelined layout a step stays in flight between two ``engine.step`` calls (pipeline.py):
   before running commands, and before the thread ends, the loop settles it (``engine.settle``,
   handled like a step), so commands never see one in flight.
3. **idle** - with nothing to step the thread sleeps on a condition until a command arrives
   (no busy wait). A step that scheduled nothing (every request waits for blocks held by
   imports) sleeps too, until a command or ``idle_poll_s``. While the engine hosts work for
   others, it ticks every ``idle_poll_s`` (an empty step: expiry of hosted leases, a snapshot).
4. **beside** - ``submit_beside(fn)`` runs ``fn(engine)`` on a second thread, never behind a
   step: only for engine calls that are safe during one (``Engine.import_kv`` into blocks only
   the importing request holds; hosted work, ``hosting.py``, under its own lock).
5. **reads** - ``snapshot`` (any thread, never waits) is a ``LoopSnapshot``, at most one step or
   one batch of commands old. ``settled()`` waits only while commands submitted before it are
   queued (then behind the step in flight): read-your-writes for leak checks.

Failure rules. *A failed step fails only its requests*: when ``engine.step`` raises, the
requests it computed (the error's ``request_ids``, else those the layer hook saw, else the
running batch) are aborted here and ``on_step_failed`` gets them, with a log reference; the loop
steps on. A ``PrefixFetchError`` is no failure: its requests recompute their prefix. *A loop
that dies halts*: an error outside any step (``after_step``, the loop itself) or in an event-loop
handler stops all stepping, resolves ``died`` and calls ``on_died``; commands still run, so the
worker can free what its requests hold. ``stop`` ends the thread after the step in flight and the
commands queued before it; later commands fail with ``DependencyUnavailableError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from services.common.errors import ConfigError, DependencyUnavailableError, RequestNotFoundError
from services.common.load import LoadMeter
from services.common.types import RequestOutput
from services.engine.engine import Engine
from services.engine.prefix_fetch import PrefixFetchError
from services.engine.snapshot import LoopSnapshot
from services.engine.step import LayerDoneHook, StepContext

T = TypeVar("T")
log = logging.getLogger(__name__)

AfterStep = Callable[[Engine, list[RequestOutput]], None]


@dataclass(frozen=True)
class LoopConfig:
    name: str = "engine"  # names the threads and the log lines
    # How often a stalled or hosting engine is looked at again with no command arriving.
    idle_poll_s: float = 0.5
    load_window_s: float = 1.0  # of the meter's busy fraction

    def __post_init__(self) -> None:
        for key in ("idle_poll_s", "load_window_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")


@dataclass(frozen=True)
class StepFailure:
    """A step raised; ``request_ids`` (engine ids) were aborted, ``ref`` is in the log."""

    request_ids: tuple[str, ...]
    error: Exception
    ref: str


@dataclass(frozen=True)
class _StepDone:
    outputs: list[RequestOutput]
    started_at: float
    done_at: float
    ran_batch: bool


@dataclass(frozen=True)
class _Died:
    error: BaseException


@dataclass
class _Counters:  # the engine thread's; published in ``LoopSnapshot``
    num_steps: int = 0
    num_failed_steps: int = 0
    num_prefix_fallbacks: int = 0
    num_commands: int = 0
    num_idle_waits: int = 0


@dataclass(frozen=True)
class _Command:
    fn: Callable[[Engine], Any]
    future: Future[Any]


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        config: LoopConfig | None = None,
        on_layer_done: LayerDoneHook | None = None,
        after_step: AfterStep | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.config = config or LoopConfig()
        self.meter = LoadMeter(self.config.load_window_s, clock)
        self._on_layer_done = on_layer_done
        self._after_step = after_step
        self._clock = clock
        # Intra-op threads are per thread under OpenMP: give the loop's threads the caller's.
        self._num_threads = torch.get_num_threads()
        self._beside = ThreadPoolExecutor(
            1, f"{self.config.name}-beside", torch.set_num_threads, (self._num_threads,)
        )
        self._cond = threading.Condition()
        self._queue: deque[_Command] = deque()  # under _cond, as the flags and counts below
        self._thread: threading.Thread | None = None
        self._listening = self._halted = self._closing = self._stalled = False
        self._num_submitted = self._num_settled = 0
        self._counts = _Counters()
        self._step_ids: tuple[str, ...] | None = None
        self._step_contexts: list[StepContext] = []  # the hook's, one per micro-batch
        self.step_started_at = 0.0  # of the step in flight (the engine thread writes it)
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._handlers: tuple[Callable[..., None], ...] = ()
        # Resolves with the error that stopped the loop, if it ever stops unasked.
        self.died: asyncio.Future[BaseException] | None = None
        self.snapshot = self._snapshot()

    # -- lifecycle (event loop) -----------------------------------------------------------

    def start(
        self,
        on_outputs: Callable[[list[RequestOutput], float], None],
        on_step_failed: Callable[[StepFailure], None],
        on_died: Callable[[BaseException], None],
    ) -> None:
        """Attach the running event loop's handlers and let the engine step."""
        self._aloop = asyncio.get_running_loop()
        self.died = self._aloop.create_future()
        self._handlers = (on_outputs, on_step_failed, on_died)
        with self._cond:
            self._listening = True
            self._ensure_thread()
            self._cond.notify()

    async def stop(self) -> None:
        """Ends the engine thread after the step in flight and the commands queued before."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)
        self._beside.shutdown(wait=True)

    # -- commands (any thread) ------------------------------------------------------------

    def submit(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Queues ``fn(engine)`` for the engine thread, between two steps."""
        future: Future[T] = Future()
        with self._cond:
            if self._closing:
                future.set_exception(
                    DependencyUnavailableError(f"the {self.config.name} engine loop has stopped")
                )
                return future
            self._queue.append(_Command(fn, future))
            self._num_submitted += 1
            self._ensure_thread()
            self._cond.notify()
        return future

    async def call(self, fn: Callable[[Engine], T]) -> T:
        return await asyncio.wrap_future(self.submit(fn))

    def submit_beside(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Runs ``fn(engine)`` off the engine thread, now (see the module docstring, 4)."""
        return self._beside.submit(fn, self.engine)

    async def settled(self) -> LoopSnapshot:
        """The snapshot once every command submitted before this call has run."""
        with self._cond:
            pending = self._num_submitted != self._num_settled
        if pending:
            await self.call(lambda engine: None)
        return self.snapshot

    def _ensure_thread(self) -> None:  # under _cond
        if self._thread is None:
            name = f"{self.config.name}-engine"
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    # -- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self._num_threads)
        while (commands := self._next_commands()) is not None:
            if commands and self.engine.in_flight:
                self._step(settle=True)  # no command sees a step in flight (pipeline.py)
            self._run_commands(commands)
            with self._cond:
                may_step = self._listening and not (self._halted or self._closing)
            if not may_step:
                continue
            try:
                self._step_or_tick()
            except Exception as exc:  # outside any step: the loop cannot go on stepping
                self._halt(exc)
        if self.engine.in_flight:
            self._step(settle=True)

    def _next_commands(self) -> list[_Command] | None:
        """The queued commands (waiting for one while there is nothing to step); None once
        the loop is closing and none is left."""
        with self._cond:
            if not self._queue and not self._closing:
                timeout = self._idle_timeout()
                if timeout != 0:
                    self._counts.num_idle_waits += 1
                    self._cond.wait(timeout)
            if self._closing and not self._queue:
                return None
            commands = list(self._queue)
            self._queue.clear()
            if commands:
                self._stalled = False
            return commands

    def _idle_timeout(self) -> float | None:  # under _cond: 0 = step now, None = until woken
        if not self._listening or self._halted:
            return None
        if self.engine.has_unfinished_requests and not self._stalled:
            return 0
        snap = self.snapshot.engine
        if self._stalled or snap.hosted_layers or snap.num_hosted_blocks:
            return self.config.idle_poll_s
        return None

    def _run_commands(self, commands: list[_Command]) -> None:
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        for command in commands:
            if not command.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                outcomes.append((command.future, command.fn(self.engine), None))
            except BaseException as exc:  # the caller's to handle
                outcomes.append((command.future, None, exc))
        self._counts.num_commands += len(outcomes)
        if commands:
            self._publish()
        with self._cond:
            self._num_settled += len(commands)
        for future, result, error in outcomes:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _step_or_tick(self) -> None:
        engine = self.engine
        if engine.has_unfinished_requests:
            self._step()
        elif self.snapshot.engine.hosted_layers or self.snapshot.engine.num_hosted_blocks:
            engine.step()  # housekeeping of hosted work; nothing runs
            self._publish(engine_fresh=True)

    def _step(self, settle: bool = False) -> None:
        """One ``engine.step``, or with ``settle`` the end of the step in flight."""
        engine, before = self.engine, self.engine.snapshot
        self._step_ids, self._step_contexts = None, []
        started = self.step_started_at = self._clock()
        hook = None if self._on_layer_done is None else self._layer_done
        self.meter.begin(started)  # busy while it runs, not only once it ended
        try:
            outputs = engine.settle() if settle else engine.step(hook)
        except PrefixFetchError as exc:
            self._recompute(exc)
            return
        except Exception as exc:
            self._fail(exc)
            return
        finally:
            self.meter.end()
        done = self._clock()
        after = engine.snapshot
        ran = engine.in_flight or (after.num_steps, after.num_failed_steps) != (
            before.num_steps,
            before.num_failed_steps,
        )
        with self._cond:
            self._stalled = not ran and not outputs
        self._counts.num_steps += ran
        try:
            if self._after_step is not None:
                self._after_step(engine, outputs)
        finally:
            # (a failed ``after_step`` halts the loop: the snapshot shows where it stopped)
            self._publish(engine_fresh=self._after_step is None)
        if ran or outputs:
            self._post(_StepDone(outputs, started, done, ran))

    def _layer_done(self, layer: int, ctx: StepContext) -> None:
        # The requests this step computes, should it fail: each micro-batch's (they are
        # disjoint) once, at its first hooked layer.
        if not any(ctx is seen for seen in self._step_contexts):
            self._step_contexts.append(ctx)
            self._step_ids = (*(self._step_ids or ()), *ctx.num_tokens)
        if self._on_layer_done is not None:
            self._on_layer_done(layer, ctx)

    def _recompute(self, error: PrefixFetchError) -> None:
        log.warning("prefix fetch failed (%s); recomputing %s", error, error.request_ids)
        for request_id in error.request_ids:
            self._counts.num_prefix_fallbacks += 1
            with contextlib.suppress(RequestNotFoundError):
                self.engine.recompute_prefix(request_id)
        self._publish()

    def _fail(self, error: Exception) -> None:
        """Fail the requests the step computed (see the module docstring) and step on."""
        ids = getattr(error, "request_ids", None) or self._step_ids
        if not ids:
            ids = [seq.request_id for seq in list(self.engine.scheduler.running)]
        failure = StepFailure(tuple(ids), error, uuid.uuid4().hex[:12])
        log.error(
            "%s engine step failed (ref %s); failing %s",
            self.config.name,
            failure.ref,
            list(failure.request_ids),
            exc_info=error,
        )
        for request_id in failure.request_ids:
            with contextlib.suppress(RequestNotFoundError):
                self.engine.abort(request_id)
        self._counts.num_failed_steps += 1
        self._publish()
        self._post(failure)

    def _publish(self, engine_fresh: bool = False) -> None:
        if not engine_fresh:  # ``Engine.step`` publishes its own; commands change it unseen
            self.engine.migration.publish()
        self.snapshot = self._snapshot()

    def _snapshot(self) -> LoopSnapshot:
        waiting, counts = self.engine.scheduler.waiting, self._counts
        return LoopSnapshot(
            engine=self.engine.snapshot,
            num_waiting_tokens=sum(s.num_tokens - s.num_computed_tokens for s in waiting),
            num_steps=counts.num_steps,
            num_failed_steps=counts.num_failed_steps,
            num_prefix_fallbacks=counts.num_prefix_fallbacks,
            num_commands=counts.num_commands,
            num_idle_waits=counts.num_idle_waits,
        )

    def _halt(self, error: BaseException) -> None:
        log.critical("the %s engine loop died; it steps no more", self.config.name, exc_info=error)
        with self._cond:
            self._halted = True
        self._post(_Died(error))

    # -- the event loop side --------------------------------------------------------------

    def _post(self, event: _StepDone | StepFailure | _Died) -> None:
        if self._aloop is not None:
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody listens
                self._aloop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: _StepDone | StepFailure | _Died) -> None:
        if self.died is None or self.died.done():
            return  # the worker failed every request when the loop died
        if isinstance(event, _Died):
            self._die(event.error)  # logged by ``_halt``
            return
        on_outputs, on_step_failed, _ = self._handlers
        try:
            if isinstance(event, StepFailure):
                on_step_failed(event)
                return
            if event.ran_batch:
                self.meter.record(event.started_at, event.done_at)
            if event.outputs:
                on_outputs(event.outputs, event.done_at)
        except Exception as exc:  # a handler failed: nothing may step on from here
            log.critical(
                "the %s engine loop died; it steps no more", self.config.name, exc_info=exc
            )
            self._die(exc)

    def _die(self, error: BaseException) -> None:
        with self._cond:
            self._halted = True
        assert self.died is not None
        self.died.set_result(error)
        self._handlers[2](error)
