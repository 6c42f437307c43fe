"""A checksum per stored KV block, taken at commit and verified whenever the block is read.

What it protects: a block whose bytes changed while the store held them (a bit flip in host
memory, a disk-tier file altered or damaged in place) is never served. The pool verifies a block
when a reader pins it (memory) or promotes it (disk); a mismatch drops the block everywhere and
reads as a miss, so the prefill worker computes that part of the prompt itself and the output is
what it would have been without the store (docs/engine.md, "a failed step never happened").

What it does not: a writer that stores wrong KV under a block's hash computes a matching
checksum. Writes are therefore limited to authenticated prefill workers (docs/security.md);
the two together are what keeps store content from changing an output silently.

CRC-32 (zlib, hardware-assisted) over every layer in order: one pass over the block's bytes
per read, far cheaper than moving them.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

Layers = Sequence[bytes | bytearray | memoryview]


def block_checksum(layers: Layers) -> int:
    crc = 0
    for layer in layers:
        crc = zlib.crc32(layer, crc)
    return crc


def intact(layers: Layers, checksum: int | None) -> bool:
    """True if ``layers`` still hash to ``checksum`` (None: never committed, nothing to check)."""
    return checksum is None or block_checksum(layers) == checksum
