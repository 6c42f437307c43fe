"""Where an engine's layers and its sequences' KV live: the owner side of DESIGN.md §5.

Every method runs on the engine thread, between steps.

**Layers.** ``set_layout`` says which layers a step runs here and which through a
``StagePort``. While any stage is remote the blocks computed here lack the remote layers' KV, so
the prefix cache is paused (no hits, no new entries). ``drop_layers`` frees the weights and KV of
layers a remote stage runs; ``restore_layers`` loads them again (empty KV, prefix cache cleared).
A running sequence whose KV for some layer is not here (computed through a port, or dropped) is
*missing* those layers until ``Engine.restore_kv`` writes them back; a layout that runs a layer
here again sends every sequence still missing it back to be recomputed, so output never depends
on whether the copy-back happened. Sequences still importing KV follow every switch too: their
layers written so far move to where they run (kv_routes.py, under its lock), and when one joins
the batch (``joined``) the layers it has on a helper are missing here from token 0.

**Located KV.** ``offload`` hands a running sequence's first full blocks to a helper reached
through an ``AttentionPort`` (the helper already holds a copy: ``HostedBlocks``) and frees them
here; its attention is then merged from both places. ``begin_recall`` / ``import_recalled`` /
``finish_recall`` bring them back. A sequence is never located while a stage is remote, nor the
reverse: a layer range hosted elsewhere would need the located blocks of those layers there too.

**Failures.** ``recover`` handles a port that failed a step (which kept nothing): a stage whose
layers are all still held here runs here from now on and the sequences missing them recompute;
otherwise the requests the helper named are failed. Located sequences of a failed attention
port recompute here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.common.errors import InvalidRequestError, RequestNotFoundError, ResourceExhaustedError
from services.engine.block_manager import BlockManager
from services.engine.kv_cache import KVCache, KVLayout
from services.engine.kv_routes import ImportRoutes
from services.engine.models.llama import LlamaForCausalLM
from services.engine.ports import AttentionPort, PortFailed, StagePort
from services.engine.sequence import Sequence, SequenceStatus
from services.engine.stages import StageLayout

Evict = Callable[[Sequence], None]


class Placement:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        block_manager: BlockManager,
        running: Callable[[], list[Sequence]],
        evict: Evict,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.running = running  # the running sequences, oldest first
        self.evict = evict  # frees a sequence's KV everywhere and queues it for recompute
        self.layout = StageLayout.local(model.num_layers)
        self.routes = ImportRoutes(kv_cache, lambda: self.layout)  # importing sequences' layers
        self.located: dict[str, AttentionPort] = {}
        # request id -> layer -> tokens whose KV for that layer is here (fewer than computed)
        self._missing: dict[str, dict[int, int]] = {}
        self._recalls: dict[str, tuple[list[int], set[int]]] = {}  # blocks, layers written

    @property
    def held_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.model.num_layers) if self.model.holds_layer(i))

    def missing(self, request_id: str) -> dict[int, int]:
        """Layers whose KV for ``request_id`` is incomplete here -> tokens it does hold."""
        return dict(self._missing.get(request_id, {}))

    # -- layers ---------------------------------------------------------------------------

    def set_layout(self, layout: StageLayout, failed: StagePort | None = None) -> list[str]:
        """Switch where layers run; the ids of the sequences sent back to recompute.
        ``failed``: a port that just failed a step (importing KV it held is not asked back)."""
        if layout.num_layers != self.model.num_layers:
            raise InvalidRequestError(
                f"layout covers {layout.num_layers} layers, model has {self.model.num_layers}"
            )
        local = [i for s in layout.stages if not s.remote for i in s.layers]
        absent = [i for i in local if not self.model.holds_layer(i)]
        if absent:
            raise InvalidRequestError(f"layers {absent} cannot run here: not held")
        if layout.remote and (self.located or self._recalls):
            raise InvalidRequestError("sequences have blocks on a helper; recall them first")
        stale = [s for s in self.running() if self._missing.get(s.request_id, {}).keys() & local]
        for seq in stale:  # before the switch: the ports they used still release them
            self.evict(seq)
        with self.routes.lock:  # no import writes while its layers move and the layout changes
            self.routes.relocate(layout, failed)
            self.layout = layout
        self.block_manager.cache_paused = layout.remote
        return [s.request_id for s in stale]

    def joined(self, seq: Sequence) -> bool:
        """An imported sequence joined the batch: its layers on a helper (or lost on the way)
        are missing here from token 0; a lost one, or one missing here that runs here (a
        failed move), sends it to be recomputed (False: its blocks must not be cached)."""
        on_helper, lost = self.routes.finish(seq.request_id)
        if not on_helper and not lost:
            return True
        self._missing[seq.request_id] = dict.fromkeys(on_helper | lost, 0)
        local = {i for s in self.layout.stages if not s.remote for i in s.layers}
        if lost or on_helper & local:
            self.evict(seq)
            return False
        return True

    def mark_computed(self, seqs: list[Sequence], num_new_tokens: list[int]) -> None:
        """After a step: the tokens it computed through ports have KV only on their helpers."""
        remote = self.layout.remote_layers
        if remote:
            for seq, n in zip(seqs, num_new_tokens, strict=True):
                held = self._missing.setdefault(seq.request_id, {})
                for layer in remote:
                    held.setdefault(layer, seq.num_computed_tokens - n)

    def restored(self, seq: Sequence, layer: int, first_token: int, num_tokens: int) -> None:
        """``restore_kv`` wrote ``layer``'s KV for tokens ``[first_token, num_tokens)``."""
        held = self._missing.get(seq.request_id, {})
        if layer in held and first_token <= held[layer]:
            held[layer] = max(held[layer], num_tokens)
            if held[layer] >= seq.num_computed_tokens:
                del held[layer]
        if not held:
            self._missing.pop(seq.request_id, None)

    def drop_layers(self, start: int) -> range:
        """Free the weights and KV of layers ``[start, L)``, which a remote stage must run."""
        dropped = range(start, self.model.num_layers)
        if not 0 < start < self.model.num_layers:
            raise InvalidRequestError(f"can drop layers [k, L) for 0 < k < L, got k={start}")
        if not set(dropped) <= set(self.layout.remote_layers):
            raise InvalidRequestError(f"layers {list(dropped)} still run here; switch them first")
        if not all(self.model.holds_layer(i) for i in dropped):
            raise InvalidRequestError(f"layers {list(dropped)} are not all held here")
        self.model.drop_layers(dropped)
        self.kv_cache.drop_layers(dropped)
        for seq in self.running():
            self._missing.setdefault(seq.request_id, {}).update(dict.fromkeys(dropped, 0))
        return dropped

    def dropped_layers(self) -> range:
        """The layers ``[k, L)`` not held here (empty if all are)."""
        held = self.held_layers
        return range(len(held), self.model.num_layers)

    def restore_layers(self, layers: dict[int, torch.nn.Module]) -> None:
        """Install ``layers`` again with empty KV; nothing cached can be trusted for them."""
        self.kv_cache.add_layers(range(min(layers), max(layers) + 1))
        self.model.put_layers(layers)
        self.block_manager.drop_cached()

    # -- located KV -----------------------------------------------------------------------

    def offload(self, seq: Sequence, num_blocks: int, port: AttentionPort) -> None:
        """Free ``seq``'s first ``num_blocks`` blocks here: ``port``'s helper holds them."""
        if self.layout.remote:
            raise InvalidRequestError("a stage is remote; located blocks need every layer here")
        if seq.status is not SequenceStatus.RUNNING or seq.request_id in self.located:
            raise InvalidRequestError(f"{seq.request_id} is not a running, unlocated sequence")
        if not 0 < num_blocks <= len(seq.block_hashes):
            raise InvalidRequestError(
                f"can offload 1..{len(seq.block_hashes)} full computed blocks, got {num_blocks}"
            )
        freed, seq.block_table = seq.block_table[:num_blocks], seq.block_table[num_blocks:]
        seq.num_remote_blocks = num_blocks
        self.block_manager.release(freed)
        self.located[seq.request_id] = port

    def begin_recall(self, seq: Sequence) -> None:
        """Reserve local blocks for ``seq``'s located blocks (it still attends remotely)."""
        if seq.request_id not in self.located or seq.request_id in self._recalls:
            raise RequestNotFoundError(f"{seq.request_id} has no blocks to recall")
        if seq.num_remote_blocks > self.block_manager.num_free_blocks:
            raise ResourceExhaustedError(
                f"{seq.num_remote_blocks} KV blocks needed, "
                f"{self.block_manager.num_free_blocks} free"
            )
        self._recalls[seq.request_id] = (self.block_manager.allocate(seq.num_remote_blocks), set())

    def import_recalled(self, seq: Sequence, data: torch.Tensor, layout: KVLayout) -> None:
        blocks, written = self._recall(seq)
        expected = (0, seq.num_remote_tokens, tuple(seq.block_hashes[: seq.num_remote_blocks]))
        if (layout.first_block, layout.num_tokens, layout.block_hashes) != expected:
            raise InvalidRequestError(f"KV is not of {seq.request_id}'s located blocks")
        self.kv_cache.import_layer(blocks, data, layout)
        written.add(layout.layer)

    def finish_recall(self, seq: Sequence) -> None:
        blocks, written = self._recall(seq)
        if len(written) < self.model.num_layers:
            raise InvalidRequestError(
                f"{len(written)} of {self.model.num_layers} layers recalled for {seq.request_id}"
            )
        del self._recalls[seq.request_id]
        seq.block_table = blocks + seq.block_table
        seq.num_remote_blocks = 0
        self.located.pop(seq.request_id).release([seq.request_id])

    def _recall(self, seq: Sequence) -> tuple[list[int], set[int]]:
        recall = self._recalls.get(seq.request_id)
        if recall is None:
            raise RequestNotFoundError(f"no recall in progress for {seq.request_id}")
        return recall

    # -- bookkeeping ----------------------------------------------------------------------

    def forget(self, seq: Sequence) -> None:
        """``seq`` gives up its KV (finish, abort, preemption): helpers free their part."""
        rid = seq.request_id
        port = self.located.pop(rid, None)
        if port is not None:
            port.release([rid])
        recall = self._recalls.pop(rid, None)
        if recall is not None:
            self.block_manager.release(recall[0])
        for stage_port in self.layout.ports:
            stage_port.release([rid])
        self.routes.forget(rid)
        self._missing.pop(rid, None)

    def block_tables(self) -> list[list[int]]:
        """Tables of blocks held outside any sequence (for a pool resize to rewrite)."""
        return [blocks for blocks, _ in self._recalls.values()]

    def recover(self, failure: PortFailed) -> list[str]:
        """After ``failure`` failed a step: the request ids that must fail (none if recovered)."""
        port = failure.port
        if port in self.layout.ports:
            layers = [i for s in self.layout.stages if s.port is port for i in s.layers]
            if all(self.model.holds_layer(i) and self.kv_cache.holds(i) for i in layers):
                requeued = self.set_layout(self.layout.without(port), failed=port)
                if requeued:
                    port.evicted(requeued)
                return []
            return list(failure.request_ids)
        evicted = [s for s in self.running() if self.located.get(s.request_id) is port]
        for seq in evicted:
            self.evict(seq)
        if evicted and isinstance(port, AttentionPort):
            port.evicted([s.request_id for s in evicted])
        return []
