"""The one chained block hash (DESIGN.md §3).

Block i of a token sequence is identified by

    h_i = BLAKE2b-128(h_{i-1} || fingerprint || tokens of block i)

with h_{-1} = 16 zero bytes. Tokens are packed as little-endian uint32 and the
fingerprint as UTF-8 behind a 4-byte length, so no two (parent, fingerprint,
tokens) triples share an encoding. The router, the engine and the kvstore all
call this module; golden vectors in tests pin the values. Python's ``hash()``
is salted per process and is never used for this.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

BlockHash = bytes
HASH_SIZE = 16
ROOT_HASH: BlockHash = bytes(HASH_SIZE)


def hash_block(parent: BlockHash, token_ids: Sequence[int], fingerprint: str) -> BlockHash:
    if len(parent) != HASH_SIZE:
        raise ValueError(f"parent hash must be {HASH_SIZE} bytes, got {len(parent)}")
    fp = fingerprint.encode()
    h = hashlib.blake2b(digest_size=HASH_SIZE)
    h.update(parent)
    h.update(struct.pack("<I", len(fp)))
    h.update(fp)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    fingerprint: str,
    parent: BlockHash = ROOT_HASH,
) -> list[BlockHash]:
    """Hashes of every *full* block of ``token_ids``; a trailing partial block has none."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], fingerprint)
        hashes.append(parent)
    return hashes


def place(block_hash: BlockHash, node_ids: Iterable[str]) -> str:
    """The kvstore node that should store ``block_hash``: rendezvous (highest-random-weight)
    hashing, shared by every writer so that a block has one home.

    Removing a node moves only the blocks it was chosen for. BLAKE2b, not ``hash()``, so every
    process agrees; the hash is fixed-length, so ``hash || node_id`` is unambiguous.
    """
    if len(block_hash) != HASH_SIZE:
        raise ValueError(f"block hash must be {HASH_SIZE} bytes, got {len(block_hash)}")

    def weight(node_id: str) -> tuple[bytes, str]:
        return hashlib.blake2b(block_hash + node_id.encode(), digest_size=8).digest(), node_id

    ids = list(node_ids)
    if not ids:
        raise ValueError("place() needs at least one node")
    return max(ids, key=weight)
