"""What an engine holds for other engines: the helper side of migration (DESIGN.md §5).

**HostedLayers** — layers ``[start, end)`` of an owner engine's model, run here for the owner's
sequences (layer migration). Lifecycle:

1. ``Engine.host_layers(owner, start, end, num_blocks)`` (engine thread) creates it, with a KV pool
   for those layers only and its own block manager, so its sequences never touch the engine's own;
2. copy: ``import_kv(request_id, data, layout)`` per sequence and layer (any thread). The first
   import of a sequence creates it; a later one whose layout starts further on (a delta of KV
   written during the copy) extends it;
   with weights shipped by the owner (a helper lacking them), the layers run from a
   ``LayerStack`` (layer_stack.py) filled as they arrive, and ``run`` fails until all are in;
3. serve: ``run(work)`` (any thread: the owner's ``StagePort``) runs the layers on the owner's
   hidden states and writes each sequence's KV for them here. A sequence first seen at position 0
   is created; one that starts below what is held is rewound (a failed step's retry); one that
   starts beyond it fails with ``PortError``, as does a pool with no room;
4. end: ``release(request_ids)`` (any thread) frees sequences; ``expire()`` (the engine, at each
   step) frees those untouched for ``lease_s``; ``Engine.release_hosted_layers`` drops it all.
   ``export_kv`` and ``export_tokens`` hand KV back to an owner taking its layers back.
   ``close`` also lets go of the shipped layers' weights.

One lock serialises 2-4, so hosted work runs beside the engine's own steps (the model's weights
are only read) and never waits for one.

**HostedBlocks** — leading blocks of other engines' sequences, every layer, held in this engine's
own pool (attention migration), addressed by (owner, request id) and the blocks' content hashes:

1. ``hold(owner, request_id, block_hashes)`` (engine thread) takes a block per hash;
2. ``import_kv(owner, request_id, data, layout)`` (any thread) fills one layer of them;
3. ``attend(owner, layer, queries)`` (any thread: the owner's ``AttentionPort``) returns partial
   attention ``(O, m, l)`` of each query over its sequence's blocks, once every layer is in;
4. ``export_kv`` (any thread) gives them back; ``release(owner, request_ids)`` (any thread) marks
   them free and ``collect()`` (engine thread, at each step) returns them to the pool, as it
   does for entries untouched for ``lease_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from services.common.errors import InvalidRequestError, RequestNotFoundError, ResourceExhaustedError
from services.common.hashing import BlockHash
from services.engine.attention import (
    PartialAttention,
    decode_partials,
    gather_blocks,
    partial_attention,
    split_partials,
)
from services.engine.block_manager import BlockManager
from services.engine.kv_cache import KVCache, KVLayout
from services.engine.layer_stack import LayerStack
from services.engine.model_runner import ModelRunner, Rows
from services.engine.models.llama import LlamaForCausalLM
from services.engine.ports import AttentionQuery, PortError, StageSeq, StageWork

Clock = Callable[[], float]
DEFAULT_LEASE_S = 30.0


def _layout(
    pool: KVCache, fingerprint: str, layer: int, first: int, end: int, hashes: tuple[BlockHash, ...]
) -> KVLayout:
    return KVLayout(
        fingerprint,
        layer,
        end,
        hashes,
        pool.dtype_name,
        pool.block_size,
        pool.num_kv_heads,
        pool.head_dim,
        first,
    )


@dataclass(eq=False)
class HostedSequence:
    request_id: str
    expires_at: float
    block_table: list[int] = field(default_factory=list)
    layer_tokens: dict[int, int] = field(default_factory=dict)  # layer -> tokens held

    def num_tokens(self, layers: range) -> int:
        return min(self.layer_tokens.get(layer, 0) for layer in layers)


class HostedLayers:
    def __init__(
        self,
        owner: str,
        model: LlamaForCausalLM,
        pool: KVCache,
        fingerprint: str,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Clock = time.monotonic,
        stack: LayerStack | None = None,
    ) -> None:
        self.owner = owner
        self.layers = pool.layers
        self.model = model
        self.stack = stack  # the owner's shipped weights (None: the model's own layers)
        self.pool = pool
        self.fingerprint = fingerprint
        self.lease_s = lease_s
        self.block_manager = BlockManager(pool.num_blocks, pool.block_size, fingerprint, False)
        # Blocks never handed out yet: the pool may be uninitialised memory (host_layers), so
        # each is zeroed when first allocated, as a zero-filled pool would hold it.
        self._fresh = set(range(pool.num_blocks))
        self._runner = ModelRunner(model, pool, str(pool.device))
        self._clock = clock
        self._seqs: dict[str, HostedSequence] = {}
        self._lock = threading.Lock()

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    @property
    def num_blocks_used(self) -> int:
        return self.block_manager.num_blocks - self.block_manager.num_free_blocks

    def num_tokens(self, request_id: str) -> int:
        """Tokens whose KV is here in every hosted layer (0: none)."""
        with self._lock:
            seq = self._seqs.get(request_id)
            return 0 if seq is None else seq.num_tokens(self.layers)

    def run(self, work: StageWork) -> torch.Tensor:
        """The hidden states after layer ``end - 1`` for ``work``; any thread."""
        if (work.start_layer, work.end_layer) != (self.layers.start, self.layers.stop):
            raise PortError(
                work.request_ids,
                f"layers [{work.start_layer}, {work.end_layer}) asked, [{self.layers.start}, "
                f"{self.layers.stop}) hosted",
            )
        missing = [] if self.stack is None else self.stack.missing()
        if missing:
            raise PortError(work.request_ids, f"the weights of layers {missing} have not arrived")
        runner = self.model if self.stack is None else self.stack
        with self._lock:
            rows = self._admit(work.seqs)
            positions, meta, _ = self._runner.metadata(rows)
            with torch.inference_mode():
                hidden = runner.forward_layers(
                    work.hidden, positions, self.pool, meta, self.layers.start, self.layers.stop
                )
            for s in work.seqs:
                self._seqs[s.request_id].layer_tokens = dict.fromkeys(self.layers, s.end)
            return hidden

    def _admit(self, seqs: tuple[StageSeq, ...]) -> list[Rows]:
        """Each sequence's rows, with blocks for them; PortError names those that cannot run."""
        now, failed, rows = self._clock(), {}, []
        for s in seqs:
            seq = self._seqs.get(s.request_id)
            held = 0 if seq is None else seq.num_tokens(self.layers)
            if s.start > held:
                failed[s.request_id] = f"holds {held} tokens of it, work starts at {s.start}"
                continue
            if seq is None:
                seq = self._seqs[s.request_id] = HostedSequence(s.request_id, now)
            if not self._reserve(seq, s.end):
                failed[s.request_id] = f"no free block in the hosted pool ({self.pool.num_blocks})"
                continue
            seq.expires_at = now + self.lease_s
            bs = self.pool.block_size
            rows.append(Rows(s.start, s.num_tokens, seq.block_table[: -(-s.end // bs)]))
        if failed:
            raise PortError(list(failed), "; ".join(f"{r}: {why}" for r, why in failed.items()))
        return rows

    def _reserve(self, seq: HostedSequence, num_tokens: int) -> bool:
        need = self._blocks_needed(seq, num_tokens)
        if need > self.block_manager.num_free_blocks:
            return False
        ids = self.block_manager.allocate(need)
        if fresh := [b for b in ids if b in self._fresh]:
            self.pool.zero_blocks(fresh)
            self._fresh.difference_update(fresh)
        seq.block_table += ids
        return True

    def _blocks_needed(self, seq: HostedSequence | None, num_tokens: int) -> int:
        have = 0 if seq is None else len(seq.block_table)
        return max(0, -(-num_tokens // self.pool.block_size) - have)

    def import_kv(self, request_id: str, data: torch.Tensor, layout: KVLayout) -> None:
        """Write one layer of an owner's KV for tokens ``[layout.first_token, num_tokens)``."""
        if layout.fingerprint != self.fingerprint:
            raise InvalidRequestError("KV was computed by a different model or dtype")
        if layout.layer not in self.layers:
            raise InvalidRequestError(f"layer {layout.layer} is not hosted here ({self.layers})")
        with self._lock:
            seq = self._seqs.get(request_id)
            held = 0 if seq is None else seq.layer_tokens.get(layout.layer, 0)
            if layout.first_token > held:
                raise InvalidRequestError(
                    f"KV from token {layout.first_token} of {request_id} layer {layout.layer}: "
                    f"only {held} are here"
                )
            if seq is None:
                seq = self._seqs[request_id] = HostedSequence(request_id, self._clock())
            if not self._reserve(seq, layout.num_tokens):
                raise ResourceExhaustedError(f"hosted pool ({self.pool.num_blocks} blocks) is full")
            first = layout.first_block
            self.pool.import_layer(seq.block_table[first : first + layout.num_blocks], data, layout)
            seq.layer_tokens[layout.layer] = layout.num_tokens
            seq.expires_at = self._clock() + self.lease_s

    def import_tokens(self, spans: Sequence[StageSeq], data: torch.Tensor) -> None:
        """Write tokens ``[start, end)`` of each span's sequence in every hosted layer from
        ``KVCache.gather_tokens``'s tensor (the owner's ``export_tokens``). Everything is checked
        before a token is written: the tensor's shape, and each span starts at or below what is
        held of its sequence in every layer."""
        shape = self.pool.tokens_shape(self.layers, sum(s.num_tokens for s in spans))
        if tuple(data.shape) != shape or data.dtype != self.pool.dtype:
            raise InvalidRequestError(
                f"KV tensor {list(data.shape)} {data.dtype} for {list(shape)} {self.pool.dtype}"
            )
        if len({s.request_id for s in spans}) != len(spans):
            raise InvalidRequestError("a KV delta names a sequence twice")
        with self._lock:
            for span in spans:
                seq = self._seqs.get(span.request_id)
                held = 0 if seq is None else seq.num_tokens(self.layers)
                if span.start > held:
                    raise InvalidRequestError(
                        f"KV from token {span.start} of {span.request_id}: only {held} are here"
                    )
            now, slots = self._clock(), []
            need = sum(self._blocks_needed(self._seqs.get(s.request_id), s.end) for s in spans)
            if need > self.block_manager.num_free_blocks:
                raise ResourceExhaustedError(
                    f"hosted pool ({self.pool.num_blocks} blocks) is full: {need} more needed"
                )
            for span in spans:
                seq = self._seqs.setdefault(span.request_id, HostedSequence(span.request_id, now))
                self._reserve(seq, span.end)
                slots += self.pool.slots(seq.block_table, span.start, span.end)
            index = torch.tensor(slots, dtype=torch.long, device=self.pool.device)
            self.pool.scatter_tokens(self.layers, index, data)
            for span in spans:
                seq = self._seqs[span.request_id]
                seq.layer_tokens = dict.fromkeys(self.layers, span.end)
                seq.expires_at = now + self.lease_s

    def export_tokens(self, spans: Sequence[StageSeq]) -> torch.Tensor:
        """Tokens ``[start, end)`` of each span's hosted sequence in every hosted layer,
        ``KVCache.gather_tokens``'s tensor: KV handed back to an owner taking its layers back."""
        with self._lock:
            slots = []
            for span in spans:
                seq = self._seqs.get(span.request_id)
                if seq is None:
                    raise RequestNotFoundError(f"no hosted sequence {span.request_id!r}")
                held = seq.num_tokens(self.layers)
                if not 0 <= span.start <= span.end <= held:
                    raise InvalidRequestError(
                        f"tokens [{span.start}, {span.end}) of {span.request_id}: {held} held"
                    )
                slots += self.pool.slots(seq.block_table, span.start, span.end)
            index = torch.tensor(slots, dtype=torch.long, device=self.pool.device)
            return self.pool.gather_tokens(self.layers, index)

    def export_kv(
        self, request_id: str, layer: int, start_token: int = 0, end_token: int | None = None
    ) -> tuple[torch.Tensor, KVLayout]:
        """One layer of a hosted sequence's KV, blocks from ``start_token``'s on (no hashes:
        the tokens are the owner's)."""
        with self._lock:
            seq = self._seqs.get(request_id)
            if seq is None:
                raise RequestNotFoundError(f"no hosted sequence {request_id!r}")
            held = seq.layer_tokens.get(layer, 0)
            end = held if end_token is None else end_token
            if not 0 <= start_token < end <= held:
                raise InvalidRequestError(f"tokens [{start_token}, {end}) of {held} held")
            first = start_token // self.pool.block_size
            layout = _layout(self.pool, self.fingerprint, layer, first, end, ())
            blocks = seq.block_table[first : first + layout.num_blocks]
            return self.pool.export_layer(layer, blocks, layout), layout

    def release(self, request_ids: Sequence[str]) -> None:
        with self._lock:
            for request_id in request_ids:
                seq = self._seqs.pop(request_id, None)
                if seq is not None:
                    self.block_manager.release(seq.block_table)

    def expire(self) -> list[str]:
        """Free the sequences whose lease ran out; their ids."""
        now = self._clock()
        with self._lock:
            gone = [r for r, s in self._seqs.items() if s.expires_at <= now]
        self.release(gone)
        return gone

    @property
    def weight_bytes(self) -> int:
        """Bytes of shipped weights this range holds (reserved when hosting started)."""
        return 0 if self.stack is None else self.stack.weight_bytes

    def close(self) -> None:
        self.release(list(self._seqs))
        if self.stack is not None:
            self.stack.clear()


@dataclass(eq=False)
class HeldBlocks:
    block_hashes: tuple[BlockHash, ...]
    block_ids: list[int]
    expires_at: float
    layers: set[int] = field(default_factory=set)  # written so far
    released: bool = False


class HostedBlocks:
    def __init__(
        self,
        kv_cache: KVCache,
        block_manager: BlockManager,
        fingerprint: str,
        num_layers: int,
        scale: float,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Clock = time.monotonic,
    ) -> None:
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.fingerprint = fingerprint
        self.num_layers = num_layers
        self.scale = scale
        self.lease_s = lease_s
        self._clock = clock
        self._held: dict[tuple[str, str], HeldBlocks] = {}
        self._lock = threading.Lock()

    @property
    def num_blocks(self) -> int:
        return sum(len(h.block_ids) for h in self._held.values())

    @property
    def num_sequences(self) -> int:
        return len(self._held)

    def block_ids(self) -> list[list[int]]:
        """Every held table (engine thread: for a pool resize to rewrite)."""
        return [h.block_ids for h in self._held.values()]

    def hold(self, owner: str, request_id: str, block_hashes: Sequence[BlockHash]) -> None:
        """Engine thread: reserve one block per hash for an owner's sequence."""
        if (owner, request_id) in self._held:
            raise InvalidRequestError(f"blocks of {owner}/{request_id} are already held")
        if not block_hashes:
            raise InvalidRequestError("no blocks to hold")
        if len(block_hashes) > self.block_manager.num_free_blocks:
            raise ResourceExhaustedError(
                f"{len(block_hashes)} blocks asked, {self.block_manager.num_free_blocks} free"
            )
        ids = self.block_manager.allocate(len(block_hashes))
        with self._lock:
            self._held[(owner, request_id)] = HeldBlocks(
                tuple(block_hashes), ids, self._clock() + self.lease_s
            )

    def import_kv(self, owner: str, request_id: str, data: torch.Tensor, layout: KVLayout) -> None:
        if layout.fingerprint != self.fingerprint:
            raise InvalidRequestError("KV was computed by a different model or dtype")
        with self._lock:
            held = self._get(owner, request_id)
            if (layout.first_block, layout.block_hashes) != (0, held.block_hashes):
                raise InvalidRequestError(f"KV is not of the blocks held for {request_id}")
            self.kv_cache.import_layer(held.block_ids, data, layout)
            held.layers.add(layout.layer)

    def export_kv(self, owner: str, request_id: str, layer: int) -> tuple[torch.Tensor, KVLayout]:
        with self._lock:
            held = self._get(owner, request_id)
            end = len(held.block_ids) * self.kv_cache.block_size
            layout = _layout(self.kv_cache, self.fingerprint, layer, 0, end, held.block_hashes)
            return self.kv_cache.export_layer(layer, held.block_ids, layout), layout

    def attend(
        self, owner: str, layer: int, queries: Sequence[AttentionQuery]
    ) -> list[PartialAttention]:
        """Partial attention of each query over its sequence's held blocks at ``layer``."""
        with self._lock:
            tables = [self._ready(owner, q) for q in queries]
        k_cache, v_cache = self.kv_cache.layer(layer)
        if queries and all(_sees_every_held_token(q) for q in queries):  # decode rows: batched
            padded = pad_sequence([torch.tensor(ids) for ids in tables], batch_first=True)
            lens = torch.tensor([q.num_tokens for q in queries])
            q = torch.cat([query.q for query in queries])
            part = decode_partials(q, k_cache, v_cache, padded, lens, self.scale)
            return split_partials(part, [1] * len(queries))
        parts = []
        for query, ids in zip(queries, tables, strict=True):
            index = torch.tensor(ids, dtype=torch.long, device=k_cache.device)
            k, v = gather_blocks(k_cache, index), gather_blocks(v_cache, index)
            kv_positions = torch.arange(query.num_tokens, device=k.device)
            parts.append(
                partial_attention(query.q, query.positions, k, v, kv_positions, self.scale)
            )
        return parts

    def _ready(self, owner: str, query: AttentionQuery) -> list[int]:
        held = self._held.get((owner, query.request_id))
        if held is None or held.released:
            raise PortError([query.request_id], "no blocks held for it")
        held_tokens = len(held.block_ids) * self.kv_cache.block_size
        if len(held.layers) < self.num_layers or query.num_tokens != held_tokens:
            raise PortError(
                [query.request_id],
                f"holds {held_tokens} tokens in {len(held.layers)} layers, "
                f"asked {query.num_tokens} in {self.num_layers}",
            )
        held.expires_at = self._clock() + self.lease_s
        return held.block_ids

    def release(self, owner: str, request_ids: Sequence[str]) -> None:
        """Any thread: the blocks go back to the pool at the engine's next ``collect``."""
        with self._lock:
            for request_id in request_ids:
                held = self._held.get((owner, request_id))
                if held is not None:
                    held.released = True

    def collect(self) -> int:
        """Engine thread: free released and expired entries; how many."""
        if not self._held:
            return 0
        now = self._clock()
        with self._lock:
            gone = [k for k, h in self._held.items() if h.released or h.expires_at <= now]
            freed = [self._held.pop(k) for k in gone]
        for held in freed:
            self.block_manager.release(held.block_ids)
        return len(freed)

    def _get(self, owner: str, request_id: str) -> HeldBlocks:
        held = self._held.get((owner, request_id))
        if held is None or held.released:
            raise RequestNotFoundError(f"no blocks held for {owner}/{request_id}")
        return held


def _sees_every_held_token(query: AttentionQuery) -> bool:
    """One query row past every held token (a decoding token of the sequence)."""
    return query.q.shape[0] == 1 and int(query.positions[0]) >= query.num_tokens
