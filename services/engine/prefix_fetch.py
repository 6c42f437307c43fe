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

``PrefixFetches`` is the engine's registry of fetches not yet settled: the engine thread adds,
settles and cancels them; fetcher threads only look one up and write into it.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from services.common.errors import BanaServeError, InvalidRequestError, ResourceExhaustedError
from services.common.hashing import BlockHash, block_hashes
from services.engine.block_manager import BlockManager
from services.engine.kv_cache import KVCache, KVLayout
from services.engine.sequence import Sequence as EngineSequence

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


def check_prefix(
    num_tokens: int, num_prefix_tokens: int, block_size: int, timeout_s: float
) -> None:
    """What ``Engine.add_request_with_prefix`` accepts: whole blocks, a token left to compute."""
    bs = block_size
    if not 0 < num_prefix_tokens < num_tokens or num_prefix_tokens % bs:
        raise InvalidRequestError(
            f"num_prefix_tokens must be a multiple of {bs} in [{bs}, {num_tokens - 1}], "
            f"got {num_prefix_tokens}"
        )
    if timeout_s <= 0:
        raise InvalidRequestError(f"timeout_s must be positive, got {timeout_s}")


class PrefixFetches:
    def __init__(
        self, block_manager: BlockManager, kv_cache: KVCache, fingerprint: str, num_layers: int
    ) -> None:
        self.block_manager = block_manager
        self.kv_cache = kv_cache
        self.fingerprint = fingerprint
        self.num_layers = num_layers
        self._fetches: dict[str, PrefixFetch] = {}

    def __len__(self) -> int:
        return len(self._fetches)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._fetches

    def block_ids(self) -> list[int]:
        return [b for f in self._fetches.values() for b in f.block_ids]

    def start(self, seq: EngineSequence, num_prefix_tokens: int, timeout_s: float) -> PrefixFetch:
        """Reserve ``seq``'s prefix blocks (local hits reused) and register what to fetch."""
        bs = self.block_manager.block_size
        hits = self.block_manager.find_cached_prefix(seq)[: num_prefix_tokens // bs]
        num_fetched = num_prefix_tokens - len(hits) * bs
        if not self.block_manager.can_admit(seq, hits, num_fetched):
            raise ResourceExhaustedError(
                f"{seq.blocks_needed(num_fetched)} KV blocks needed, "
                f"{self.block_manager.num_free_blocks} free"
            )
        self.block_manager.admit_with_prefix(seq, hits, num_prefix_tokens)
        fetch = self._new_fetch(seq, len(hits), num_prefix_tokens // bs, timeout_s)
        if fetch.pending:
            self._fetches[seq.request_id] = fetch
        return fetch

    def _new_fetch(
        self, seq: EngineSequence, num_local: int, num_blocks: int, timeout_s: float
    ) -> PrefixFetch:
        bs, kv = self.block_manager.block_size, self.kv_cache
        hashes = tuple(block_hashes(seq.token_ids[: num_blocks * bs], bs, self.fingerprint))
        hashes = hashes[num_local:]
        layouts = tuple(
            KVLayout(
                self.fingerprint,
                layer,
                len(hashes) * bs,
                hashes,
                kv.dtype_name,
                bs,
                kv.num_kv_heads,
                kv.head_dim,
            )
            for layer in range(self.num_layers)
        )
        indices = tuple(range(num_local, num_blocks))
        block_ids = tuple(seq.block_table[num_local:num_blocks])
        return PrefixFetch(seq.request_id, indices, hashes, layouts, timeout_s, block_ids)

    def write_layer(
        self, request_id: str, layer: int, data: torch.Tensor, layout: KVLayout | None
    ) -> bool:
        fetch = self._fetches.get(request_id)
        if fetch is None:
            return False
        return fetch.write(layer, lambda: self._import_layer(fetch, layer, data, layout))

    def _import_layer(
        self, fetch: PrefixFetch, layer: int, data: torch.Tensor, layout: KVLayout | None
    ) -> None:
        expected = fetch.layouts[layer]
        if layout is not None and layout.fingerprint != self.fingerprint:
            raise InvalidRequestError("KV was computed by a different model or dtype")
        if layout is not None and (layout.layer, layout.block_hashes) != (
            layer,
            fetch.block_hashes,
        ):
            raise InvalidRequestError(f"KV is not layer {layer} of the fetched blocks")
        self.kv_cache.import_layer(list(fetch.block_ids), data, layout or expected)

    def fail(self, request_id: str, reason: str) -> bool:
        fetch = self._fetches.get(request_id)
        return fetch is not None and fetch.fail(reason)

    def cancel(self, request_id: str, reason: str) -> None:
        """Before the request's blocks are freed: no write can land in them afterwards."""
        fetch = self._fetches.pop(request_id, None)
        if fetch is not None:
            fetch.cancel(reason)

    def settle(self) -> list[str]:
        """Raise for failed fetches; forget complete ones and return their request ids (the
        caller hashes their blocks: cache hits from now on)."""
        failed = [f for f in self._fetches.values() if f.failed]
        if failed:
            raise fetch_error(failed)
        done = [r for r, f in self._fetches.items() if f.complete]
        for request_id in done:
            del self._fetches[request_id]
        return done

    def pending_in(self, seqs: list[EngineSequence]) -> tuple[PrefixFetch, ...]:
        if not self._fetches:
            return ()
        return tuple(self._fetches[s.request_id] for s in seqs if s.request_id in self._fetches)

    def arrived(self, fetches: tuple[PrefixFetch, ...]) -> None:
        """After a step that waited for every layer of ``fetches``: its commit hashes them."""
        for fetch in fetches:
            self._fetches.pop(fetch.request_id, None)
