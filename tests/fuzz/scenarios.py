"""Near-valid message sequences: a protocol done right, then broken a little.

The descriptor walker alone rarely gets past a call's first check (a reservation id that
exists, a layout that matches it), so some inputs start from a correct sequence (a KV
transfer's header, chunks and end; a kvstore write and commit, a pin and a read) and apply up
to three mutations: drop, duplicate, swap, insert a fuzzed frame, replace one with a fuzzed
frame, cut the sequence short. The fuzzed frames come from the walker too.
"""

from __future__ import annotations

from typing import Any, TypeVar

from hypothesis import strategies as st

from services.rpc.gen.banaserve.v1 import decode_pb2, kvstore_pb2
from tests.fuzz.cluster import ModelFacts
from tests.fuzz.strategies import weighted

T = TypeVar("T")
_OPS = ("drop", "dup", "swap", "insert", "replace", "cut")


def _apply(valid: list[T], ops: list[tuple[str, int, T]]) -> list[T]:
    frames = list(valid)
    for op, i, fuzzed in ops:
        if not frames and op != "insert":
            continue
        i %= max(1, len(frames))
        if op == "drop":
            del frames[i]
        elif op == "dup":
            frames.insert(i, frames[i])
        elif op == "swap":
            frames[i], frames[-1] = frames[-1], frames[i]
        elif op == "insert":
            frames.insert(i, fuzzed)
        elif op == "replace":
            frames[i] = fuzzed
        else:
            del frames[i:]
    return frames


def mutated(valid: list[T], fuzzed: st.SearchStrategy[T]) -> st.SearchStrategy[list[T]]:
    """``valid`` as it is, or with up to three mutations (module docstring)."""
    ops = st.lists(st.tuples(st.sampled_from(_OPS), st.integers(0, 63), fuzzed), max_size=3)
    # Not st.just(valid): hypothesis would build a repr of megabytes of KV for it.
    unchanged = st.none().map(lambda _: list(valid))
    return weighted((1, unchanged), (3, ops.map(lambda o: _apply(valid, o))))


# -- a KV transfer into a decode worker ----------------------------------------------------


def _chunks(model: ModelFacts, num_blocks: int, split: bool) -> list[tuple[int, int, int]]:
    """(layer, first_block, num_blocks) covering every layer: whole, or block by block."""
    step = 1 if split else num_blocks
    return [
        (layer, first, min(step, num_blocks - first))
        for layer in range(model.num_layers)
        for first in range(0, num_blocks, step)
    ]


def transfer_frames(
    model: ModelFacts, request_id: str, reservation_id: str, prompt: tuple[int, ...], split: bool
) -> list[bytes]:
    """A correct TransferKV stream for a reservation (zeros for KV)."""
    header = decode_pb2.KVTransferHeader(
        request_id=request_id, reservation_id=reservation_id, layout=model.layout(prompt)
    )
    frames = [decode_pb2.TransferKVRequest(header=header)]
    for layer, first, n in _chunks(model, model.num_blocks(len(prompt)), split):
        chunk = decode_pb2.TransferKVRequest()
        chunk.layer.layer, chunk.layer.first_block, chunk.layer.num_blocks = layer, first, n
        chunk.layer.data = bytes(n * model.block_bytes)
        frames.append(chunk)
    frames.append(decode_pb2.TransferKVRequest(end=decode_pb2.KVTransferEnd(first_token_id=9)))
    return [f.SerializeToString() for f in frames]


def transfer_messages(
    model: ModelFacts, request_id: str, reservation_id: str, prompt: tuple[int, ...], split: bool
) -> list[tuple[bytes, bytes]]:
    """The same transfer as data-plane messages: ``KVTransferFrame`` headers, KV payloads."""
    header = decode_pb2.KVTransferHeader(
        request_id=request_id, reservation_id=reservation_id, layout=model.layout(prompt)
    )
    frames: list[tuple[Any, bytes]] = [(decode_pb2.KVTransferFrame(header=header), b"")]
    for layer, first, n in _chunks(model, model.num_blocks(len(prompt)), split):
        layer_frame = decode_pb2.KVTransferLayer(layer=layer, first_block=first, num_blocks=n)
        frames.append((decode_pb2.KVTransferFrame(layer=layer_frame), bytes(n * model.block_bytes)))
    frames.append((decode_pb2.KVTransferFrame(end=decode_pb2.KVTransferEnd(first_token_id=9)), b""))
    for frame, _ in frames:
        frame.reservation_id = reservation_id
    return [(f.SerializeToString(), payload) for f, payload in frames]


# -- the kvstore's data plane --------------------------------------------------------------


def kv_writes(
    reservation_id: int, hashes: list[bytes], num_layers: int, layer_bytes: int, split: bool
) -> list[tuple[bytes, bytes]]:
    """Every layer of every block of a reservation: in one write message, or one per layer."""
    runs = [(layer, 1) for layer in range(num_layers)] if split else [(0, num_layers)]
    messages = []
    for first, n in runs:
        write = kvstore_pb2.KVDataWrite(
            reservation_id=reservation_id, layer=first, block_hashes=hashes, num_layers=n
        )
        payload = bytes(range(256)) * (len(hashes) * n * layer_bytes // 256) + bytes(
            len(hashes) * n * layer_bytes % 256
        )
        messages.append((kvstore_pb2.KVDataRequest(write=write).SerializeToString(), payload))
    return messages


def kv_read(pin_id: int, layer: int, num_blocks: int) -> tuple[bytes, bytes]:
    read = kvstore_pb2.KVDataRead(pin_id=pin_id, layer=layer, num_blocks=num_blocks)
    return kvstore_pb2.KVDataRequest(read=read).SerializeToString(), b""
