"""DiskTier: atomic block files, LRU capacity bound, corruption read as a miss."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.errors import ConfigError, InvalidRequestError
from services.common.hashing import BlockHash
from services.kvstore.disk import HEADER, MAGIC, DiskTier

NUM_LAYERS = 3
LAYER_BYTES = 4
FILE_BYTES = HEADER.size + NUM_LAYERS * LAYER_BYTES


def h(i: int) -> BlockHash:
    return bytes([i]) * 16


def layers(block_hash: BlockHash) -> list[bytes]:
    return [bytes([block_hash[0], layer] * (LAYER_BYTES // 2)) for layer in range(NUM_LAYERS)]


def make_disk(tmp_path: Path, num_files: int = 4) -> DiskTier:
    return DiskTier(tmp_path / "disk", num_files * FILE_BYTES)


def assert_no_leaks(disk: DiskTier) -> None:
    files = sorted(p.name for p in disk.directory.iterdir())
    assert files == sorted(f"{x.hex()}.kv" for x in disk.hashes())
    assert disk.num_bytes == sum(p.stat().st_size for p in disk.directory.iterdir())
    assert disk.num_bytes <= disk.capacity_bytes


def test_put_get_round_trip_is_byte_exact(tmp_path: Path) -> None:
    disk = make_disk(tmp_path)
    assert disk.put(h(1), layers(h(1))) == []
    assert h(1) in disk and h(2) not in disk
    assert disk.path(h(1)).name == "01" * 16 + ".kv"
    assert (len(disk), disk.num_bytes) == (1, FILE_BYTES)
    assert disk.get(h(1)) == (NUM_LAYERS, bytearray(b"".join(layers(h(1)))))
    assert disk.get(h(2)) is None
    disk.discard(h(1))
    disk.discard(h(1))  # idempotent
    assert (len(disk), disk.num_bytes) == (0, 0)
    assert_no_leaks(disk)


def test_capacity_bound_evicts_least_recently_used_files(tmp_path: Path) -> None:
    disk = make_disk(tmp_path, num_files=3)
    for i in (1, 2, 3):
        assert disk.put(h(i), layers(h(i))) == []
    disk.get(h(1))  # a read is a use
    assert disk.put(h(4), layers(h(4))) == [h(2)]
    assert disk.put(h(5), layers(h(5))) == [h(3)]
    assert disk.hashes() == [h(1), h(4), h(5)]
    assert disk.num_bytes == 3 * FILE_BYTES
    assert_no_leaks(disk)


def test_put_replaces_an_existing_block(tmp_path: Path) -> None:
    disk = make_disk(tmp_path)
    disk.put(h(1), layers(h(1)))
    disk.put(h(2), layers(h(2)))
    assert disk.put(h(1), layers(h(3))) == []
    assert disk.hashes() == [h(2), h(1)]
    assert disk.get(h(1)) == (NUM_LAYERS, b"".join(layers(h(3))))
    assert disk.num_bytes == 2 * FILE_BYTES
    assert_no_leaks(disk)


def test_block_larger_than_capacity_is_dropped_at_once(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "disk", FILE_BYTES - 1)
    assert disk.put(h(1), layers(h(1))) == [h(1)]
    assert len(disk) == 0
    assert_no_leaks(disk)


def test_put_rejects_ragged_or_empty_layers(tmp_path: Path) -> None:
    disk = make_disk(tmp_path)
    with pytest.raises(InvalidRequestError):
        disk.put(h(1), [b"ab", b"abc"])
    with pytest.raises(InvalidRequestError):
        disk.put(h(1), [])
    assert_no_leaks(disk)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[: FILE_BYTES - 1],  # short payload
        lambda data: data[: HEADER.size - 1],  # short header
        lambda data: b"XXXX" + data[4:],  # bad magic
        lambda data: HEADER.pack(MAGIC, NUM_LAYERS + 1, LAYER_BYTES) + data[HEADER.size :],
        lambda data: data + b"\0",  # trailing bytes
    ],
)
def test_corrupted_file_is_a_miss_and_deleted(tmp_path: Path, corrupt) -> None:
    disk = make_disk(tmp_path)
    disk.put(h(1), layers(h(1)))
    disk.put(h(2), layers(h(2)))
    path = disk.path(h(1))
    path.write_bytes(corrupt(path.read_bytes()))
    assert disk.get(h(1)) is None
    assert h(1) not in disk and not path.exists()
    assert disk.hashes() == [h(2)]
    assert disk.num_bytes == FILE_BYTES
    assert_no_leaks(disk)


def test_missing_file_is_a_miss(tmp_path: Path) -> None:
    disk = make_disk(tmp_path)
    disk.put(h(1), layers(h(1)))
    disk.path(h(1)).unlink()
    assert disk.get(h(1)) is None
    assert (len(disk), disk.num_bytes) == (0, 0)
    assert_no_leaks(disk)


def test_construction_clears_block_files_and_keeps_others(tmp_path: Path) -> None:
    old = make_disk(tmp_path)
    old.put(h(1), layers(h(1)))
    (old.directory / f"{h(2).hex()}.tmp").write_bytes(b"half")
    (old.directory / "notes.txt").write_text("keep")
    disk = make_disk(tmp_path)
    assert sorted(p.name for p in disk.directory.iterdir()) == ["notes.txt"]
    assert (len(disk), disk.num_bytes) == (0, 0)
    (disk.directory / "notes.txt").unlink()
    assert_no_leaks(disk)


def test_capacity_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        DiskTier(tmp_path, 0)


def test_a_disk_dir_that_cannot_be_one_is_a_config_error(tmp_path: Path) -> None:
    """``kvstore --disk-dir`` naming a file (or a path under one) was a FileExistsError
    traceback at start; now the one ``error:`` line of a refused flag."""
    (tmp_path / "a-file").write_text("x")
    for path in (tmp_path / "a-file", tmp_path / "a-file" / "under"):
        with pytest.raises(ConfigError, match=f"--disk-dir {path}"):
            DiskTier(path, 4 * FILE_BYTES)
