"""Values the descriptor walker mixes in beside its generic ones (strategies.py, ``hints``): the
few that a blind walker would hardly hit but that lead past the first check of each call, so
the fuzz also reaches reservations, transfers, decoding, pins and writes. Each is drawn about
half the time for its field, the generic value otherwise.

Ids come from a small pool (so calls collide: a duplicate, a release of a live request) and from
what the servers handed out earlier in the run (``Opened``); prompts from ``PROMPTS`` (so a
reservation, its layout and its KV chunks can match).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.duration_pb2 import Duration
from hypothesis import strategies as st

from services.rpc.gen.banaserve.v1 import common_pb2, kvstore_pb2
from tests.fuzz.cluster import PROMPTS, FuzzCluster
from tests.fuzz.strategies import Hints

FUZZ_IDS = ("fuzz-0", "fuzz-1", "fuzz-2")
P = "banaserve.v1."


def _ids(*extra: Any) -> st.SearchStrategy[str]:
    return st.sampled_from([*FUZZ_IDS, *extra])


def sampling() -> Hints:
    """Sampling parameters that pass validation, and a few that just do not."""
    s = P + "SamplingParams."
    return {
        s + "temperature": st.sampled_from([0.0, 0.0, 0.7, -0.0, 1e-9]),
        s + "top_p": st.sampled_from([1.0, 0.5, 1e-300]),
        s + "top_k": st.integers(0, 50),
        s + "max_tokens": st.integers(0, 8),
        s + "seed": st.integers(0, 3),
        s + "stop": st.lists(st.sampled_from(["a", "\n", "the"]), max_size=2),
        s + "stop_token_ids": st.lists(st.integers(0, 4095), max_size=3),
        s + "detokenize": st.booleans(),
    }


def prompts(vocab_size: int) -> st.SearchStrategy[list[int]]:
    return st.one_of(
        st.sampled_from(PROMPTS).map(list),
        st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=64),
        st.sampled_from([vocab_size - 1, vocab_size]).map(lambda t: [t] * 3),
    )


def durations(*seconds: float) -> st.SearchStrategy[Duration]:
    def make(s: float) -> Duration:
        d = Duration()
        d.FromNanoseconds(round(s * 1e9))
        return d

    return st.sampled_from(seconds).map(make)


def router(c: FuzzCluster) -> Hints:
    w = P + "WorkerInfo."
    addresses = [c.address(n) for n in ("router", "prefill-0", "decode-0")]
    return {
        **sampling(),
        P + "GenerateRequest.request_id": _ids(),
        P + "AbortRequest.request_id": _ids(),
        P + "GenerateRequest.model": st.just("tiny-llama"),
        P + "GenerateRequest.text": st.sampled_from(["Hello there", "1 2 3", "word " * 600]),
        P + "TokenIds.ids": prompts(c.model.vocab_size),
        w + "worker_id": _ids(*c.worker_ids.values()),
        w + "address": st.sampled_from([*addresses, "127.0.0.1:1"]),
        w + "model": st.just("tiny-llama"),
        w + "fingerprint": st.just(c.model.fingerprint),
        w + "block_size": st.just(c.model.block_size),
        w + "num_kv_blocks": st.integers(0, 1024),
        w + "max_model_len": st.sampled_from([0, 1, 2, 2048, 4096]),
    }


def _target(c: FuzzCluster) -> Hints:
    t = P + "KVTarget."
    addresses = [c.address(n) for n in ("decode-0", "prefill-0", "router")]
    return {
        t + "worker_id": st.sampled_from(list(c.worker_ids.values())),
        t + "address": st.sampled_from([*addresses, "127.0.0.1:1", "localhost"]),
        t + "reservation_id": c.opened.reservation_ids,
        t + "data_address": st.sampled_from([c.decode_data, c.kvstore_data, "127.0.0.1:1"]),
        t + "data_transport": st.sampled_from([kvstore_pb2.DATA_TRANSPORT_TCP]),
        t + "first_block": st.integers(0, 40),  # the prompts' own blocks and past them
    }


def decode(c: FuzzCluster) -> Hints:
    """Decode's gRPC methods and its data plane (``KVTransferFrame``)."""
    m = c.model
    chunk = st.builds(
        common_pb2.KVLayerChunk,
        layer=st.integers(0, m.num_layers),
        first_block=st.integers(0, 3),
        num_blocks=st.integers(1, 3),
    ).map(_with_data(m.block_bytes))
    layouts = st.sampled_from([m.layout(p) for p in PROMPTS])
    return {
        **sampling(),
        P + "ReserveKVRequest.request_id": _ids(),
        P + "ReserveKVRequest.prompt_token_ids": prompts(m.vocab_size),
        P + "ReserveKVRequest.lease": durations(0.001, 0.5, 2.0, 120.0),
        P + "ReserveKVRequest.timeout": durations(0.001, 0.5, 5.0),
        P + "ReserveKVRequest.prefill_locally": st.just(False),
        P + "StreamTokensRequest.request_id": c.opened.decode_ids,
        P + "ReleaseRequest.request_id": c.opened.decode_ids,
        P + "RenewLeaseRequest.request_id": c.opened.decode_ids,
        P + "RenewLeaseRequest.reservation_id": c.opened.reservation_ids,
        P + "RenewLeaseRequest.lease": durations(0.001, 0.5, 2.0, 120.0),
        P + "KVTransferHeader.request_id": c.opened.decode_ids,
        P + "KVTransferHeader.reservation_id": c.opened.reservation_ids,
        P + "KVTransferHeader.layout": layouts,
        P + "KVTransferFrame.reservation_id": c.opened.reservation_ids,
        P + "TransferKVRequest.layer": chunk,
        P + "KVTransferLayer.layer": st.integers(0, m.num_layers),
        P + "KVTransferLayer.first_block": st.integers(0, 3),
        P + "KVTransferLayer.num_blocks": st.integers(1, 3),
        P + "KVTransferEnd.first_token_id": st.integers(0, m.vocab_size),
    }


def _with_data(block_bytes: int) -> Any:
    def fill(chunk: Any) -> Any:
        chunk.data = bytes(block_bytes * chunk.num_blocks)
        return chunk

    return fill


def prefill(c: FuzzCluster) -> Hints:
    return {
        **sampling(),
        **_target(c),
        P + "PrefillRequest.request_id": lambda: [*FUZZ_IDS, *c.opened.decode],
        P + "PrefillRequest.prompt_token_ids": prompts(c.model.vocab_size),
    }


def kvstore(c: FuzzCluster) -> Hints:
    """The kvstore's gRPC methods and its data plane (``KVDataRequest``)."""
    o = c.opened
    hashes = st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=4, unique=True)
    return {
        P + "LookupRequest.block_hashes": st.one_of(hashes, st.builds(lambda: o.kv_hashes[:4])),
        P + "PinRequest.block_hashes": lambda: [o.kv_hashes[-4:], o.kv_hashes[:2]],
        P + "ReserveRequest.block_hashes": hashes,
        P + "ReserveRequest.num_layers": st.integers(1, 4),
        P + "ReserveRequest.layer_bytes": st.sampled_from([1, 8, 64, 4096]),
        P + "UnpinRequest.pin_id": lambda: list(o.pins),
        P + "CommitRequest.reservation_id": lambda: list(o.kv_reservations),
        P + "KVStoreServiceAbortRequest.reservation_id": lambda: list(o.kv_reservations),
        P + "KVDataRead.pin_id": lambda: list(o.pins),
        P + "KVDataRead.layer": st.integers(0, 4),
        P + "KVDataRead.num_blocks": st.integers(0, 4),
        P + "KVDataWrite.reservation_id": lambda: list(o.kv_reservations),
        P + "KVDataWrite.layer": st.integers(0, 4),
        P + "KVDataWrite.block_hashes": lambda: [h for h, _, _ in o.kv_reservations.values()],
        P + "KVDataWrite.num_layers": st.integers(0, 4),
    }
