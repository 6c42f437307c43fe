"""The one KV byte layout: how one layer's KV of some blocks travels and is stored.

The bytes of ``n`` blocks of one layer are **block-major**: block after block; within a block,
K then V; each ``[block_size, kv_heads, head_dim]`` in the layout's dtype, C order, little-endian
(the host order of every machine we run on). That is, the bytes of a C-contiguous tensor
``[n, 2, block_size, kv_heads, head_dim]``. Several layers (a kvstore write-back) are layer
after layer, each in this layout.

Why block-major: a block is what every party addresses (by its content hash), so its bytes are
one contiguous run. The kvstore keeps each block's layer as one opaque slab of
``block_nbytes`` bytes and serves a run of blocks by joining them; a chunk of whole blocks of
the prefill→decode handoff, and the delta after a copy (``KVLayout.first_block``), is a
contiguous byte range, sent without a gather.

The engine's tensor for a layer is ``[2, n, block_size, kv_heads, head_dim]`` (K and V are
separate pools; ``KVLayout.shape``). ``KVCache.export_layer`` returns it as a view of
block-major memory, so ``encode`` copies nothing; ``decode`` returns the same kind of view over
the received bytes, which ``KVCache.import_layer`` writes in place. Every party uses these two
functions:

- prefill→decode handoff: ``services/prefill/clients.py`` (gRPC stream) and
  ``dataplane_transport.py`` (data plane) encode; ``services/decode/transfer.py`` decodes;
- kvstore: ``services/prefill/kvstore_client.py`` encodes write-backs and decodes reads; the
  store node (``services/kvstore``) only moves whole block slabs and never looks inside;
- tests build and read KV with them too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from services.common.errors import InvalidRequestError
from services.common.kv_layout import KVLayout

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def block_nbytes(dtype: str, block_shape: Sequence[int]) -> int:
    """Bytes of one block of one layer (its K and V): the kvstore's ``layer_bytes``."""
    if dtype not in TORCH_DTYPES:
        raise InvalidRequestError(f"no KV wire dtype {dtype!r}")
    return 2 * math.prod(block_shape) * TORCH_DTYPES[dtype].itemsize


def layout_block_nbytes(layout: KVLayout) -> int:
    return block_nbytes(layout.dtype, layout.block_shape)


def block_major(data: torch.Tensor) -> torch.Tensor:
    """``[2, n, ...]`` as the C-contiguous ``[n, 2, ...]`` tensor whose bytes are the wire's:
    no copy when ``data`` already is a view of block-major memory (``export_layer``'s)."""
    return _check_kv(data).transpose(0, 1).contiguous()


def _check_kv(data: torch.Tensor) -> torch.Tensor:
    if data.dim() < 2 or data.shape[0] != 2:
        raise InvalidRequestError(f"KV tensor must be [2, blocks, ...], got {list(data.shape)}")
    return data


def empty_layer(dtype: torch.dtype, num_blocks: int, block_shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised ``[2, n, ...]`` layer over block-major memory (so it encodes free)."""
    return torch.empty((num_blocks, 2, *block_shape), dtype=dtype).transpose(0, 1)


def encode(data: torch.Tensor, first: int = 0, count: int | None = None) -> np.ndarray:
    """The wire bytes (a uint8 array, a view when possible) of blocks ``[first, first+count)``
    of the layer ``data`` ``[2, n, ...]`` (all of them by default). CPU tensors only."""
    blocks = block_major(data)
    end = blocks.shape[0] if count is None else first + count
    return blocks[first:end].cpu().reshape(-1).view(torch.uint8).numpy()


def encode_layers(layers: Sequence[torch.Tensor], blocks: Sequence[int]) -> np.ndarray:
    """Blocks ``blocks`` of every layer in ``layers`` (each ``[2, n, ...]``), layer after layer:
    the payload of a kvstore ``KVDataWrite``."""
    layers = [_check_kv(data) for data in layers]
    index = torch.tensor(list(blocks), dtype=torch.long, device=layers[0].device)
    first = layers[0]
    # One copy of the chosen blocks, straight into the payload, from whatever layout each
    # layer has (a 2,000-token prompt of a 30-layer model is ~90 MB: making each layer
    # block-major, selecting and stacking copied it up to three times).
    out = torch.empty((len(layers), len(index), 2, *first.shape[2:]), dtype=first.dtype,
                      device=first.device)  # fmt: skip
    for i, data in enumerate(layers):
        torch.index_select(data.transpose(0, 1), 0, index, out=out[i])
    return out.cpu().reshape(-1).view(torch.uint8).numpy()


def decode(
    payload: bytes | bytearray | memoryview,
    dtype: str,
    block_shape: Sequence[int],
    num_blocks: int | None = None,
) -> torch.Tensor:
    """The ``[2, n, ...]`` layer whose wire bytes are ``payload``, a view of the payload when
    it is writable (read-only bytes are copied first: torch may not view them).
    InvalidRequestError if the bytes are not whole blocks, or not ``num_blocks`` of them."""
    view = memoryview(payload).cast("B")
    size = block_nbytes(dtype, block_shape)
    if view.nbytes % size or (num_blocks is not None and view.nbytes != num_blocks * size):
        want = "whole blocks" if num_blocks is None else f"{num_blocks} blocks"
        raise InvalidRequestError(f"{view.nbytes} bytes are not {want} of {size} bytes")
    if view.nbytes == 0:  # torch cannot view an empty buffer
        return empty_layer(TORCH_DTYPES[dtype], 0, block_shape)
    if view.readonly:
        view = memoryview(bytearray(view))
    flat = torch.frombuffer(view, dtype=torch.uint8).view(TORCH_DTYPES[dtype])
    return flat.view(view.nbytes // size, 2, *block_shape).transpose(0, 1)


def decode_blocks(
    payload: bytes | bytearray | memoryview, layout: KVLayout, num_blocks: int
) -> torch.Tensor:
    """``decode`` with ``layout``'s dtype and block shape."""
    return decode(payload, layout.dtype, layout.block_shape, num_blocks)
