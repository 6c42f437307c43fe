"""Disk tier of the kvstore block pool: one file per block evicted from memory.

Lifecycle of a block file (only ``BlockPool`` calls these):

1. ``put``     - the pool evicts a committed block from memory. Its layers are written to
                 ``<hex>.tmp`` and renamed to ``<hex>.kv`` (``os.replace``), so a reader never
                 sees half a file. Least recently used files are deleted first while the new
                 one would not fit in ``capacity_bytes``; ``put`` returns their hashes (and the
                 new block's own when it cannot be stored) so the pool can announce them gone.
2. ``get``     - the pool promotes a block back into memory: its layers, read into one
                 buffer. The header (magic, num_layers, layer_bytes) and the file size are
                 checked; a short or malformed file is deleted and read as a miss.
3. ``discard`` - the promoted block now lives in memory; its file is deleted.

A file is ``MAGIC | num_layers | layer_bytes`` (little-endian uint32 each) followed by the
layers in order. ``num_bytes`` counts whole files, header included.

On construction every block file already in the directory is deleted: the metadata that named
those blocks (the pool's table, the Redis entries) did not survive the restart, so nobody could
look them up; files that are not block files are left alone. The disk is a cache, so writes are
not fsynced. Single-threaded, like the pool; the I/O is synchronous.
"""

from __future__ import annotations

import os
import re
import struct
from collections import OrderedDict
from pathlib import Path

from services.common.errors import ConfigError, InvalidRequestError
from services.common.hashing import HASH_SIZE, BlockHash
from services.common.paths import output_dir
from services.kvstore.checksum import Layers

MAGIC = b"BKV1"
HEADER = struct.Struct("<4sII")
_BLOCK_FILE = re.compile(rf"^[0-9a-f]{{{2 * HASH_SIZE}}}\.(kv|tmp)$")


class DiskTier:
    def __init__(self, directory: str | os.PathLike[str], capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ConfigError(f"disk capacity_bytes must be positive, got {capacity_bytes}")
        self.directory = Path(directory)
        self.capacity_bytes = capacity_bytes
        # hash -> (file size, num_layers), least recently used first.
        self._files: OrderedDict[BlockHash, tuple[int, int]] = OrderedDict()
        self.num_bytes = 0
        output_dir(self.directory, "--disk-dir")  # a file, a read-only or unmakeable path
        try:
            self._clear()
        except OSError as exc:
            raise ConfigError(f"--disk-dir {self.directory}: cannot clear it ({exc})") from None

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._files

    def __len__(self) -> int:
        return len(self._files)

    def hashes(self) -> list[BlockHash]:
        """Stored hashes, least recently used first."""
        return list(self._files)

    def entries(self) -> list[tuple[BlockHash, int, int]]:
        """``(hash, payload bytes, num_layers)`` of every stored block (what a node announces)."""
        return [(h, size - HEADER.size, n) for h, (size, n) in self._files.items()]

    def path(self, block_hash: BlockHash) -> Path:
        return self.directory / f"{block_hash.hex()}.kv"

    def put(self, block_hash: BlockHash, layers: Layers) -> list[BlockHash]:
        """Store ``layers`` under ``block_hash``; returns the hashes this tier no longer holds."""
        _check_layers(layers)
        self.discard(block_hash)
        size = HEADER.size + len(layers) * len(layers[0])
        if size > self.capacity_bytes:
            return [block_hash]
        dropped = self._make_room(size)
        if not self._write(block_hash, layers):
            return [*dropped, block_hash]
        self._files[block_hash] = (size, len(layers))
        self.num_bytes += size
        return dropped

    def get(self, block_hash: BlockHash) -> tuple[int, bytearray] | None:
        """``(num_layers, the layers one after another)``, or None if absent or unreadable (an
        unreadable file is deleted)."""
        if block_hash not in self._files:
            return None
        stored = _read(self.path(block_hash))
        if stored is None:
            self.discard(block_hash)
            return None
        self._files.move_to_end(block_hash)
        return stored

    def discard(self, block_hash: BlockHash) -> None:
        stored = self._files.pop(block_hash, None)
        if stored is None:
            return
        self.num_bytes -= stored[0]
        self.path(block_hash).unlink(missing_ok=True)

    def _make_room(self, size: int) -> list[BlockHash]:
        dropped = []
        while self.num_bytes + size > self.capacity_bytes:
            oldest = next(iter(self._files))
            self.discard(oldest)
            dropped.append(oldest)
        return dropped

    def _write(self, block_hash: BlockHash, layers: Layers) -> bool:
        tmp = self.directory / f"{block_hash.hex()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, len(layers), len(layers[0])))
                for layer in layers:
                    f.write(layer)
            os.replace(tmp, self.path(block_hash))
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        return True

    def _clear(self) -> None:
        for entry in os.scandir(self.directory):
            if entry.is_file() and _BLOCK_FILE.match(entry.name):
                os.unlink(entry.path)


def _check_layers(layers: Layers) -> None:
    if not layers or not layers[0]:
        raise InvalidRequestError("a block needs at least one non-empty layer")
    if any(len(layer) != len(layers[0]) for layer in layers):
        raise InvalidRequestError("every layer of a block must have the same size")


def _read(path: Path) -> tuple[int, bytearray] | None:
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER.size)
            if len(header) != HEADER.size:
                return None
            magic, num_layers, layer_bytes = HEADER.unpack(header)
            # The size check comes before allocating, so a corrupt header cannot ask for gigabytes.
            expected = HEADER.size + num_layers * layer_bytes
            if magic != MAGIC or num_layers * layer_bytes == 0:
                return None
            if os.fstat(f.fileno()).st_size != expected:
                return None
            data = bytearray(num_layers * layer_bytes)
            if f.readinto(data) != len(data):
                return None
            return num_layers, data
    except OSError:
        return None
