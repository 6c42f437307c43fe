"""The request driver's vocabulary (services/router/driver.py): what a request is, the events
it yields, what the worker clients promise, and the driver's config (no grpc)."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import AlreadyExistsError, BanaServeError, ErrorCode
from services.common.types import FinishReason, SamplingParams
from services.router.core import require_config
from services.router.registry import WorkerInfo
from services.rpc.deadlines import MAX_DEADLINE_S


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
        """The worker is gone or going: UNAVAILABLE, or CANCELLED, which a worker's server sends
        only while it shuts down (the router's own cancellation is ``asyncio.CancelledError``,
        never this), as the gRPC data plane also reads it (services/rpc/dataplane/grpc_plane.py)."""
        return self.code in (ErrorCode.UNAVAILABLE, ErrorCode.CANCELLED)

    @property
    def worker_failed(self) -> bool:
        """The worker is lost, or the engine step computing the request failed there (INTERNAL:
        it freed the request and serves on): the request may go on elsewhere."""
        return self.lost or self.code is ErrorCode.INTERNAL


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
    num_cached_blocks: int = 0  # the prompt's leading blocks D holds already: KV starts there
    prefilling_locally: bool = False  # D prefills the prompt itself: no prefill worker, no KV
    lease_s: float = 0.0  # as granted; the attempt renews it while P has the prompt


@dataclass(frozen=True)
class KVTarget:
    worker_id: str
    address: str
    reservation_id: str
    data_address: str = ""
    data_transport: str = ""
    first_block: int = 0


@dataclass(frozen=True)
class GenerateInput:
    request_id: str  # "" → the driver assigns one
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    # Who may abort it: the caller's identity (services.rpc.security.caller_identity).
    owner: str = ""
    # Tokens the caller has already had from a worker that was lost: a resumed try goes on
    # from them (the driver sets it; the decode worker's ReserveKV resume_output_token_ids).
    resume_output_token_ids: tuple[int, ...] = ()
    # The caller sends again a request whose stream broke on its side (GenerateRequest.resume,
    # or resume tokens): one aborted meanwhile ends aborted (RequestDriver.abort).
    resend: bool = False


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
    # The worker that decoded its last tokens: another than ``Started``'s after a resume
    # ("" if none did: it was lost after its last token, or aborted).
    decode_worker_id: str = ""


Event = Started | Delta | Finished


class Outcome(enum.StrEnum):
    """How a request ended, as ``RequestObserver.ended`` is told (the ``outcome`` label of
    ``banaserve_router_requests_total``): exactly one per request the driver was given."""

    STOP = "stop"  # finished: EOS, a stop token or string
    LENGTH = "length"  # finished: max_tokens or the context
    ABORT = "abort"  # ``RequestDriver.abort`` (the Abort RPC)
    CANCELLED = "cancelled"  # its caller went away: a gRPC cancel, an HTTP client disconnecting
    ERROR = "error"  # failed once accepted: deadline, no worker, worker lost, drain...
    REFUSED = "refused"  # refused before any work (``RequestDriver.refused``)

    @classmethod
    def of(cls, reason: FinishReason) -> Outcome:
        return cls(reason.value)


class RequestObserver(Protocol):
    """Told by the driver, on its event loop, how each request ended."""

    def ended(self, outcome: Outcome, event: Finished | None) -> None:
        """Once per request. ``event``: what this call did (None for a refused one): the
        tokens it delivered (``num_completion_tokens``: not those its client resumed from,
        which the call that delivered them counted), its timings (``ttft_s`` 0.0: no token
        reached the caller), KV moved, however it ended."""

    def resumed(self) -> None:
        """A request lost its worker after its first token and goes on on another."""

    def superseded(self, num_completion_tokens: int) -> None:
        """A call its client sent again (a broken stream resumed) ended having delivered
        these tokens; the request goes on in the new call, whose ``ended`` tells its outcome."""


class DecodeClient(Protocol):
    """The router's calls to one decode (or mixed) worker; failures raise ``WorkerCallError``."""

    async def reserve(
        self,
        request: GenerateInput,
        lease_s: float,
        timeout_s: float,
        prefill_locally: bool = False,
        local_prefill_max_tokens: int = 0,
    ) -> Reservation: ...

    def stream_tokens(
        self, request_id: str, timeout_s: float
    ) -> AsyncIterator[Delta | DecodeResult]: ...

    async def release(self, request_id: str, reason: ReleaseReason, timeout_s: float) -> None: ...

    async def renew(
        self, request_id: str, reservation_id: str, lease_s: float, timeout_s: float
    ) -> float:
        """Extends the reservation's lease; the lease left (0.0: the sequence runs)."""


class PrefillClient(Protocol):
    """The router's call to one prefill (or mixed) worker: a first-token Delta, then a result."""

    def prefill(
        self, request: GenerateInput, target: KVTarget, timeout_s: float
    ) -> AsyncIterator[Delta | PrefillResult]: ...


class WorkerClients(Protocol):
    def decode(self, worker: WorkerInfo) -> DecodeClient: ...

    def prefill(self, worker: WorkerInfo) -> PrefillClient: ...

    def refresh(self, address: str) -> None:
        """A worker (re-)registered at ``address``: the next call must not fail on a
        connection that broke before (a restarted worker)."""


@dataclass(frozen=True)
class DriverConfig:
    # How long D holds a reservation for a transfer that has not ended (capped by the deadline)
    # without hearing from this router: renewed every third of it while P has the prompt
    # (``Attempt._renew_lease``), so it bounds how long a lost router's reservation stays, not
    # how long a prompt may queue and compute.
    lease_s: float = 30.0
    # The deadline of a request whose call has none: every wait stays bounded.
    default_timeout_s: float = 600.0
    # Bound on the cleanup call after abort, cancel or failure.
    release_timeout_s: float = 2.0
    # How long a request whose id a running request holds waits for that one to end before it
    # gets ALREADY_EXISTS (capped by its deadline): a client that reuses the id of a request it
    # gave up on (its own timer, a cancel) may be here before that request's cancellation, as
    # the workers wait (DecodeConfig.id_reuse_wait_s); 0 refuses at once.
    id_reuse_wait_s: float = 0.5
    # How long the id of a request ended by ``Abort`` is remembered: its client's resend (the
    # stream that would have carried the ABORT frame broke, and the client library resends on
    # its own: within keepalive 15 s + reconnect 30 s) ends aborted instead of starting over.
    aborted_ttl_s: float = 120.0
    # How often a request waiting for room (NoRoomNowError) is routed again.
    admission_poll_s: float = 0.05
    # How long a request waits for a worker to (re-)register when none can serve it (capped by
    # its deadline): a worker starting, restarting, or expired for a late report (1 s) is back
    # within a report (0.1 s) or a reconnect (1 s); 0 fails at once.
    no_worker_wait_s: float = 5.0
    # Conditional disaggregation: D prefills a prompt itself when its prefix cache holds all but
    # at most this many tokens (ReserveKVRequest.local_prefill_max_tokens); 0: never, every
    # prompt goes to a prefill worker. docs/services.md, "Short suffixes prefilled on D".
    local_prefill_max_tokens: int = 0
    # ... and any prompt, when the prefill worker's queue (its last report plus what was routed
    # to it since) holds at least this many prompt tokens and the decode worker's fewer (0:
    # never): a queue that long is a wait longer than D's own prefill of the prompt would be.
    local_prefill_queue_tokens: int = 0
    # A request whose worker is lost after its first token goes on on another decode-capable
    # worker from the tokens its caller has (services/router/driver.py, "Resuming"), at most
    # this many times; 0: it fails UNAVAILABLE. Two: one worker lost, then one more while the
    # first is still being noticed (a cluster losing more than that at once is better told).
    max_resumes: int = 2
    # A try that produced no token because its worker was lost (a connection that broke or
    # stalled, a worker restarting: before the first token, or a resumed try that could not
    # reserve) is tried again, after 0, 0.1, 0.2, 0.4, ... s (at most ``retry_backoff_max_s``),
    # while less than this has passed since the first such loss in a row (a token delivered
    # starts the count again): a link cut for a few seconds, or a worker restarting on its
    # port, costs a wait instead of the request. 0: one retry, at once. Capped by the deadline.
    retry_window_s: float = 10.0
    retry_backoff_max_s: float = 1.0

    def retry_delay(self, num_retries: int) -> float:
        """The wait before retry ``num_retries`` (1: the first) of a run of losses."""
        if num_retries <= 1:
            return 0.0
        return min(self.retry_backoff_max_s, 0.1 * 2 ** (num_retries - 2))

    def __post_init__(self) -> None:
        # At most a day: each is a deadline of the router's calls, and grpc fails a longer one
        # at once (services/rpc/deadlines.py): `--default-timeout-s 1e20` failed every request.
        positive = ("lease_s", "default_timeout_s", "release_timeout_s", "admission_poll_s")
        for name in (*positive, "retry_backoff_max_s"):
            value = getattr(self, name)
            require_config(
                math.isfinite(value) and 0 < value <= MAX_DEADLINE_S,
                f"{name} must be in (0, {MAX_DEADLINE_S:g}] seconds, got {value}",
            )
        for name in ("no_worker_wait_s", "id_reuse_wait_s", "retry_window_s"):
            value = getattr(self, name)
            require_config(
                math.isfinite(value) and 0 <= value <= MAX_DEADLINE_S,
                f"{name} must be in [0, {MAX_DEADLINE_S:g}] seconds, got {value}",
            )
        require_config(
            0 <= self.max_resumes <= 1000,
            f"max_resumes must be in [0, 1000], got {self.max_resumes}",
        )
        for name in ("local_prefill_max_tokens", "local_prefill_queue_tokens"):
            value = getattr(self, name)
            require_config(0 <= value < 1 << 32, f"{name} must be in [0, 2^32), got {value}")

    def local_prefill_limit(self, prefill_queued: int, decode_queued: int) -> int:
        """ReserveKVRequest.local_prefill_max_tokens for a PD attempt, given the two workers'
        queued prompt tokens as the router estimates them."""
        q = self.local_prefill_queue_tokens
        if q and prefill_queued >= q and decode_queued < prefill_queued:
            return (1 << 32) - 1  # D prefills it, however much its cache holds
        return self.local_prefill_max_tokens


def admission_wait(now: float, give_up: float, poll_s: float) -> float | None:
    """How long a request no registered worker can serve sleeps before it is routed again:
    a poll, but never past ``give_up`` (the next try is the last, at ``give_up`` itself, so
    the UNAVAILABLE it then fails with leaves ``REASON_MARGIN_S`` before the deadline and
    not whatever the polls' phase left); None once ``give_up`` has come."""
    if now >= give_up:
        return None
    return min(poll_s, give_up - now)


def aborted_finished(
    num_prompt_tokens: int,
    arrival: float,
    now: float,
    num_delivered: int,
    ttft_s: float = 0.0,
    routing_s: float = 0.0,
    prefill: PrefillResult | None = None,
) -> Finished:
    """The ``Finished`` of a request that ended (aborted, or its caller gone, or failed) after
    delivering ``num_delivered`` tokens: its TTFT if a first token reached the caller
    (``ttft_s``; 0.0: none did), and its prefill as the prefill worker measured it, if one
    ended (its KV moved)."""
    cached = prefill.num_cached_tokens if prefill is not None else 0
    timings = Timings(routing_s=routing_s, ttft_s=ttft_s, total_s=now - arrival)
    if prefill is not None:
        timings = dataclasses.replace(
            timings,
            prefill_s=prefill.prefill_s,
            kv_transfer_s=prefill.kv_transfer_s,
            kv_transfer_exposed_s=prefill.kv_transfer_exposed_s,
            kv_bytes=prefill.kv_bytes,
        )
    return Finished(
        FinishReason.ABORT,
        num_prompt_tokens,
        num_delivered,
        min(cached, num_prompt_tokens),
        timings,
    )
