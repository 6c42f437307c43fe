"""A prompt prefix whose KV arrives from elsewhere, layer by layer, while the suffix computes.

Lifecycle of a fetch (DESIGN.md §4 step 3):

1. ``Engine.add_request_with_prefix`` reuses the prefix blocks the local cache holds, gives the
   rest fresh blocks (with no hash yet) and returns a PENDING ``PrefixFetch`` that names those
   blocks by index into the prompt and by hash, with the layout each layer must have;
2. the fetcher, on any thread, writes each layer once (any order); the write that brings the
   last layer makes the fetch COMPLETE. ``fail_prefix``, a malformed write or a step that waited
   too long for a layer makes it FAILED;
3. a step whose batch holds a pending fetch runs ``wait_for_layer`` before each layer, so
   layer ``l`` of the suffix computes while layers ``> l`` of the prefix are still in flight; a
   failed fetch makes the step raise ``PrefixFetchError`` before anything of it is kept;
4. the engine CANCELS a fetch before it frees the blocks (abort, preemption, recompute): a write
   in progress finishes first, and no later write touches them.

A fetch leaves PENDING once, under its lock, and the first transition wins. The engine thread
alone frees the blocks and, once the fetch is COMPLETE, hashes them into the prefix cache.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.common.errors import BanaServeError, InvalidRequestError
from services.common.hashing import BlockHash
from services.engine.kv_cache import KVLayout

# The longest a step waits for one layer of a prefix before it gives up on the fetch.
DEFAULT_LAYER_TIMEOUT_S = 10.0


class FetchStatus(enum.Enum):
    PENDING = "pending"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"


class PrefixFetchError(BanaServeError):
    """Prefix KV a step needed did not arrive; the step kept nothing.

    Each request in ``request_ids`` must be recomputed (``Engine.recompute_prefix``) or aborted
    before the engine steps again.
    """

    def __init__(self, request_ids: Sequence[str], reason: str) -> None:
        super().__init__(f"prefix KV did not arrive for {', '.join(request_ids)}: {reason}")
        self.request_ids = tuple(request_ids)
        self.reason = reason


@dataclass(eq=False)
class PrefixFetch:
    """What the fetcher must deliver for one request, and how far it has got."""

    request_id: str
    block_indices: tuple[int, ...]  # into the prompt's blocks: the ones to fetch
    block_hashes: tuple[BlockHash, ...]  # their content hashes (their identity on the wire)
    layouts: tuple[KVLayout, ...]  # per layer: what ``write_prefix_layer`` expects
    timeout_s: float  # the longest a step waits for one layer
    block_ids: tuple[int, ...] = field(repr=False)  # this engine's blocks; never leave it
    status: FetchStatus = FetchStatus.PENDING
    reason: str = ""
    _ready: list[bool] = field(init=False, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def __post_init__(self) -> None:
        self._ready = [not self.block_indices] * len(self.layouts)
        if not self.block_indices:
            self.status = FetchStatus.COMPLETE

    @property
    def num_layers(self) -> int:
        return len(self.layouts)

    @property
    def num_layers_ready(self) -> int:
        return sum(self._ready)

    @property
    def pending(self) -> bool:
        return self.status is FetchStatus.PENDING

    @property
    def complete(self) -> bool:
        return self.status is FetchStatus.COMPLETE

    @property
    def failed(self) -> bool:
        return self.status is FetchStatus.FAILED

    def write(self, layer: int, fill: Callable[[], None]) -> bool:
        """Run ``fill`` (which writes ``layer``'s KV) and mark the layer ready.

        False, writing nothing, when the fetch is no longer pending. A bad layer index or a
        ``fill`` that raises fails the fetch (so a waiting step wakes) and re-raises.
        """
        with self._cond:
            if not self.pending:
                return False
            try:
                if not 0 <= layer < self.num_layers:
                    raise InvalidRequestError(f"layer {layer} outside 0..{self.num_layers - 1}")
                if self._ready[layer]:
                    raise InvalidRequestError(f"layer {layer} was already written")
                fill()
            except Exception as e:
                self._leave_pending(FetchStatus.FAILED, f"bad write of layer {layer}: {e}")
                raise
            self._ready[layer] = True
            if all(self._ready):
                self._leave_pending(FetchStatus.COMPLETE, "")
            self._cond.notify_all()
            return True

    def fail(self, reason: str) -> bool:
        with self._cond:
            return self._leave_pending(FetchStatus.FAILED, reason)

    def cancel(self, reason: str) -> bool:
        """Stop accepting writes; once this returns, none is in progress."""
        with self._cond:
            return self._leave_pending(FetchStatus.CANCELLED, reason)

    def wait_layer(self, layer: int) -> bool:
        """Block until ``layer`` is ready (True) or the fetch fails or times out (False)."""
        if self._ready[layer]:  # set only after the layer's KV is written
            return True
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._ready[layer] or not self.pending, self.timeout_s
            ):
                self._leave_pending(
                    FetchStatus.FAILED, f"layer {layer} did not arrive within {self.timeout_s}s"
                )
            return self._ready[layer]

    def _leave_pending(self, status: FetchStatus, reason: str) -> bool:
        if not self.pending:
            return False
        self.status, self.reason = status, reason
        self._cond.notify_all()
        return True


def fetch_error(fetches: Sequence[PrefixFetch]) -> PrefixFetchError:
    """The error for every fetch of ``fetches`` that is no longer on its way."""
    gone = [f for f in fetches if f.status in (FetchStatus.FAILED, FetchStatus.CANCELLED)]
    if len(gone) == 1:
        return PrefixFetchError([gone[0].request_id], gone[0].reason)
    reason = "; ".join(f"{f.request_id}: {f.reason}" for f in gone)
    return PrefixFetchError([f.request_id for f in gone], reason)


def wait_for_layer(fetches: Sequence[PrefixFetch], layer: int) -> None:
    """The step's gate before ``layer``: every fetch in the batch must have that layer."""
    for fetch in fetches:
        if not fetch.wait_layer(layer):
            raise fetch_error(fetches)
