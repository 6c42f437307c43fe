import hashlib
import struct

import pytest

from services.common.hashing import ROOT_HASH, block_hashes, hash_block

# Golden vectors: these values are the wire identity of KV blocks across the router,
# engine and kvstore. Changing them invalidates every stored block.
GOLDEN = [
    (ROOT_HASH, [1, 2, 3, 4], "fp", "69d16bfe6d5586c284912b13254aaaee"),
    (ROOT_HASH, [], "", "9583000fb4548029c502d9455d72a499"),
]


@pytest.mark.parametrize(("parent", "tokens", "fp", "expected"), GOLDEN)
def test_golden_vectors(parent, tokens, fp, expected):
    assert hash_block(parent, tokens, fp).hex() == expected


def test_chain_golden():
    hashes = block_hashes(list(range(10)), 4, "model-a")
    assert [h.hex() for h in hashes] == [
        "a976a3df3d78385e173194c891bc1169",
        "b8c720cadb4f0decf9a6aa94d9b956bc",
    ]


def test_definition_is_blake2b_of_documented_encoding():
    fp = b"model-a"
    data = ROOT_HASH + struct.pack("<I", len(fp)) + fp + struct.pack("<4I", 0, 1, 2, 3)
    assert (
        hash_block(ROOT_HASH, [0, 1, 2, 3], "model-a")
        == hashlib.blake2b(data, digest_size=16).digest()
    )


def test_chain_depends_on_parent_fingerprint_and_tokens():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, "m")
    assert block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4, "m")[1] != a[1]  # parent changed
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, "n")[0] != a[0]  # fingerprint changed
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 9], 4, "m")[0] == a[0]  # only block 1 differs
    # Fingerprint and tokens are length-delimited: no shifting bytes between them.
    assert hash_block(ROOT_HASH, [1], "ab") != hash_block(ROOT_HASH, [1], "a")


def test_partial_trailing_block_has_no_hash():
    assert len(block_hashes(list(range(15)), 4, "m")) == 3
    assert block_hashes([1, 2, 3], 4, "m") == []


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="16 bytes"):
        hash_block(b"short", [1], "m")
    with pytest.raises(ValueError, match="positive"):
        block_hashes([1], 0, "m")
