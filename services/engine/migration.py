"""The engine's migration API (DESIGN.md §5), reached as ``engine.migration``.

Every method runs on the engine thread, between steps; what it changes takes effect at the next
step. A coordinator (in tests, ``tests/engine/coordinator.py``) drives both sides.

Owner side — this engine's requests get work done elsewhere (placement.py):

- layers: ``set_stages`` runs a layer range through a ``StagePort``; ``restore_kv`` writes a
  sequence's KV for those layers back before they run here again; ``drop_layers`` /
  ``restore_layers`` free and reload their weights and KV;
- blocks: ``offload_blocks`` hands a sequence's leading blocks to a helper's ``AttentionPort``;
  ``begin_recall`` / ``import_recalled`` / ``finish_recall`` bring them back.

Helper side — this engine works for others (hosting.py): ``host_layers`` /
``release_hosted_layers`` for layer ranges (with the engine's own weights, or a ``LayerStack``
of weights the owner ships), ``hosted_blocks`` for attention blocks.

Under a memory budget every change of the layers held or of the hosted pools resizes the
engine's own KV pool (memory.py); a shrink that cannot happen refuses with
``ResourceExhaustedError`` and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from services.common.errors import (
    InvalidRequestError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from services.engine.hosting import DEFAULT_LEASE_S, HostedBlocks, HostedLayers
from services.engine.kv_cache import KVCache, KVLayout
from services.engine.kv_transfer import KVTransfer
from services.engine.layer_stack import LayerStack
from services.engine.memory import PoolSizer, module_bytes
from services.engine.placement import Placement
from services.engine.ports import AttentionPort, StageSeq
from services.engine.prefix_fetch import PrefixFetches
from services.engine.requests import RequestTable
from services.engine.scheduler import Scheduler
from services.engine.snapshot import HostedRange
from services.engine.stages import StageLayout

LayerLoader = Callable[[range], dict[int, nn.Module]]


class Migration:
    def __init__(
        self,
        placement: Placement,
        kv: KVTransfer,
        requests: RequestTable,
        scheduler: Scheduler,
        fetches: PrefixFetches,
        load_layers: LayerLoader,
        budget_bytes: int | None,
        publish: Callable[[], None],
        settle: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.placement = placement
        self.kv = kv
        self.requests = requests
        self.scheduler = scheduler
        self.fetches = fetches
        self.load_layers = load_layers
        self.publish = publish  # refresh the engine's snapshot
        self.settle = settle  # finish a pipelined step in flight (pipeline.py) before a change
        self.clock = clock
        self.model, self.kv_cache = placement.model, placement.kv_cache
        self.fingerprint = kv.fingerprint
        spec = self.model.spec
        self.hosted_layers: dict[str, HostedLayers] = {}
        self.hosted_blocks = HostedBlocks(
            self.kv_cache,
            placement.block_manager,
            self.fingerprint,
            spec.num_layers,
            spec.head_dim**-0.5,
            clock=clock,
        )
        min_blocks = -(-requests.max_model_len // self.kv_cache.block_size)
        self.memory = PoolSizer(
            budget_bytes,
            self.model,
            self.kv_cache,
            placement.block_manager,
            self._hosted_bytes,
            self._remap,
            min_blocks,
        )

    def housekeeping(self) -> None:
        """At the start of each step: free released and expired hosted work."""
        self.hosted_blocks.collect()
        for hosted in self.hosted_layers.values():
            hosted.expire()

    # -- owner side: layers -------------------------------------------------------------

    @property
    def stage_layout(self) -> StageLayout:
        return self.placement.layout

    def set_stages(self, layout: StageLayout) -> list[str]:
        """Switch where each layer runs; returns the requests sent back to recompute because
        their KV for a layer that now runs here is not here (not restored)."""
        self.settle()
        requeued = self.placement.set_layout(layout)
        self.publish()
        return requeued

    def restore_kv(self, request_id: str, data: torch.Tensor, layout: KVLayout) -> None:
        """Write back one layer of a running request's KV (its layers returning from a
        helper); ``layout`` may start at a later block (a delta)."""
        self.settle()
        self.kv.restore(request_id, data, layout)
        seq = self.requests.seq(request_id)
        self.placement.restored(seq, layout.layer, layout.first_token, layout.num_tokens)

    def restore_tokens(self, spans: list[StageSeq], layers: range, data: torch.Tensor) -> None:
        """Write back tokens ``[start, end)`` of running requests in ``layers`` (the layers
        returning from a helper; ``KVTransfer.export_tokens``'s tensor)."""
        self.settle()
        self.kv.restore_tokens(spans, layers, data)
        for span in spans:
            seq = self.requests.seq(span.request_id)
            for layer in layers:
                self.placement.restored(seq, layer, span.start, span.end)

    def drop_layers(self, start: int) -> None:
        """Free the weights and KV of layers ``[start, L)``, which a remote stage must run;
        under a budget the pool of the layers kept grows by what that frees."""
        self.settle()
        hosting = [o for o, h in self.hosted_layers.items() if h.layers.stop > start]
        if hosting:
            raise InvalidRequestError(f"layers from {start} on run here for {hosting}")
        self.placement.drop_layers(start)
        self.memory.refresh()
        with self.placement.routes.lock:  # imports write into the pool beside the steps
            self.memory.fit()
        self.publish()

    def restore_layers(self) -> None:
        """Load the dropped layers again (empty KV). Under a budget the pool shrinks first,
        moving blocks in use below the cut; ``ResourceExhaustedError`` if they do not fit."""
        self.settle()
        dropped = self.placement.dropped_layers()
        if not dropped:
            return
        if self.memory.budget_bytes is not None:
            held = next(i for i in range(dropped.start) if self.model.holds_layer(i))
            extra = len(dropped) * module_bytes([self.model.layers[held]])
            self._shrink_to(self.memory.target(self.model.num_layers, extra_weight_bytes=extra))
        self.placement.restore_layers(self.load_layers(dropped))
        self.memory.refresh()
        self.publish()

    # -- owner side: located blocks -----------------------------------------------------

    def offload_blocks(self, request_id: str, num_blocks: int, port: AttentionPort) -> None:
        """``port``'s helper holds a copy of the request's first ``num_blocks`` blocks (every
        layer): free them here; attention merges both parts from the next step on."""
        self.settle()
        self.placement.offload(self.requests.seq(request_id), num_blocks, port)
        self.publish()

    def begin_recall(self, request_id: str) -> None:
        """Reserve local blocks for a request's offloaded blocks before they come back."""
        self.settle()
        self.placement.begin_recall(self.requests.seq(request_id))

    def import_recalled(self, request_id: str, data: torch.Tensor, layout: KVLayout) -> None:
        """One layer of the offloaded blocks, as the helper's ``export_kv`` gives it."""
        self.settle()
        self.placement.import_recalled(self.requests.seq(request_id), data, layout)

    def finish_recall(self, request_id: str) -> None:
        """Every layer is back: attend locally again; the helper may free its copy."""
        self.settle()
        self.placement.finish_recall(self.requests.seq(request_id))
        self.publish()

    # -- helper side ----------------------------------------------------------------------

    def host_layers(
        self,
        owner: str,
        start: int,
        end: int,
        num_blocks: int,
        fingerprint: str,
        lease_s: float = DEFAULT_LEASE_S,
        stack: LayerStack | None = None,
    ) -> HostedLayers:
        """Run layers ``[start, end)`` for ``owner``'s sequences with a pool of ``num_blocks``
        blocks for those layers; under a budget the own pool shrinks to make room (and for
        ``stack``'s shipped weights: the owner's model, whose weights arrive later)."""
        self.settle()
        if stack is None and fingerprint != self.fingerprint:
            raise InvalidRequestError("the owner runs another model or dtype")
        if owner in self.hosted_layers:
            raise InvalidRequestError(f"already hosting layers for {owner}")
        held = all(self.model.holds_layer(i) for i in range(start, end))
        if start >= end or (not held if stack is None else stack.range != range(start, end)):
            raise InvalidRequestError(f"layers [{start}, {end}) are not all held here")
        kv = self.kv_cache
        # Not zero-filled: HostedLayers zeroes each block at its first use. A pool is sized
        # for the owner's worst case (its own pool, when the coordinator names no size), and
        # zeroing all of it here stalled this engine thread (644 MB for layers [12, 30) of
        # smollm2: 0.2 s on a quiet machine, 1.9 s on a loaded one) and committed memory no
        # sequence might touch.
        pool = KVCache(
            range(start, end),
            num_blocks,
            kv.block_size,
            kv.num_kv_heads,
            kv.head_dim,
            kv.dtype,
            kv.device,
            zeroed=False,
        )
        if self.memory.budget_bytes is not None:
            num_layers = self.kv_cache.num_layers
            extra = pool.nbytes + (0 if stack is None else stack.weight_bytes)
            self._shrink_to(self.memory.target(num_layers, extra_hosted=extra))
        fp = self.fingerprint if stack is None else fingerprint
        hosted = HostedLayers(owner, self.model, pool, fp, lease_s, self.clock, stack)
        self.hosted_layers[owner] = hosted
        self.publish()
        return hosted

    def hosted_ranges(self) -> tuple[HostedRange, ...]:
        return tuple(
            HostedRange(
                owner,
                h.layers.start,
                h.layers.stop,
                h.num_sequences,
                h.pool.num_blocks,
                h.num_blocks_used,
            )
            for owner, h in self.hosted_layers.items()
        )

    def release_hosted_layers(self, owner: str) -> None:
        self.settle()
        hosted = self.hosted_layers.pop(owner, None)
        if hosted is None:
            raise RequestNotFoundError(f"no layers hosted for {owner}")
        hosted.close()
        with self.placement.routes.lock:  # imports write into the pool beside the steps
            self.memory.fit()
        self.publish()

    # -- memory ---------------------------------------------------------------------------

    def _hosted_bytes(self) -> int:
        return sum(h.pool.nbytes + h.weight_bytes for h in self.hosted_layers.values())

    def _shrink_to(self, num_blocks: int) -> None:
        if num_blocks < self.placement.block_manager.num_blocks and self.fetches:
            raise ResourceExhaustedError("prefix fetches are writing into the pool; retry later")
        moves = None
        if num_blocks < self.placement.block_manager.num_blocks:
            moves = self.memory.check_shrink(num_blocks)
        with self.placement.routes.lock:  # imports write into the pool beside the steps
            self.memory.resize(num_blocks, moves)

    def _remap(self, moves: dict[int, int]) -> None:
        """Blocks moved (a pool shrink): rewrite every table that names them."""
        tables = [s.block_table for s in self.scheduler.running]
        tables += [r.seq.block_table for r in self.requests.importing.values()]
        tables += self.placement.block_tables() + self.hosted_blocks.block_ids()
        for table in tables:
            table[:] = [moves.get(b, b) for b in table]
