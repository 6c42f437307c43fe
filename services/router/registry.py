"""Worker registry: which workers can serve, and how loaded each one looks right now.

Lifecycle of an entry; only this module changes ``status``:

    register ──► HEALTHY ──(no report for > report_timeout_s, or remove())──► REMOVED
                    ▲                                                            │
                    └───────────────────────── register again ◄─────────────────┘

Load as the router sees it = the worker's last report + what the router assigned to it that
no report counts yet. Each assignment (a request's prompt tokens and KV blocks) stays counted
until a report names the request among those it is the first to count (``LoadReport.admitted``:
the worker admitted it since its previous report), or until ``settle`` (the request ended, or
moved to another worker, before the worker admitted it). A report alone does not clear them: a
worker computing a long prompt admits what it was sent only after that step, and its reports
meanwhile show the load from before — clearing on any report let a burst pile onto the worker
that looked idlest.

Liveness is judged on the router's clock, at receipt. A report's timestamp (the servicer passes
its frame number on the ReportLoad call) is compared only with that worker's earlier reports, to
drop reordered ones.

Invariant: every HEALTHY worker has the same model fingerprint and block size, so a request's
block hashes mean the same on each of them and KV can move between any two.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from services.common.errors import InvalidRequestError, RequestNotFoundError
from services.common.load import LoadReport, utilisation_compute, utilisation_memory

log = logging.getLogger(__name__)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


class WorkerRole(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"  # colocated: prefills and decodes its own requests


class WorkerStatus(enum.Enum):
    HEALTHY = "healthy"
    REMOVED = "removed"


@dataclass(frozen=True)
class WorkerCapacity:
    """What a worker declares once, at registration."""

    num_kv_blocks: int
    block_size: int
    model_fingerprint: str
    # Tokens a sequence may hold here (prompt + output); 0: not declared. A request ends
    # (LENGTH) when it reaches it, whatever its max_tokens.
    max_model_len: int = 0
    # Holds some decoder layers only (``--load-layers``): a migration helper that serves no
    # request of its own; policies never pick it.
    hosts_only: bool = False
    # Sequences it runs at once (its engine's ``max_num_seqs``); 0: not declared.
    max_num_seqs: int = 0

    def __post_init__(self) -> None:
        _check(self.num_kv_blocks > 0, f"num_kv_blocks must be > 0, got {self.num_kv_blocks}")
        _check(self.block_size > 0, f"block_size must be > 0, got {self.block_size}")
        _check(bool(self.model_fingerprint), "model_fingerprint must be non-empty")
        _check(self.max_model_len >= 0, f"max_model_len must be >= 0, got {self.max_model_len}")


@dataclass(frozen=True)
class WorkerInfo:
    """A read-only snapshot of one worker, with the router's current load estimate.

    Policies choose among these and ``ListWorkers`` returns them; neither can change the
    registry through one.
    """

    worker_id: str
    address: str
    role: WorkerRole
    status: WorkerStatus
    capacity: WorkerCapacity
    last_report: LoadReport | None  # None until the first report after registering
    num_queued_tokens: int  # reported + assigned since the report
    num_free_blocks: int  # reported - reserved since the report
    num_used_blocks: int  # reported + reserved since the report
    utilisation_compute: float
    utilisation_memory: float
    seconds_since_seen: float
    removed_reason: str

    @property
    def draining(self) -> bool:
        """Its last report says it is stopping (``LoadReport.draining``): it gets nothing new."""
        return self.last_report is not None and self.last_report.draining

    @property
    def utilisation(self) -> float:
        """DESIGN.md §5: U = max(U_compute, U_memory)."""
        return max(self.utilisation_compute, self.utilisation_memory)


@dataclass
class _Worker:
    worker_id: str
    address: str
    role: WorkerRole
    capacity: WorkerCapacity
    last_seen: float  # router clock
    status: WorkerStatus = WorkerStatus.HEALTHY
    last_report: LoadReport | None = None
    # Assigned, not yet counted by a report: (prompt tokens, KV blocks) by request id.
    inflight: dict[str, tuple[int, int]] = field(default_factory=dict)
    full: bool = False  # refused a reservation; no free block until its next report
    removed_reason: str = ""
    # Kept apart from last_report so a restarted worker's clock may start over.
    last_timestamp: float | None = None


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    _check(
        bool(sep) and bool(host) and port.isdigit() and 0 < int(port) < 65536,
        f"address must be host:port with a port in 1..65535, got {address!r}",
    )


class WorkerRegistry:
    """Owns every worker entry; the router's only source of worker state."""

    def __init__(
        self,
        report_timeout_s: float,
        prefill_capacity_tokens: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._timeout = report_timeout_s
        # Queued prefill tokens that count as a fully busy worker (U_compute = 1).
        self._prefill_capacity = prefill_capacity_tokens
        self._clock = clock
        self._workers: dict[str, _Worker] = {}

    def register(
        self, worker_id: str, address: str, role: WorkerRole, capacity: WorkerCapacity
    ) -> WorkerInfo:
        """Add a worker, or replace one with the same id (a restart): load starts empty."""
        now = self._clock()
        self._expire(now)
        _check(bool(worker_id), "worker_id must be non-empty")
        _check_address(address)
        _check(isinstance(role, WorkerRole), f"role must be a WorkerRole, got {role!r}")
        self._check_same_model(worker_id, capacity)
        again = " again" if worker_id in self._workers else ""
        worker = _Worker(worker_id, address, role, capacity, last_seen=now)
        self._workers[worker_id] = worker
        log.info(
            "worker %s registered%s: %s at %s, %d KV blocks",
            worker_id, again, role.value, address, capacity.num_kv_blocks,
        )  # fmt: skip
        return self._snapshot(worker, now)

    def report(self, worker_id: str, load: LoadReport, timestamp: float) -> bool:
        """Record a load report stamped ``timestamp`` on the worker's clock. False: it is older
        than one already seen, and ignored."""
        now = self._clock()
        self._expire(now)
        worker = self._live(worker_id)
        _check(math.isfinite(timestamp), f"timestamp must be finite, got {timestamp}")
        blocks = load.num_blocks
        _check(
            blocks <= worker.capacity.num_kv_blocks,
            f"worker {worker_id!r} reports {blocks} KV blocks (free + used), "
            f"more than the {worker.capacity.num_kv_blocks} it registered",
        )
        if worker.last_timestamp is not None and timestamp <= worker.last_timestamp:
            return False
        worker.last_seen = now
        worker.last_timestamp = timestamp
        worker.last_report = replace(load, admitted=())
        worker.full = False
        for request_id in load.admitted:
            self._forget(worker, request_id)
        return True

    def remove(self, worker_id: str, reason: str) -> None:
        """Take a worker out now (deregistration, or a call to it failed)."""
        self._expire(self._clock())
        self._remove(self._live(worker_id), reason)

    def expire(self) -> list[str]:
        """Remove every worker silent for longer than the timeout; returns their ids."""
        return self._expire(self._clock())

    def assign(self, worker_id: str, request_id: str, num_tokens: int, num_blocks: int) -> None:
        """Count work the router just sent, until a report names ``request_id`` or ``settle``."""
        worker = self._live(worker_id)
        _check(bool(request_id), "request_id must be non-empty")
        tokens, blocks = worker.inflight.get(request_id, (0, 0))
        worker.inflight[request_id] = (tokens + num_tokens, blocks + num_blocks)

    def settle(self, request_id: str, worker_id: str | None = None) -> None:
        """Stop counting ``request_id``'s assignment to ``worker_id`` (None: to every worker):
        it ended, or went elsewhere, before a report counted it. Unknown ids are ignored."""
        if worker_id is None:
            workers = list(self._workers.values())
        else:
            workers = [self._workers[worker_id]] if worker_id in self._workers else []
        for worker in workers:
            self._forget(worker, request_id)

    def num_inflight(self) -> int:
        """Assignments no report has counted yet, over every worker (a leak check)."""
        return sum(len(w.inflight) for w in self._workers.values())

    def _forget(self, worker: _Worker, request_id: str) -> bool:
        """False: ``worker`` was not counting ``request_id``."""
        return worker.inflight.pop(request_id, None) is not None

    def mark_full(self, worker_id: str) -> None:
        """The worker refused a reservation: count it as having no free block until its next
        report (which is newer than the refusal)."""
        self._live(worker_id).full = True

    def healthy(self) -> list[WorkerInfo]:
        """Snapshots of the HEALTHY workers, sorted by id."""
        now = self._clock()
        self._expire(now)
        return [self._snapshot(w, now) for w in self._healthy_workers()]

    def all(self) -> list[WorkerInfo]:
        """Snapshots of every worker ever registered (REMOVED ones too), sorted by id."""
        now = self._clock()
        self._expire(now)
        return [self._snapshot(w, now) for w in sorted(self._workers.values(), key=_by_id)]

    def _healthy_workers(self) -> list[_Worker]:
        live = (w for w in self._workers.values() if w.status is WorkerStatus.HEALTHY)
        return sorted(live, key=_by_id)

    def _expire(self, now: float) -> list[str]:
        # Strictly longer than the timeout: a report exactly on the deadline still counts.
        expired = [w for w in self._healthy_workers() if now - w.last_seen > self._timeout]
        for worker in expired:
            self._remove(worker, f"no load report for {now - worker.last_seen:.3f} s")
        return [w.worker_id for w in expired]

    def _remove(self, worker: _Worker, reason: str) -> None:
        log.info("worker %s removed: %s", worker.worker_id, reason)
        worker.status = WorkerStatus.REMOVED
        worker.removed_reason = reason
        worker.inflight.clear()
        worker.full = False

    def _live(self, worker_id: str) -> _Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise RequestNotFoundError(f"unknown worker {worker_id!r}; register it first")
        if worker.status is WorkerStatus.REMOVED:
            raise RequestNotFoundError(
                f"worker {worker_id!r} was removed ({worker.removed_reason}); register it again"
            )
        return worker

    def _check_same_model(self, worker_id: str, capacity: WorkerCapacity) -> None:
        others = (w for w in self._healthy_workers() if w.worker_id != worker_id)
        for other in others:
            theirs = other.capacity
            _check(
                theirs.model_fingerprint == capacity.model_fingerprint
                and theirs.block_size == capacity.block_size,
                f"worker {worker_id!r} has model fingerprint {capacity.model_fingerprint!r} "
                f"and block size {capacity.block_size}, but healthy worker "
                f"{other.worker_id!r} has {theirs.model_fingerprint!r} and block size "
                f"{theirs.block_size}; one router serves one model (the same weights and "
                "dtype on every worker)",
            )

    def _snapshot(self, worker: _Worker, now: float) -> WorkerInfo:
        estimate = _estimate(worker)
        return WorkerInfo(
            worker_id=worker.worker_id,
            address=worker.address,
            role=worker.role,
            status=worker.status,
            capacity=worker.capacity,
            last_report=worker.last_report,
            num_queued_tokens=estimate.num_queued_prefill_tokens,
            num_free_blocks=estimate.num_blocks_free,
            num_used_blocks=estimate.num_blocks_used,
            utilisation_compute=utilisation_compute(estimate, self._prefill_capacity),
            utilisation_memory=utilisation_memory(estimate),
            seconds_since_seen=now - worker.last_seen,
            removed_reason=worker.removed_reason,
        )


def _estimate(worker: _Worker) -> LoadReport:
    """The last report (an idle, empty pool before the first) plus what no report counts yet."""
    total = worker.capacity.num_kv_blocks
    report = worker.last_report or LoadReport(0, 0, 0, 0, total, 0.0, 0.0, 0.0)
    tokens = sum(t for t, _ in worker.inflight.values())
    blocks = total if worker.full else sum(b for _, b in worker.inflight.values())
    return replace(
        report,
        num_queued_prefill_tokens=report.num_queued_prefill_tokens + tokens,
        num_blocks_used=min(total, report.num_blocks_used + blocks),
        num_blocks_free=max(0, report.num_blocks_free - blocks),
    )


def _by_id(worker: _Worker) -> str:
    return worker.worker_id
