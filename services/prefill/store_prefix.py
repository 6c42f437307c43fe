"""The prefill worker's side of the global KV store (DESIGN.md §4, step 3): cached prefixes in,
new full blocks out. Who calls what (all on the worker's event loop):

1. ``lookup(prompt)`` - ``PrefillWorker.prefill`` while the request is QUEUED: the longest
   prefix of the prompt the store holds past the blocks this worker's own prefix cache has,
   pinned there (or None: the own cache is all the prompt gets), and how much of the prompt
   is reused (what the write policy writes back, write_backs.py);
2. ``fetch(fetch, prefix)`` - spawned once the request entered the engine with that prefix
   (``Engine.add_request_with_prefix``): writes the prefix's KV in layer by layer while the
   step computes the suffix, and unpins the prefix. ``read_all`` + ``write_prefetched`` do the
   same before the request computes (the baseline without overlap);
3. ``write_back(...)`` - queued after the first token (write_backs.py: run when the worker is
   idle): the prompt's new full blocks that its write policy picks, read back from this worker's prefix cache (nothing is
   held for it meanwhile; blocks evicted by then are not written);
4. ``release(prefix)`` - for a pinned prefix nobody will fetch (the request ended first, or the
   engine had no room for it).

Every store failure degrades to computing: a failed lookup or read is a miss, a failed fetch
makes the step raise ``PrefixFetchError`` (the worker recomputes), a failed write-back is
logged. Only reads of the engine happen here, and writes through its thread-safe prefix calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import torch

from services.common.hashing import BlockHash, block_hashes
from services.engine.engine import Engine
from services.engine.prefix_fetch import PrefixFetch
from services.prefill.kvstore_client import (
    CachedPrefix,
    KVStoreClient,
    StoreError,
    StoreLookup,
)

log = logging.getLogger(__name__)

# A write-back is read from the prefix cache this many bytes at a time (~45 blocks of smollm2
# float32): each chunk one short engine-thread visit, one reused buffer of this size.
WRITE_BACK_CHUNK_BYTES = 32 << 20

# ``PrefillWorker.engine_call``: runs a function on the engine thread between two steps.
EngineCall = Callable[[Callable[[Engine], Any]], Awaitable[Any]]


class StorePrefixes:
    def __init__(
        self,
        engine: Engine,
        store: KVStoreClient,
        engine_call: EngineCall,
        write_back_chunk_bytes: int = WRITE_BACK_CHUNK_BYTES,
    ) -> None:
        self.engine = engine
        self._store = store
        self.engine_call = engine_call
        self.write_back_chunk_bytes = write_back_chunk_bytes
        self._staging: torch.Tensor | None = None

    async def close(self) -> None:
        await self._store.close()

    async def release(self, prefix: CachedPrefix) -> None:
        await self._store.release(prefix)

    async def lookup(self, prompt: list[int]) -> StoreLookup:
        """The prompt's longest prefix pinned in the store past what this worker's own prefix
        cache holds (None on a miss or any failure), and how many of its blocks are reused
        (held here or in the store, or asked for before: ``KVStoreClient.lookup``). Leaves at
        least one token to compute (the first token is sampled from it).

        Only the blocks past the own cached prefix are asked for: a hot prefix this worker
        holds costs the store one lookup of the prompt's new blocks, not a pin, a fetch
        machinery and an unpin of blocks the engine would reuse anyway."""
        bs = self.engine.config.block_size
        hashes = block_hashes(prompt[: (len(prompt) - 1) // bs * bs], bs, self.engine.fingerprint)
        # Read from the event loop while a step may run: a dict read, at worst stale. A block
        # dropped since makes the fetch name it and fail: the request is recomputed.
        own = self.engine.block_manager.num_cached_hashes(hashes)
        if own == len(hashes):  # this worker's own prefix cache has all of it (or there is none)
            return StoreLookup(None, own)
        try:
            return await self._store.lookup(hashes, own)
        except StoreError as exc:
            log.warning("kvstore lookup failed, computing the whole prompt: %s", exc)
            return StoreLookup(None, own)

    async def fetch(self, fetch: PrefixFetch, prefix: CachedPrefix) -> None:
        """Writes the prefix's KV into the engine layer by layer, reading layer l+1 from the
        store while layer l is written (and the step computes)."""
        like, positions = self._block_like(), fetch.block_indices
        num_layers = fetch.num_layers if fetch.pending else 0
        read: asyncio.Future[torch.Tensor] | None = None
        try:
            for layer in range(num_layers):
                data = await (read or self._store.read_layer(prefix, layer, positions, like))
                read = None
                if layer + 1 < num_layers:
                    nxt = self._store.read_layer(prefix, layer + 1, positions, like)
                    read = asyncio.ensure_future(nxt)
                if not self.engine.write_prefix_layer(fetch.request_id, layer, data):
                    break  # nobody needs it any more (aborted, recomputed)
        except Exception as exc:
            self.engine.fail_prefix(fetch.request_id, f"store read failed: {exc}")
        finally:
            if read is not None and not read.cancel():
                read.exception()  # a read that ended meanwhile: nobody wants its layer
            await self._store.release(prefix)

    async def read_all(self, prefix: CachedPrefix) -> list[torch.Tensor] | None:
        like = self._block_like()
        positions = range(prefix.first_block, prefix.num_blocks)
        try:
            return [
                await self._store.read_layer(prefix, layer, positions, like)
                for layer in range(self.engine.spec.num_layers)
            ]
        except StoreError as exc:
            log.warning("kvstore read failed, computing the whole prompt: %s", exc)
            return None

    def write_prefetched(
        self, fetch: PrefixFetch, prefix: CachedPrefix, layers: list[torch.Tensor]
    ) -> None:
        """Writes ``read_all``'s layers (blocks ``first_block ..`` of the prompt) into the
        engine; a block the fetch needs from before them fails the fetch (recomputed)."""
        if not fetch.pending:
            return
        wanted = [i - prefix.first_block for i in fetch.block_indices]
        if min(wanted) < 0:
            self.engine.fail_prefix(fetch.request_id, "a block of the own cache was dropped")
            return
        for layer, data in enumerate(layers):
            self.engine.write_prefix_layer(fetch.request_id, layer, data[:, wanted])

    def _block_like(self) -> torch.Tensor:
        """One block of one layer, as the store returns it: ``[2, bs, kv_heads, head_dim]``."""
        spec, kv = self.engine.spec, self.engine.kv_cache
        return torch.empty(
            2, self.engine.config.block_size, spec.num_kv_heads, spec.head_dim, dtype=kv.dtype
        )

    async def write_back(
        self, request_id: str, prompt: list[int], num_known: int, end: int | None = None
    ) -> bool:
        """The prompt's full blocks from ``num_known`` (the store had those) to ``end`` (default:
        all), every layer, read from this worker's prefix cache (the prompt's blocks stay there
        after its hand-off until evicted) a chunk at a time into one reused buffer. False if
        some were evicted first (the chunks before the one holding the first such block are
        written); a store failure is logged (True)."""
        bs = self.engine.config.block_size
        full = len(prompt) // bs if end is None else min(end, len(prompt) // bs)
        hashes = block_hashes(prompt[: full * bs], bs, self.engine.fingerprint)
        blocks = [(h, tuple(prompt[i * bs : (i + 1) * bs])) for i, h in enumerate(hashes)]
        per_chunk = max(1, self.write_back_chunk_bytes // self.block_bytes())
        for start in range(num_known, len(blocks), per_chunk):
            reader = _CachedBlocks(self, blocks[start : start + per_chunk])
            try:
                await self._store.write_blocks(
                    reader.hashes, self.engine.spec.num_layers, self._layer_bytes(), reader
                )
            except StoreError as exc:
                log.warning("request %s: KV write-back to the store failed: %s", request_id, exc)
                return True
            if reader.gone:
                return False
        return True

    def _layer_bytes(self) -> int:
        return self.engine.kv_cache.layer_block_bytes

    def block_bytes(self) -> int:
        """One block of every layer."""
        return self._layer_bytes() * self.engine.spec.num_layers

    def staging(self, num_bytes: int) -> torch.Tensor:
        """The write-backs' buffer (one at a time, WriteBacks), at least ``num_bytes``; reused:
        fresh pages for every ~90 MB write-back cost the worker more than the copy itself."""
        if self._staging is None or self._staging.numel() < num_bytes:
            self._staging = torch.empty(num_bytes, dtype=torch.uint8)
        return self._staging


class _CachedBlocks:
    """``KVStoreClient.write_blocks``'s ``encode`` for blocks of this worker's prefix cache:
    gathers each node's blocks into the staging buffer on the engine thread, between steps."""

    def __init__(self, store: StorePrefixes, blocks: list[tuple[BlockHash, tuple[int, ...]]]):
        self._store, self._blocks = store, blocks
        self.hashes = [h for h, _ in blocks]
        self.gone = False

    async def __call__(self, groups: list[list[int]]) -> list[np.ndarray] | None:
        engine = self._store.engine
        spec, bs, kv = engine.spec, engine.config.block_size, engine.kv_cache
        size = self._store.block_bytes()
        buffer = self._store.staging(size * sum(len(g) for g in groups))
        views, offset = [], 0
        for group in groups:
            views.append(buffer[offset : offset + size * len(group)])
            offset += size * len(group)
        shaped = [
            v.view(kv.dtype).view(spec.num_layers, -1, 2, bs, kv.num_kv_heads, kv.head_dim)
            for v in views
        ]
        wanted = [[self._blocks[i] for i in group] for group in groups]
        read = await self._store.engine_call(lambda e: e.read_cached_blocks(wanted, shaped))
        self.gone = not read
        return [v.numpy() for v in views] if read else None
