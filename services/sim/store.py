"""The global KV store as the simulator sees it: which blocks (by chained hash) it holds.

banaserve's prefill workers share prefixes through it (DESIGN.md §4, docs/kvstore.md): a
prompt's blocks past what the worker's own prefix cache holds are looked up, the longest run
held is fetched layer by layer while the suffix computes, and after its first token the
prompt's full blocks its write policy picks are written back (by default those asked for
before: services/prefill/write_backs.py). Modelled here: which blocks are held (least recently
used evicted at capacity, as a node's pool), which were asked for (a set: the real store's
seen window, 10-20 minutes, is longer than a simulated run, and its Bloom filter's rare false
positives are not modelled), the fetch's time (``SimWorker``: the profile's transport), and the
write-back — at once, not deferred to an idle moment as the real worker
does (``--store-write-back-delay``, at most 5 s), and free of CPU: on this project's 2-core
machine the node's copies and checksums share the workers' cores (docs/benchmarks.md, session
10), a cost a deployment with the store on its own hosts does not pay — a profile fitted with
``sim serving --banaserve-apart`` carries it, measured, as banaserve's PD workers' own step
costs (``ServingModel.store``). One store for the cluster, without a node's bandwidth limit or
lookup time (~3 ms a prompt on the local cluster, before its prefill is queued).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from services.common.hashing import BlockHash

# One node's pool by default (``banaserve up --kvstore-capacity-bytes``).
DEFAULT_CAPACITY_BYTES = 1 << 30


class SimStore:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"a store holds at least one block, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[BlockHash, None] = OrderedDict()  # least recently used first
        self._asked: set[BlockHash] = set()
        self.num_hit_blocks = self.num_written_blocks = self.num_evicted_blocks = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._blocks

    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        """How many of ``hashes`` (a chain) the store holds from the first on; those are
        used now (evicted last)."""
        n = 0
        while n < len(hashes) and hashes[n] in self._blocks:
            self._blocks.move_to_end(hashes[n])
            n += 1
        self.num_hit_blocks += n
        return n

    def mark_asked(self, hashes: Sequence[BlockHash], num_held: int) -> int:
        """As the real lookup's seen marks (``MetadataStore.lookup``): how many of ``hashes``
        from the first were held (the ``num_held`` first) or asked for before; marks them all
        asked for."""
        n = num_held
        while n < len(hashes) and hashes[n] in self._asked:
            n += 1
        self._asked.update(hashes)
        return n

    def write(self, hashes: Sequence[BlockHash]) -> None:
        """Holds ``hashes`` (already held ones count as used), evicting the least recently
        used past capacity."""
        for block_hash in hashes:
            if block_hash in self._blocks:
                self._blocks.move_to_end(block_hash)
                continue
            self._blocks[block_hash] = None
            self.num_written_blocks += 1
            if len(self._blocks) > self.capacity_blocks:
                self._blocks.popitem(last=False)
                self.num_evicted_blocks += 1
