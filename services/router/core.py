"""The router's logic, without grpc: workers come and go, requests get a worker pair.

Per request (``Router.route``):

1. workers silent for longer than ``report_timeout_s`` are removed (every public call does
   this first, so the answer never depends on when someone last swept);
2. the prompt's block hashes are computed once, with the cluster's fingerprint and block size;
3. decode candidates are the HEALTHY decode/mixed workers whose estimated free KV blocks fit
   prompt + max_tokens, or the decode workers' context (``max_model_len``) if that is shorter:
   a request ends there whatever its max_tokens; none → ``ResourceExhaustedError``. Blocks
   that older requests waiting for room need are held for them (first come, first served: a
   large request is not passed over for ever by smaller ones that keep arriving). A worker
   whose last report says it is draining (stopping: it finishes what it has) is no candidate
   here or in 4;
4. prefill candidates are the HEALTHY prefill workers, plus the mixed workers that fit (a mixed
   worker decodes what it prefills); the policy picks one. None (the prefill worker is
   restarting) → ``NoWorkerError``, unless the request ``decode_may_prefill``: then the decode
   candidate with the most free blocks prefills it too (``Assignment.prefill_on_decode``);
5. decode worker = the prefill worker if it is mixed (colocated), else the candidate with the
   most free blocks;
6. the assignment is counted against both workers' load estimates at once, and stays counted
   until a worker's report says it admitted the request (or ``settle``: the request ended, or
   went elsewhere, first), so a burst arriving before the workers report it spreads out instead
   of piling onto the worker that looked idlest. Routing a request again replaces its
   assignment.

Policy ``colocated`` is the vLLM-style baseline of DESIGN.md §1: mixed workers only, each request
prefilled and decoded on one worker, chosen by prefix affinity. Any other policy over a cluster of
mixed workers is colocated too, just chosen differently.

Not thread-safe: the servicer calls it from one event loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.common.errors import (
    ConfigError,
    InvalidRequestError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from services.common.hashing import block_hashes
from services.common.load import LoadReport
from services.router.policies import (
    LoadPolicy,
    PrefillPolicy,
    PrefixAffinityPolicy,
    RequestView,
    RoundRobinPolicy,
    most_free_blocks,
)
from services.router.registry import (
    WorkerCapacity,
    WorkerInfo,
    WorkerRegistry,
    WorkerRole,
    WorkerStatus,
)
from services.router.waiting import WaitingRoom

POLICIES = ("load", "round_robin", "prefix_affinity", "colocated")


class NoWorkerError(ResourceExhaustedError):
    """No healthy worker of a role the request needs (as opposed to workers without room)."""


class NoRoomNowError(ResourceExhaustedError):
    """Every worker that could hold the request is full right now, but one could hold it once
    running requests end: the driver waits (until the deadline) instead of failing.
    ``worker_ids``: those workers (their pools hold the request in total); ``num_blocks``: the
    request's need."""

    def __init__(self, message: str, worker_ids: tuple[str, ...] = (), num_blocks: int = 0) -> None:
        super().__init__(message)
        self.worker_ids = worker_ids
        self.num_blocks = num_blocks


# A request waiting for room is routed again every ``admission_poll_s`` (50 ms) until it gets
# a worker or its deadline: one not tried for this long waits no more (its caller gave up).
WAITING_FOR_ROOM_TTL_S = 1.0


def require_config(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "load"
    # Ten missed reports at the ~100 ms cadence.
    report_timeout_s: float = 1.0
    # Entries (block hashes) in prefix_affinity's LRU map; 64 Ki blocks of 16 tokens ≈ 1 M tokens.
    affinity_capacity: int = 1 << 16
    # Queued prefill tokens that make U_compute = 1: two full steps at the engine's default
    # token budget (2 x 2048), i.e. a new prompt would wait about two steps.
    prefill_capacity_tokens: int = 4096

    def __post_init__(self) -> None:
        require_config(
            self.policy in POLICIES, f"policy must be one of {POLICIES}, got {self.policy!r}"
        )
        require_config(
            math.isfinite(self.report_timeout_s) and self.report_timeout_s > 0,
            f"report_timeout_s must be positive, got {self.report_timeout_s}",
        )
        require_config(
            self.affinity_capacity > 0,
            f"affinity_capacity must be positive, got {self.affinity_capacity}",
        )
        require_config(
            self.prefill_capacity_tokens > 0,
            f"prefill_capacity_tokens must be positive, got {self.prefill_capacity_tokens}",
        )


def check_request(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


@dataclass(frozen=True)
class RouteRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    # A resumed request (its worker was lost after its first token): the prompt is the
    # original one and the tokens the client has; one decode-capable worker prefills and
    # decodes it, whatever the mode, so no prefill worker is needed.
    decode_only: bool = False
    # While no prefill worker is healthy (one restarting), a decode worker may prefill the
    # prompt itself (the router's queue rule is on: an absent prefill worker is an endless
    # queue) instead of the request waiting for one.
    decode_may_prefill: bool = False

    def __post_init__(self) -> None:
        check_request(bool(self.request_id), "request_id must be non-empty")
        check_request(len(self.prompt_token_ids) > 0, "prompt must have at least one token")
        check_request(all(t >= 0 for t in self.prompt_token_ids), "prompt token ids must be >= 0")
        check_request(self.max_tokens > 0, f"max_tokens must be > 0, got {self.max_tokens}")


@dataclass(frozen=True)
class Assignment:
    """Where one request runs. Worker snapshots are from just before this assignment."""

    request_id: str
    prefill: WorkerInfo
    decode: WorkerInfo
    num_kv_blocks: int  # blocks to reserve on the decode worker
    # A decode worker prefills it (no prefill worker was healthy: decode_may_prefill), as in
    # the router's queue rule: not a mixed worker's local prefill.
    prefill_on_decode: bool = False

    @property
    def colocated(self) -> bool:
        return self.prefill.worker_id == self.decode.worker_id


def make_policy(config: RouterConfig) -> PrefillPolicy:
    if config.policy == "load":
        return LoadPolicy()
    if config.policy == "round_robin":
        return RoundRobinPolicy()
    return PrefixAffinityPolicy(config.affinity_capacity)  # prefix_affinity, colocated


class Router:
    """Registry + policy. The servicer translates RPCs into these calls and nothing more."""

    def __init__(
        self, config: RouterConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or RouterConfig()
        self._registry = WorkerRegistry(
            self.config.report_timeout_s, self.config.prefill_capacity_tokens, clock
        )
        self._policy = make_policy(self.config)
        self._colocated = self.config.policy == "colocated"
        self._clock = clock
        self._waiting = WaitingRoom(WAITING_FOR_ROOM_TTL_S)  # requests waiting for room

    def register(
        self, worker_id: str, address: str, role: WorkerRole, capacity: WorkerCapacity
    ) -> WorkerInfo:
        return self._registry.register(worker_id, address, role, capacity)

    def report(self, worker_id: str, load: LoadReport, timestamp: float) -> bool:
        """False: the report is older (``timestamp``) than one already seen and was ignored."""
        return self._registry.report(worker_id, load, timestamp)

    def mark_full(self, worker_id: str) -> None:
        """A worker refused a reservation the estimate allowed: no room there until it reports."""
        with contextlib.suppress(RequestNotFoundError):  # removed meanwhile
            self._registry.mark_full(worker_id)

    def remove(self, worker_id: str, reason: str) -> None:
        self._registry.remove(worker_id, reason)

    def settle(self, request_id: str, worker_id: str | None = None) -> None:
        """The request ended (or, with ``worker_id``, will not run there): stop counting its
        assignment against the load of that worker (None: of both) where no report did yet."""
        self._registry.settle(request_id, worker_id)
        if worker_id is None:
            self._waiting.leave(request_id)

    def waiting_for_room(self, worker_id: str) -> int:
        """Requests held because no worker had room for them now, that this worker could hold
        once its running requests end (its pool holds them in total): its KV is what they wait
        for (``utilisation_memory``). Counted until routed, settled, or not tried again for
        ``WAITING_FOR_ROOM_TTL_S``."""
        self._waiting.forget(self._clock())
        return self._waiting.count(worker_id)

    def num_waiting_for_room(self) -> int:
        """Requests held now because no worker had room for them (``waiting_for_room``)."""
        self._waiting.forget(self._clock())
        return len(self._waiting)

    def _held(self, request_id: str, now: float) -> dict[str, int]:
        """Blocks per worker held for the requests that began waiting for room before
        ``request_id`` did (before now, if it is not waiting): first come, first served."""
        self._waiting.forget(now)
        return self._waiting.held_ahead_of(request_id, now)

    def num_inflight(self) -> int:
        """Assignments still counted without a report, over all workers (0 when idle)."""
        return self._registry.num_inflight()

    def expire(self) -> list[str]:
        """Ids of workers just removed for missing reports; for a periodic sweep and logs."""
        return self._registry.expire()

    def sequence_capacity(self) -> int:
        """Sequences the workers that decode requests can run at once: the sum of the
        ``max_num_seqs`` the registered (not removed, not draining) decode and mixed workers
        declared."""
        roles = (WorkerRole.DECODE, WorkerRole.MIXED)
        return sum(
            w.capacity.max_num_seqs
            for w in self._registry.all()
            if w.status is not WorkerStatus.REMOVED
            and w.role in roles
            and not w.capacity.hosts_only
            and not w.draining
        )

    def workers(self) -> list[WorkerInfo]:
        """Every worker ever registered, REMOVED ones included, sorted by id."""
        return self._registry.all()

    def route(self, request: RouteRequest) -> Assignment:
        """The request's workers; ``NoRoomNowError`` while none has room for it now (or only
        room that older requests waiting for room need: ``_held``)."""
        now = self._clock()
        # A resumed request (decode_only) already had tokens: it is not held back.
        held = {} if request.decode_only else self._held(request.request_id, now)
        try:
            assignment = self._route(request, held)
        except NoRoomNowError as e:
            self._waiting.wait(request.request_id, now, e.worker_ids, e.num_blocks)
            self._waiting.forget(now)
            raise
        self._waiting.leave(request.request_id)
        return assignment

    def _route(self, request: RouteRequest, held: dict[str, int]) -> Assignment:
        self._registry.settle(request.request_id)  # a second try replaces the first
        # A draining worker finishes what it has and takes nothing new (LoadReport.draining).
        healthy = [w for w in self._registry.healthy() if not w.draining]
        view = _view(request, healthy)
        if request.decode_only:
            prefill = decode = most_free_blocks(self._decoders(healthy, view, held))
        else:
            try:
                prefills, decoders = self._candidates(healthy, view, held)
            except NoWorkerError:
                if not request.decode_may_prefill:
                    raise
                # No prefill-capable worker now: the decode worker prefills it (Attempt).
                decode = most_free_blocks(self._decoders(healthy, view, held))
                self._record(decode, decode, view)
                return Assignment(request.request_id, decode, decode, view.num_kv_blocks, True)
            else:
                prefill = self._policy.choose(prefills, view)
                mixed = prefill.role is WorkerRole.MIXED
                decode = prefill if mixed else most_free_blocks(decoders)
        self._record(prefill, decode, view)
        return Assignment(request.request_id, prefill, decode, view.num_kv_blocks)

    def _candidates(
        self, healthy: Sequence[WorkerInfo], view: RequestView, held: dict[str, int]
    ) -> tuple[list[WorkerInfo], list[WorkerInfo]]:
        """(prefill candidates, decode candidates that fit), both non-empty, or raise."""
        if self._colocated:
            prefill_roles = {WorkerRole.MIXED}
        else:
            prefill_roles = {WorkerRole.PREFILL, WorkerRole.MIXED}
        prefill_capable = self._with_role(healthy, prefill_roles, "prefill", view)
        fits = self._decoders(healthy, view, held)
        # A mixed worker keeps what it prefills, so it must fit itself; a prefill worker
        # hands off to one of ``fits``.
        prefills = [w for w in prefill_capable if w.role is WorkerRole.PREFILL or w in fits]
        if not prefills:
            raise _no_room(
                view, prefill_capable, _names(prefill_roles - {WorkerRole.PREFILL}), held
            )
        return prefills, fits

    def _decoders(
        self, healthy: Sequence[WorkerInfo], view: RequestView, held: dict[str, int]
    ) -> list[WorkerInfo]:
        """The decode candidates that fit the request, beside the blocks ``held`` for older
        requests waiting for room, non-empty, or raise."""
        roles = {WorkerRole.MIXED} if self._colocated else {WorkerRole.DECODE, WorkerRole.MIXED}
        decoders = self._with_role(healthy, roles, "decode", view)
        fits = [w for w in decoders if _free(w, held) >= view.num_kv_blocks]
        if not fits:
            raise _no_room(view, decoders, _names(roles), held)
        return fits

    def _with_role(
        self, healthy: Sequence[WorkerInfo], roles: set[WorkerRole], job: str, view: RequestView
    ) -> list[WorkerInfo]:
        workers = [w for w in healthy if w.role in roles and not w.capacity.hosts_only]
        if not workers:
            raise NoWorkerError(
                f"no healthy {_names(roles)} worker to {job} request {view.request_id!r} "
                f"(policy {self.config.policy!r})"
            )
        return workers

    def _record(self, prefill: WorkerInfo, decode: WorkerInfo, view: RequestView) -> None:
        assign, request_id = self._registry.assign, view.request_id
        if prefill.worker_id == decode.worker_id:
            assign(prefill.worker_id, request_id, view.num_prompt_tokens, view.num_kv_blocks)
            return
        assign(prefill.worker_id, request_id, view.num_prompt_tokens, 0)
        assign(decode.worker_id, request_id, 0, view.num_kv_blocks)


def _view(request: RouteRequest, healthy: Sequence[WorkerInfo]) -> RequestView:
    if not healthy:
        raise NoWorkerError(
            f"no healthy worker is registered to serve request {request.request_id!r}"
        )
    # Every healthy worker has the same fingerprint and block size (registry invariant).
    capacity = healthy[0].capacity
    num_tokens = len(request.prompt_token_ids) + request.max_tokens
    # The workers that would hold the sequence to its end: a prefill worker hands it off.
    holders = [w for w in healthy if w.role is not WorkerRole.PREFILL] or healthy
    contexts = [w.capacity.max_model_len for w in holders]
    if all(contexts):  # every one declared its context: none holds more than the largest
        num_tokens = min(num_tokens, max(contexts))
    return RequestView(
        request_id=request.request_id,
        num_prompt_tokens=len(request.prompt_token_ids),
        max_tokens=request.max_tokens,
        block_hashes=tuple(
            block_hashes(request.prompt_token_ids, capacity.block_size, capacity.model_fingerprint)
        ),
        num_kv_blocks=-(-num_tokens // capacity.block_size),
    )


def _free(worker: WorkerInfo, held: dict[str, int]) -> int:
    return worker.num_free_blocks - held.get(worker.worker_id, 0)


def _no_room(
    view: RequestView, workers: Sequence[WorkerInfo], kind: str, held: dict[str, int]
) -> ResourceExhaustedError:
    need = (
        f"request {view.request_id!r} needs {view.num_kv_blocks} KV blocks "
        f"({view.num_prompt_tokens} prompt + {view.max_tokens} max_tokens tokens)"
    )
    largest = max(w.capacity.num_kv_blocks for w in workers)
    if view.num_kv_blocks > largest:
        return ResourceExhaustedError(
            f"{need}, more than any {kind} worker holds in total (largest: {largest})"
        )
    most = max(workers, key=lambda w: (_free(w, held), w.num_free_blocks))
    free = f"the most free on any {kind} worker now is {most.num_free_blocks}"
    if held.get(most.worker_id):
        free += f" ({held[most.worker_id]} held for older requests waiting for room)"
    return NoRoomNowError(
        f"{need}; {free}",
        tuple(w.worker_id for w in workers if w.capacity.num_kv_blocks >= view.num_kv_blocks),
        view.num_kv_blocks,
    )


def _names(roles: set[WorkerRole]) -> str:
    return " or ".join(sorted(r.value for r in roles))
