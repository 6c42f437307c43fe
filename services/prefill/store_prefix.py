"""The prefill worker's side of the global KV store (DESIGN.md §4, step 3): cached prefixes in,
new full blocks out. Who calls what (all on the worker's event loop):

1. ``lookup(prompt)`` - ``PrefillWorker.prefill`` while the request is QUEUED: the longest
   prefix of the prompt the store holds past the blocks this worker's own prefix cache has,
   pinned there (or None: the own cache is all the prompt gets);
2. ``fetch(fetch, prefix)`` - spawned once the request entered the engine with that prefix
   (``Engine.add_request_with_prefix``): writes the prefix's KV in layer by layer while the
   step computes the suffix, and unpins the prefix. ``read_all`` + ``write_prefetched`` do the
   same before the request computes (the baseline without overlap);
3. ``write_back(...)`` - spawned after the first token: the prompt's new full blocks, off the
   TTFT path;
4. ``release(prefix)`` - for a pinned prefix nobody will fetch (the request ended first, or the
   engine had no room for it).

Every store failure degrades to computing: a failed lookup or read is a miss, a failed fetch
makes the step raise ``PrefixFetchError`` (the worker recomputes), a failed write-back is
logged. Only reads of the engine happen here, and writes through its thread-safe prefix calls.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from services.common.hashing import block_hashes
from services.engine.engine import Engine
from services.engine.kv_cache import KVLayout
from services.engine.prefix_fetch import PrefixFetch
from services.prefill.kvstore_client import CachedPrefix, KVStoreClient, StoreError

log = logging.getLogger(__name__)


class StorePrefixes:
    def __init__(self, engine: Engine, store: KVStoreClient) -> None:
        self.engine = engine
        self._store = store

    async def close(self) -> None:
        await self._store.close()

    async def release(self, prefix: CachedPrefix) -> None:
        await self._store.release(prefix)

    async def lookup(self, prompt: list[int]) -> CachedPrefix | None:
        """The prompt's longest prefix pinned in the store past what this worker's own prefix
        cache holds; None on a miss or any failure. Leaves at least one token to compute (the
        first token is sampled from it).

        Only the blocks past the own cached prefix are asked for: a hot prefix this worker
        holds costs the store one lookup of the prompt's new blocks, not a pin, a fetch
        machinery and an unpin of blocks the engine would reuse anyway."""
        bs = self.engine.config.block_size
        hashes = block_hashes(prompt[: (len(prompt) - 1) // bs * bs], bs, self.engine.fingerprint)
        # Read from the event loop while a step may run: a dict read, at worst stale. A block
        # dropped since makes the fetch name it and fail: the request is recomputed.
        own = self.engine.block_manager.num_cached_hashes(hashes)
        if own == len(hashes):
            return None  # this worker's own prefix cache has all of it (or there is none)
        try:
            return await self._store.lookup(hashes, own)
        except StoreError as exc:
            log.warning("kvstore lookup failed, computing the whole prompt: %s", exc)
            return None

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
        self, request_id: str, layers: list[tuple[torch.Tensor, KVLayout]], num_known: int
    ) -> None:
        """The prompt's full blocks past the ``num_known`` the store had, every layer."""
        hashes = layers[0][1].block_hashes[num_known:]
        if not hashes:
            return
        tensors = [data[:, num_known : num_known + len(hashes)] for data, _ in layers]
        try:
            await self._store.write_back(hashes, tensors)
        except StoreError as exc:
            log.warning("request %s: KV write-back to the store failed: %s", request_id, exc)
