"""Admission control: bounded work per server, a bounded wait queue, per-client caps (no grpc:
``services/rpc/admission.py`` applies it to servers, with the flags and the client identity).

Lifecycle of a call on a server with admission (``AdmissionInterceptor``, or the router's HTTP
API through ``AdmissionController.admit``):
  1. CLASSIFIED - by method (``classify``): WORK starts new work (``Generate``, ``Prefill``,
                  ``ReserveKV``, the kvstore's ``Lookup``/``Pin``/``Reserve``); STREAM carries a
                  request already admitted (``TransferKV``, ``StreamTokens``, ``Commit``);
                  EXEMPT is never shed and never waits (health, reflection, releases, aborts,
                  stats, load reports, ``ListWorkers``, any method not listed here), so a loaded
                  server can always be watched and freed;
  2. ADMITTED   - at once when its class has a free slot and its client is under its cap;
     QUEUED     - else, when the class's queue has room and the client is under its cap;
     SHED       - else, at once: RESOURCE_EXHAUSTED (HTTP 429 for a client over its cap, 503
                  for a full server) with a ``retry-after`` in seconds;
  3. a queued call waits at most ``max_wait_s`` (less if its own deadline is sooner), then is
     SHED; a slot that frees goes to the waiter whose client holds the fewest slots of the class,
     the longest waiting among equals (the fair-share rule, below);
  4. RELEASED   - the slot is held until the call ends: a unary handler returns or raises, a
     stream sends its last message, fails or is cancelled. ``Ticket.release`` is idempotent and
     a waiter cancelled after its grant gives the slot back, so no path leaks one.

Fair share: a client holds at most ``max_per_client`` slots of a class, in flight and queued
together (default: three quarters of ``max_in_flight``, so a quarter always stays for the other
clients), and among waiters the client holding the fewest goes first; ``trusted_clients`` are
exempt from the per-client caps (not from the class limits). Who a client is comes from
``services.rpc.admission.client_identity``: the authenticated identity where the server
authenticates callers (mTLS), else the ``x-banaserve-client`` metadata value, else the peer
address (one per gRPC connection; an HTTP client's host, ``openai_errors.http_client_identity``). Without authentication the identity is the caller's word: it
bounds a client that does not try to hide, not one that opens connections under many names.

Holding a slot after the call (a decode worker's reservation outlives ``ReserveKV``) is
``HoldQuota``'s job: a per-client cap on what stays held until the holder's request ends.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import REASON_MARGIN_S, ConfigError, ResourceExhaustedError

CLIENT_METADATA_KEY = "x-banaserve-client"
MAX_CLIENT_NAME = 128


class MethodClass(enum.Enum):
    EXEMPT = "exempt"
    WORK = "work"
    STREAM = "stream"


class Outcome(enum.Enum):
    ADMITTED = "admitted"
    QUEUED = "queued"
    SHED_CLIENT_LIMIT = "shed_client_limit"  # this client holds its share: HTTP 429
    SHED_QUEUE_FULL = "shed_queue_full"  # the server is full: HTTP 503
    SHED_WAIT_TIMEOUT = "shed_wait_timeout"  # queued, no slot came in time: HTTP 503


def fair_share(capacity: int) -> int:
    """The default per-client cap: three quarters of ``capacity`` (at least 1)."""
    return max(1, capacity - max(1, capacity // 4)) if capacity > 1 else 1


@dataclass(frozen=True)
class ClassLimits:
    max_in_flight: int
    max_queued: int = 0
    max_wait_s: float = 1.0
    max_per_client: int = 0  # 0: max_in_flight + max_queued (no per-client cap)

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be at least 1, got {self.max_in_flight}")
        if self.max_queued < 0 or self.max_per_client < 0:
            raise ConfigError("max_queued and max_per_client must not be negative")
        if not (math.isfinite(self.max_wait_s) and self.max_wait_s >= 0):
            raise ConfigError(f"max_wait_s must be finite and >= 0, got {self.max_wait_s}")

    @property
    def per_client(self) -> int:
        return self.max_per_client or self.max_in_flight + self.max_queued

    @classmethod
    def for_capacity(cls, capacity: int, max_wait_s: float = 1.0) -> ClassLimits:
        """``capacity`` in flight, as many queued, a fair share per client."""
        return cls(capacity, capacity, max_wait_s, fair_share(capacity))


# The request-starting and request-continuing methods of BanaServe's services; every other
# method (health, reflection, releases, lease renewals, stats, load reports, later services') is
# EXEMPT.
WORK_METHODS = frozenset(
    {
        "/banaserve.v1.RouterService/Generate",
        "/banaserve.v1.PrefillService/Prefill",
        "/banaserve.v1.DecodeService/ReserveKV",
        "/banaserve.v1.KVStoreService/Lookup",
        "/banaserve.v1.KVStoreService/Pin",
        "/banaserve.v1.KVStoreService/Reserve",
    }
)
STREAM_METHODS = frozenset(
    {
        "/banaserve.v1.DecodeService/TransferKV",
        "/banaserve.v1.DecodeService/StreamTokens",
        "/banaserve.v1.KVStoreService/Commit",
    }
)


@dataclass(frozen=True)
class AdmissionConfig:
    """Limits per method class; ``retry_after_s`` is what a shed caller is told to wait."""

    work: ClassLimits
    stream: ClassLimits
    retry_after_s: float = 1.0
    enabled: bool = True
    # Identities exempt from the per-client caps (not from the class limits): a service's
    # legitimate sole caller once it is authenticated (``role:router`` under mTLS).
    trusted_clients: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.retry_after_s) and self.retry_after_s >= 0):
            raise ConfigError(f"retry_after_s must be finite and >= 0, got {self.retry_after_s}")

    @classmethod
    def for_capacity(cls, capacity: int, max_wait_s: float = 1.0) -> AdmissionConfig:
        """WORK: ``capacity`` in flight (the worker's own bound, e.g. decode ``max_num_seqs``),
        as many queued, a fair share each. STREAM: only what admitted work can open (two
        streams per request, no queue, no per-client cap: the WORK cap already bounds it)."""
        stream = ClassLimits(4 * capacity, 0, 0.0)
        return cls(ClassLimits.for_capacity(capacity, max_wait_s), stream)


class OverloadedError(ResourceExhaustedError):
    """A call shed by admission control (RESOURCE_EXHAUSTED)."""

    def __init__(self, outcome: Outcome, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.retry_after_s = retry_after_s


@dataclass
class ClassStats:
    num_in_flight: int = 0
    num_queued: int = 0
    peak_in_flight: int = 0
    peak_queued: int = 0
    num_admitted: int = 0  # at once or after a wait
    num_waited: int = 0  # of those, after a wait
    num_shed: collections.Counter[Outcome] = field(default_factory=collections.Counter)


class Ticket:
    """One admitted call's slot; ``release`` gives it back (once, however often it is called)."""

    def __init__(self, gate: _Gate, client: str) -> None:
        self._gate = gate
        self.client = client
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._gate.give_back(self.client)


@dataclass
class _Waiter:
    client: str
    seq: int
    future: asyncio.Future[Ticket]


class _Gate:
    """One method class's slots, queue and per-client counts."""

    def __init__(
        self, name: MethodClass, limits: ClassLimits, trusted: frozenset[str] = frozenset()
    ) -> None:
        self.name = name
        self.limits = limits
        self.trusted = trusted
        self.held: collections.Counter[str] = collections.Counter()  # in flight + queued
        self.waiters: list[_Waiter] = []
        self.stats = ClassStats()
        self._seq = itertools.count()

    def offer(self, client: str) -> Outcome:
        """The decision for a call arriving now (nothing changes: ``take``/``enqueue`` do)."""
        if self.held[client] >= self.limits.per_client and client not in self.trusted:
            return Outcome.SHED_CLIENT_LIMIT
        if self.stats.num_in_flight < self.limits.max_in_flight:
            return Outcome.ADMITTED
        if len(self.waiters) >= self.limits.max_queued:
            return Outcome.SHED_QUEUE_FULL
        return Outcome.QUEUED

    def take(self, client: str) -> Ticket:
        self.held[client] += 1
        s = self.stats
        s.num_in_flight += 1
        s.num_admitted += 1
        s.peak_in_flight = max(s.peak_in_flight, s.num_in_flight)
        return Ticket(self, client)

    def enqueue(self, client: str) -> _Waiter:
        waiter = _Waiter(client, next(self._seq), asyncio.get_running_loop().create_future())
        self.waiters.append(waiter)
        self.held[client] += 1
        self.stats.num_queued += 1
        self.stats.peak_queued = max(self.stats.peak_queued, self.stats.num_queued)
        return waiter

    def forget(self, waiter: _Waiter) -> None:
        """A waiter that stops waiting before its grant."""
        self.waiters.remove(waiter)
        self.stats.num_queued -= 1
        self._drop(waiter.client)

    def give_back(self, client: str) -> None:
        self.stats.num_in_flight -= 1
        self._drop(client)
        self.dispatch()

    def _drop(self, client: str) -> None:
        self.held[client] -= 1
        if self.held[client] <= 0:
            del self.held[client]

    def dispatch(self) -> None:
        while self.waiters and self.stats.num_in_flight < self.limits.max_in_flight:
            # Fair share: the client holding the fewest slots now, then the longest waiting.
            waiter = min(self.waiters, key=lambda w: (self.held[w.client], w.seq))
            self.waiters.remove(waiter)
            self.stats.num_queued -= 1
            self.held[waiter.client] -= 1  # ``take`` counts it again
            ticket = self.take(waiter.client)
            self.stats.num_waited += 1
            waiter.future.set_result(ticket)


class AdmissionController:
    """The gates of one server (or of the router's gRPC and HTTP APIs together). Event-loop
    only: every method runs on the loop that serves the calls."""

    def __init__(self, config: AdmissionConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._gates = {
            MethodClass.WORK: _Gate(MethodClass.WORK, config.work, config.trusted_clients),
            MethodClass.STREAM: _Gate(MethodClass.STREAM, config.stream, config.trusted_clients),
        }

    @staticmethod
    def classify(method: str) -> MethodClass:
        if method in WORK_METHODS:
            return MethodClass.WORK
        if method in STREAM_METHODS:
            return MethodClass.STREAM
        return MethodClass.EXEMPT

    def offer(self, method_class: MethodClass, client: str) -> Outcome:
        return self._gates[method_class].offer(client)

    def reconfigure(self, config: AdmissionConfig) -> None:
        """New limits for both classes (a capacity that follows the cluster's): what is in
        flight stays; grown slots go to waiters at once, shrunk ones as calls end."""
        self.config = config
        for method_class, limits in ((MethodClass.WORK, config.work),
                                     (MethodClass.STREAM, config.stream)):  # fmt: skip
            gate = self._gates[method_class]
            gate.limits, gate.trusted = limits, config.trusted_clients
            gate.dispatch()

    def stats(self, method_class: MethodClass) -> ClassStats:
        return self._gates[method_class].stats

    def holders(self, method_class: MethodClass) -> dict[str, int]:
        """Slots held (in flight and queued) per client: empty when nothing is."""
        return dict(self._gates[method_class].held)

    async def admit(
        self, method_class: MethodClass, client: str, timeout_s: float | None = None
    ) -> Ticket:
        """A ticket for the call, or ``OverloadedError`` (at once, or after at most
        ``max_wait_s`` queued; ``timeout_s``, the call's own time left, can shorten the wait,
        which then ends ``REASON_MARGIN_S`` before it: the shed is told, not a deadline)."""
        gate = self._gates[method_class]
        outcome = gate.offer(client) if self.config.enabled else Outcome.ADMITTED
        if outcome is Outcome.ADMITTED:
            return gate.take(client)
        if outcome is not Outcome.QUEUED:
            raise self._shed(gate, outcome, client)
        wait_s = gate.limits.max_wait_s
        if timeout_s is not None:  # shed (RESOURCE_EXHAUSTED, retry-after) before the deadline
            wait_s = max(0.0, min(wait_s, timeout_s - REASON_MARGIN_S))
        waiter = gate.enqueue(client)
        granted = False
        try:
            await asyncio.wait({waiter.future}, timeout=wait_s)
            granted = waiter.future.done()
        finally:
            if not waiter.future.done():
                gate.forget(waiter)
                waiter.future.cancel()
            elif not granted:  # cancelled just after the grant: hand the slot on
                waiter.future.result().release()
        if not granted:
            raise self._shed(gate, Outcome.SHED_WAIT_TIMEOUT, client)
        return waiter.future.result()

    def _shed(self, gate: _Gate, outcome: Outcome, client: str) -> OverloadedError:
        gate.stats.num_shed[outcome] += 1
        limits = gate.limits
        why = {
            Outcome.SHED_CLIENT_LIMIT: f"client {client!r} holds its share "
            f"({limits.per_client} {gate.name.value} calls in flight or queued)",
            Outcome.SHED_QUEUE_FULL: f"overloaded: {limits.max_in_flight} {gate.name.value} "
            f"calls in flight and {limits.max_queued} queued",
            Outcome.SHED_WAIT_TIMEOUT: f"overloaded: no {gate.name.value} slot freed within "
            f"{limits.max_wait_s:g}s",
        }[outcome]
        return OverloadedError(outcome, why, self.config.retry_after_s)


class HoldQuota:
    """Per-client caps on what a call leaves held after it returns (a decode worker's
    reservations: ``ReserveKV`` returns, the sequence slot stays until the request ends).

    ``take(client)`` before creating the held thing (``OverloadedError`` if ``client`` holds
    ``max_per_client`` already); the ``Hold`` it returns is dropped once the thing is gone
    (``Hold.drop`` is idempotent).
    """

    def __init__(
        self,
        max_per_client: int,
        retry_after_s: float = 1.0,
        trusted_clients: frozenset[str] = frozenset(),
    ) -> None:
        if max_per_client < 1:
            raise ConfigError(f"max_per_client must be at least 1, got {max_per_client}")
        self.max_per_client = max_per_client
        self.trusted_clients = trusted_clients
        self.retry_after_s = retry_after_s
        self._counts: collections.Counter[str] = collections.Counter()

    def take(self, client: str) -> Hold:
        if self._counts[client] >= self.max_per_client and client not in self.trusted_clients:
            raise OverloadedError(
                Outcome.SHED_CLIENT_LIMIT,
                f"client {client!r} holds {self._counts[client]} reservations here, its share "
                f"(at most {self.max_per_client} per client)",
                self.retry_after_s,
            )
        self._counts[client] += 1
        return Hold(self, client)

    def _drop(self, client: str) -> None:
        self._counts[client] -= 1
        if self._counts[client] <= 0:
            del self._counts[client]

    def held(self) -> dict[str, int]:
        return dict(self._counts)


class Hold:
    def __init__(self, quota: HoldQuota, client: str) -> None:
        self._quota = quota
        self.client = client
        self.dropped = False

    def drop(self) -> None:
        if not self.dropped:
            self.dropped = True
            self._quota._drop(self.client)
