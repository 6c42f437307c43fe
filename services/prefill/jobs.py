"""The prefill worker's requests (``Job``) and the values it hands out; core.py has the
lifecycle. A job's ``status`` is changed by the coroutine that owns it, except QUEUED ->
COMPUTING, which the engine thread sets as it adds the job (so the layer hook of the very next
step sees it)."""

from __future__ import annotations

import asyncio
import enum
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from services.common.types import FinishReason, RequestOutput, SamplingParams
from services.engine.kv_cache import KVLayout
from services.prefill.kvstore_client import CachedPrefix
from services.prefill.transport import KVSender, KVTarget, TransferStats


class JobStatus(enum.Enum):
    QUEUED = "queued"
    COMPUTING = "computing"
    TRANSFERRING = "transferring"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    target: KVTarget


@dataclass(frozen=True)
class FirstToken:
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class PrefillResult:
    """The last thing a prefill yields. ``finish_reason`` set: the first token ended the request
    and no KV was handed over."""

    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    queued_s: float
    prefill_s: float
    transfer: TransferStats | None


@dataclass(frozen=True)
class WorkerStats:
    num_blocks_total: int
    num_blocks_used: int
    num_blocks_free: int
    num_blocks_cached: int
    num_queued_prefill_tokens: int
    num_running_seqs: int
    num_open_transfers: int


@dataclass(eq=False)
class Job:
    request: PrefillRequest
    engine_id: str  # unique per job: what the engine, the hook and the step outputs name
    arrived_at: float
    computed: asyncio.Future[tuple[RequestOutput, float]]
    status: JobStatus = JobStatus.QUEUED
    # Set once the job lets go of its request id (it has started ending).
    released: asyncio.Event = field(default_factory=asyncio.Event)
    sender: KVSender | None = None
    added: Future[None] | None = None  # the command adding it to the engine
    scheduled_at: float | None = None  # written by the engine thread
    prefix: CachedPrefix | None = None  # pinned in the global store
    num_store_blocks: int = 0  # prompt blocks the store had
    num_seen_blocks: int = 0  # prompt blocks reused: held here or there, or asked for before
    prefetched: list[torch.Tensor] | None = None  # every prefix layer (overlap off)
    # Layers handed to the sender: a step that failed on a prefix fetch runs again and must not
    # send a layer twice.
    num_layers_sent: int = 0
    # The layers [k, L) a migration's helper computed (this worker its donor), in layer order,
    # set by the engine thread after the prompt's last step: core.py hands them on.
    remote_layers: list[Future[tuple[torch.Tensor, KVLayout]]] = field(default_factory=list)
    # The first token whose KV goes to the target: it holds the prompt's blocks before it.
    first_token: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id
