"""One KV byte layout (services/common/kv_wire.py): block-major, used alike by the
prefill→decode handoff (gRPC stream and data plane), the kvstore and the engine."""

from __future__ import annotations

import pytest
import torch

from services.common import kv_wire
from services.common.errors import InvalidRequestError
from services.common.kv_layout import KVLayout
from services.decode.transfer import LayerAssembler, LayerChunk
from services.engine.kv_cache import KVCache
from services.prefill.clients import layer_chunks
from services.prefill.dataplane_transport import layer_messages

BLOCK = (4, 2, 3)  # block_size, kv_heads, head_dim
BLOCK_BYTES = 2 * 4 * 2 * 3 * 4  # K and V of one block, float32


def cache_with_values(num_blocks: int = 6) -> KVCache:
    cache = KVCache(range(2), num_blocks, *BLOCK, dtype=torch.float32)
    for layer in range(2):
        k, v = cache.layer(layer)
        n = k.numel()
        k.copy_(torch.arange(n, dtype=torch.float32).view(k.shape) + 1000 * layer)
        v.copy_(-torch.arange(n, dtype=torch.float32).view(v.shape) - 1000 * layer)
    return cache


def layout(num_blocks: int, layer: int = 1) -> KVLayout:
    return KVLayout("fp", layer, num_blocks * BLOCK[0], (), "float32", *BLOCK)


def exported(block_ids: list[int]) -> tuple[KVCache, torch.Tensor]:
    cache = cache_with_values()
    return cache, cache.export_layer(1, block_ids, layout(len(block_ids)))


def by_hand(cache: KVCache, layer: int, block_ids: list[int]) -> bytes:
    """Block after block, each block's K then V: the documented order, written out."""
    k, v = cache.layer(layer)
    return b"".join(k[b].numpy().tobytes() + v[b].numpy().tobytes() for b in block_ids)


def test_the_wire_is_block_major_and_encoding_an_export_copies_nothing():
    cache, data = exported([5, 0, 3])
    assert kv_wire.layout_block_nbytes(layout(3)) == BLOCK_BYTES
    assert tuple(data.shape) == layout(3).shape == (2, 3, *BLOCK)
    payload = kv_wire.encode(data)
    assert payload.tobytes() == by_hand(cache, 1, [5, 0, 3])
    assert payload.ctypes.data == data.data_ptr()  # a view of the exported tensor
    assert kv_wire.encode(data, 1, 1).tobytes() == by_hand(cache, 1, [0])


def test_store_and_handoff_encode_identically():
    cache, data = exported([5, 0, 3, 1])
    want = by_hand(cache, 1, [5, 0, 3, 1])
    chunk = 2 * BLOCK_BYTES  # two blocks a chunk
    grpc_stream = b"".join(c.data for c in layer_chunks(data, 1, chunk))
    data_plane = b"".join(bytes(m.payload) for m in layer_messages(data, 1, "r1", chunk))
    # A kvstore write-back of blocks 1 and 3 of two layers: layer after layer.
    other = cache.export_layer(0, [5, 0, 3, 1], layout(4, layer=0))
    store = kv_wire.encode_layers([other, data], [1, 3]).tobytes()
    assert grpc_stream == data_plane == want
    assert store == by_hand(cache, 0, [0, 1]) + by_hand(cache, 1, [0, 1])
    # A store node keeps each block's slab as is: slab i is the handoff's block i.
    assert [want[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES] for i in range(4)] == [
        c.data for c in layer_chunks(data, 1, BLOCK_BYTES)
    ]


def test_a_write_back_payload_is_the_same_from_any_layer_layout():
    """``encode_layers`` takes a layer as exported (a view of block-major memory) or as any
    ``[2, n, ...]`` tensor (contiguous, or a slice of one): the bytes are the blocks'."""
    cache, data = exported([5, 0, 3, 1])
    plain = data.contiguous()  # [2, n, ...] laid out key-major: not a view of the wire
    assert not plain.transpose(0, 1).is_contiguous()
    sliced = torch.cat([plain, plain], dim=1)[:, 4:]  # a slice: another layout, same values
    want = by_hand(cache, 1, [3, 5]) * 3
    for layers in ([data, plain, sliced], [plain, sliced, data]):
        assert kv_wire.encode_layers(layers, [2, 0]).tobytes() == want
    with pytest.raises(InvalidRequestError, match="must be \\[2, blocks"):
        kv_wire.encode_layers([data, data[0]], [0])


def test_every_reader_decodes_what_any_writer_encoded():
    cache, data = exported([2, 4, 0])
    payload = kv_wire.encode(data).tobytes()
    got = kv_wire.decode(payload, "float32", BLOCK)
    assert torch.equal(got, data)
    # The decode worker assembles a layer from chunks in any order.
    assembler = LayerAssembler(layout(3), num_layers=2)
    assert assembler.add(LayerChunk(1, 2, 1, payload[2 * BLOCK_BYTES :])) is None
    whole = assembler.add(LayerChunk(1, 0, 2, bytearray(payload[: 2 * BLOCK_BYTES])))
    assert whole is not None and torch.equal(whole, data)
    # The engine imports decoded bytes in place (a view of the received buffer).
    target = KVCache(range(2), 3, *BLOCK, dtype=torch.float32)
    target.import_layer(
        [0, 1, 2], kv_wire.decode_blocks(bytearray(payload), layout(3), 3), layout(3)
    )
    assert by_hand(target, 1, [0, 1, 2]) == payload


def test_bytes_that_are_not_whole_blocks_are_refused():
    with pytest.raises(InvalidRequestError, match="95 bytes are not whole blocks of 192 bytes"):
        kv_wire.decode(bytes(95), "float32", BLOCK)
    with pytest.raises(InvalidRequestError, match="384 bytes are not 3 blocks of 192 bytes"):
        kv_wire.decode(bytes(384), "float32", BLOCK, 3)
    with pytest.raises(InvalidRequestError, match="no KV wire dtype 'int8'"):
        kv_wire.decode(bytes(96), "int8", BLOCK)
    assert tuple(kv_wire.decode(b"", "float32", BLOCK).shape) == (2, 0, *BLOCK)
