"""The load driver every service's load test shares: when iterations start, what is recorded.

A *scenario* (one per service: ``bench/loadtest/{router,prefill,decode,kvstore}.py``) knows how
to run one iteration against its service — e.g. Lookup → Pin → reads → Unpin for the kvstore —
and records each RPC of it through ``Recorder.rpc``. The driver decides when iterations start
and bounds the run. Lifecycle of one run (``run_load``):

1. the scenario is set up (connected, data in place) and ``warmup`` iterations ran unrecorded;
2. iterations start either **open loop**: at Poisson arrival times for ``rate`` per second
   (``bench.serve_workload.arrival_times`` with burstiness 1), each in its own task whatever
   the earlier ones are doing, at most ``max_in_flight`` at once (an arrival that finds them
   all busy waits for one, and how late it started is recorded as its ``lag``), or **closed
   loop**: ``users`` tasks, each starting its next iteration as soon as its last one ended;
3. no iteration starts at or after ``duration_s``, nor beyond ``max_requests``; each is
   bounded by ``timeout_s`` (then DEADLINE_EXCEEDED). At ``duration_s + timeout_s + GRACE_S``
   whatever still runs is cancelled and recorded CANCELLED: the run ends in bounded time
   however the service behaves;
4. every iteration and every RPC is one ``Sample``; ``bench.loadtest.report`` summarises them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
import resource
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from bench.serve_workload import arrival_times
from services.common.errors import ConfigError
from services.rpc.dataplane import DataPlaneError, ErrorKind

OK = "OK"
CANCELLED = "CANCELLED"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
GRACE_S = 5.0
MAX_MESSAGE = 200


def new_nonce() -> str:
    """A run's prompt nonce: prompts are keyed by (seed, nonce, index), so a fresh nonce sends
    prompts no server has seen, from any earlier run, whatever the seed."""
    return uuid.uuid4().hex[:12]


class Loop(enum.Enum):
    OPEN = "open"  # Poisson arrivals at a rate
    CLOSED = "closed"  # a fixed number of users, back to back


class SampleKind(enum.Enum):
    ITERATION = "iteration"  # one whole scenario iteration (e.g. a kvstore fetch)
    RPC = "rpc"  # one call inside it, or a point in one (a stream's first token)


@dataclass(frozen=True)
class LoadSpec:
    """How hard and how long to drive a service; validated so bad flags fail before sending."""

    loop: Loop
    users: int = 1  # closed loop
    rate: float = 0.0  # open loop, iterations per second
    duration_s: float = 30.0
    max_requests: int | None = None
    timeout_s: float = 30.0  # per iteration
    max_in_flight: int = 1024  # open loop
    seed: int = 0
    # The first iteration's index: a sweep's steps continue where the last one stopped, so no
    # two iterations of a run (which key their prompts by index) send the same prompt.
    first_index: int = 0

    def __post_init__(self) -> None:
        if self.loop is Loop.CLOSED and self.users < 1:
            raise ConfigError(f"users must be >= 1, got {self.users}")
        if self.loop is Loop.OPEN and not 0 < self.rate < float("inf"):
            raise ConfigError(f"rate must be a positive number, got {self.rate}")
        if not self.duration_s > 0 or not self.timeout_s > 0:
            raise ConfigError("duration and timeout must be positive")
        if self.max_requests is not None and self.max_requests < 1:
            raise ConfigError(f"max requests must be >= 1, got {self.max_requests}")
        if self.max_in_flight < 1:
            raise ConfigError(f"max in flight must be >= 1, got {self.max_in_flight}")

    @property
    def label(self) -> str:
        return f"{self.users} users" if self.loop is Loop.CLOSED else f"{self.rate:g}/s"

    @property
    def deadline_s(self) -> float:
        return self.duration_s + self.timeout_s + GRACE_S


@dataclass(frozen=True)
class Sample:
    name: str
    kind: SampleKind
    start_s: float  # since the run began
    latency_s: float
    status: str  # OK or a gRPC status name (data-plane errors are mapped to one)
    num_bytes: int = 0
    num_tokens: int = 0
    lag_s: float = 0.0  # iterations, open loop: started this late behind schedule


class ScenarioError(Exception):
    """An answer that is not an RPC error but still wrong (a cache miss where a hit was due, a
    stream without its last frame); ``status`` names it in the report."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def status_of(exc: BaseException) -> str:
    """The status a failed call is counted under: its gRPC status name wherever it has one."""
    if isinstance(exc, ScenarioError):
        return exc.status
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code().name
    if isinstance(exc, DataPlaneError):
        if exc.kind is ErrorKind.REMOTE:
            return exc.code or "UNKNOWN"
        return DEADLINE_EXCEEDED if exc.kind is ErrorKind.TIMEOUT else "UNAVAILABLE"
    code = getattr(exc, "code", None)  # TransferError (str), BanaServeClientError (StatusCode)
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, str) and code:
        return code
    if isinstance(exc, TimeoutError):
        return DEADLINE_EXCEEDED
    if isinstance(exc, asyncio.CancelledError):
        return CANCELLED
    return type(exc).__name__


def message_of(exc: BaseException) -> str:
    """What went wrong, on one line: a gRPC error's details (not its multi-line repr), a
    client error's message (its status is ``status_of``'s), else the exception's text."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        text = exc.details() or ""
    else:
        text = getattr(exc, "message", None) or str(exc)
    return " ".join(text.split()) or type(exc).__name__


@dataclass
class Counts:
    """What a scenario adds to an RPC's sample while it runs."""

    num_bytes: int = 0
    num_tokens: int = 0


@dataclass
class Recorder:
    clock: Callable[[], float] = time.perf_counter
    samples: list[Sample] = field(default_factory=list)
    # The first message seen for each (name, status) that was not OK.
    messages: dict[tuple[str, str], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.t0 = self.clock()

    @contextlib.asynccontextmanager
    async def rpc(self, name: str) -> AsyncIterator[Counts]:
        """Times the block as one call of ``name``; an exception is its status, and re-raised."""
        counts, start, status = Counts(), self.clock(), OK
        try:
            yield counts
        except BaseException as exc:
            status = self.failed(name, exc)
            raise
        finally:
            self.add(name, SampleKind.RPC, start, status, counts.num_bytes, counts.num_tokens)

    def mark(self, name: str, since: float) -> None:
        """A successful point inside a call, timed from ``since`` (e.g. a stream's first token)."""
        self.add(name, SampleKind.RPC, since, OK)

    def failed(self, name: str, exc: BaseException) -> str:
        status = status_of(exc)
        self.messages.setdefault((name, status), message_of(exc)[:MAX_MESSAGE])
        return status

    def add(
        self, name: str, kind: SampleKind, start: float, status: str, num_bytes: int = 0,
        num_tokens: int = 0, lag_s: float = 0.0,
    ) -> None:  # fmt: skip
        sample = Sample(
            name, kind, start - self.t0, self.clock() - start, status, num_bytes, num_tokens, lag_s
        )
        self.samples.append(sample)


class Scenario(Protocol):
    """One service's load test. ``setup`` once, ``server_state`` (the baseline), then
    ``run_one`` per iteration (concurrently), ``server_state`` after each run (the service's
    own counters: the leak check), ``close``."""

    name: str  # the iteration's name in the report
    sample_names: tuple[str, ...]  # every name it records: the iteration's, its RPCs'
    target: str  # HOST:PORT
    grpc_service: str  # the full name of the gRPC service it calls (a hint when it is not there)

    async def setup(self) -> None: ...

    async def run_one(self, index: int, rec: Recorder) -> None: ...

    async def server_state(self) -> dict:
        """The service's counters, with ``held``: a count per thing a run can leave behind
        (``"kvstore-0 pins": 0``); a leak is a count above its value before the run."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class RunResult:
    spec: LoadSpec
    samples: list[Sample]
    messages: dict[tuple[str, str], str]
    wall_s: float
    client_cpu_s: float  # this process's CPU time during the run (driver, clients, any stubs)
    next_index: int = 0  # one past the last index handed out: the next step's first


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a local process, all its threads (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces: split after its closing parenthesis.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Driver:
    def __init__(self, scenario: Scenario, spec: LoadSpec) -> None:
        self.scenario = scenario
        self.spec = spec
        self.rec = Recorder()
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_index = spec.first_index

    async def run(self) -> RunResult:
        cpu, self.rec = cpu_seconds(), Recorder()
        loop = self._open_loop() if self.spec.loop is Loop.OPEN else self._closed_loop()
        try:
            async with asyncio.timeout(self.spec.deadline_s):
                await loop
        except TimeoutError:
            pass  # the run's hard bound: whatever is left is cancelled below
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        wall_s = self.rec.clock() - self.rec.t0
        return RunResult(
            self.spec, self.rec.samples, self.rec.messages, wall_s, cpu_seconds() - cpu,
            self._next_index,
        )  # fmt: skip

    async def _iteration(self, index: int, due_s: float) -> None:
        rec = self.rec
        start, status = rec.clock(), OK
        try:
            async with asyncio.timeout(self.spec.timeout_s):
                await self.scenario.run_one(index, rec)
        except asyncio.CancelledError:
            status = CANCELLED
            raise
        except Exception as exc:  # a failed iteration is a sample, never the end of the run
            status = rec.failed(self.scenario.name, exc)
        finally:
            lag = max(0.0, start - rec.t0 - due_s)
            rec.add(self.scenario.name, SampleKind.ITERATION, start, status, lag_s=lag)

    def _spawn(self, index: int, due_s: float, done: Callable[[], None]) -> None:
        index += self.spec.first_index
        self._next_index = index + 1
        task = asyncio.create_task(self._iteration(index, due_s))
        self._tasks.add(task)

        def finished(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            done()

        task.add_done_callback(finished)

    async def _open_loop(self) -> None:
        spec = self.spec
        times = arrival_times(spec.rate, 1.0, spec.seed, spec.max_requests, spec.duration_s)
        slots = asyncio.Semaphore(spec.max_in_flight)
        for index, due_s in enumerate(times):
            await asyncio.sleep(max(0.0, self.rec.t0 + due_s - self.rec.clock()))
            await slots.acquire()
            self._spawn(index, due_s, slots.release)
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _closed_loop(self) -> None:
        counter = itertools.count()
        end = self.rec.t0 + self.spec.duration_s
        limit = self.spec.max_requests

        async def user() -> None:
            while self.rec.clock() < end:
                index = next(counter)
                if limit is not None and index >= limit:
                    return
                index += self.spec.first_index
                self._next_index = max(self._next_index, index + 1)
                await self._iteration(index, self.rec.clock() - self.rec.t0)

        users = [asyncio.create_task(user()) for _ in range(self.spec.users)]
        self._tasks.update(users)
        await asyncio.gather(*users)


async def warm_up(scenario: Scenario, count: int, timeout_s: float | None = None) -> None:
    """``count`` unrecorded iterations (connections opened, caches filled), each bounded by
    ``timeout_s`` as the load's are; the first failure stops the load test with what went
    wrong, before any load is sent."""
    for i in range(count):
        rec = Recorder()
        try:
            async with asyncio.timeout(timeout_s):
                await scenario.run_one(-1 - i, rec)
        except Exception as exc:
            raise ConfigError(
                f"warm-up iteration failed: {status_of(exc)}: {message_of(exc)}"
            ) from exc


async def run_load(scenario: Scenario, spec: LoadSpec) -> RunResult:
    return await Driver(scenario, spec).run()
