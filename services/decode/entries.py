"""The decode worker's table entries and the values it hands out (servicer.py maps them to
protos). ``core.py`` has the lifecycle; only it changes an entry's ``status``."""

from __future__ import annotations

import asyncio
import enum
import math
from concurrent.futures import Future
from dataclasses import dataclass, field

from services.common.errors import BanaServeError, ConfigError
from services.common.types import FinishReason


@dataclass(frozen=True)
class DecodeConfig:
    default_lease_s: float = 10.0
    max_lease_s: float = 60.0
    sweep_interval_s: float = 0.05
    # Longest a stream waits for its next event with no engine step meanwhile (the lease and
    # deadline normally end it sooner; a request queued behind others waits while steps run).
    stream_idle_timeout_s: float = 60.0
    # How long a request that finished before anyone streamed it keeps its tokens.
    finished_retention_s: float = 30.0
    # A stalled engine (or one hosting work) is looked at again at least this often.
    idle_poll_s: float = 0.5
    load_window_s: float = 1.0
    # A mixed (colocated) worker: ``reserve`` may ask it to prefill the prompt itself.
    prefill_locally: bool = False
    # How long a reserve waits for a running request with the same id to end.
    id_reuse_wait_s: float = 0.5
    # A reservation reuses the prompt's leading blocks that this worker's prefix cache holds
    # (the prompts it decoded before), and its transfer carries only the blocks after them:
    # a hot prefix's KV crosses the network once per decode worker, not once per request.
    reuse_cached_prefix: bool = True
    # Longest a TransferKV waits for its first frame. A prefill worker opens the call when it
    # admits the request and sends an open frame at once (claiming the reservation); the
    # header follows with the prompt's first layer, a wait that spans its queueing and compute
    # and that the reservation's lease bounds instead (the router renews it meanwhile). So
    # this bounds only a call that names nothing (``__main__``: ``--max-lease``).
    transfer_header_timeout_s: float = 60.0
    # Longest a transfer waits for each later frame. The sender writes each layer as its step
    # computes it and the end frame right after that step: a gap of 10 s is far past any step,
    # a sender that stalled, and its reservation is freed then rather than at its lease.
    transfer_idle_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.id_reuse_wait_s >= 0:
            raise ConfigError(f"id_reuse_wait_s must be >= 0, got {self.id_reuse_wait_s}")
        positive = ("default_lease_s", "max_lease_s", "sweep_interval_s", "idle_poll_s")
        positive += ("transfer_header_timeout_s", "transfer_idle_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:  # NaN too
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.default_lease_s > self.max_lease_s:
            raise ConfigError("default_lease_s must not exceed max_lease_s")


class RequestStatus(enum.Enum):
    RESERVED = "reserved"
    RECEIVING = "receiving"
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True)
class TokenDelta:
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    num_completion_tokens: int  # the prefill worker's first token included
    num_cached_tokens: int = 0  # prefix-cache hits of a local prefill


StreamEvent = TokenDelta | Finished


@dataclass(frozen=True)
class Failed:
    """Ends a stream with an error instead of ``Finished`` (the stream raises it)."""

    error: BanaServeError


@dataclass(frozen=True)
class Reservation:
    request_id: str
    reservation_id: str
    status: RequestStatus
    num_blocks: int
    lease_s: float  # granted (from ``reserve``) or left (in ``stats``)
    num_cached_blocks: int = 0  # leading blocks reused from the prefix cache: KV starts there
    prefilling_locally: bool = False  # this worker prefills the prompt: no KV comes


@dataclass(frozen=True)
class WorkerStats:
    num_blocks_total: int
    num_blocks_free: int
    num_blocks_cached: int
    num_running_seqs: int
    num_waiting_seqs: int
    reservations: list[Reservation]
    num_preemptions: int = 0  # since the worker started

    @property
    def num_blocks_used(self) -> int:
        return self.num_blocks_total - self.num_blocks_free


@dataclass(eq=False)
class Entry:
    request_id: str
    engine_id: str  # unique per entry: what the engine and its outputs name
    reservation_id: str
    prompt_token_ids: list[int]
    num_blocks: int
    lease_expiry: float
    deadline: float | None
    status: RequestStatus = RequestStatus.RESERVED
    first_block: int = 0  # the transfer's first block (those before it were cached here)
    events: asyncio.Queue[StreamEvent | Failed] = field(default_factory=asyncio.Queue)
    streaming: bool = False
    freed: bool = False  # released, expired or failed (not finished) before it ended
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    done_at: float = math.inf
    importing: Future[None] | None = None  # the layer being copied in, off the engine thread
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set with status DONE
