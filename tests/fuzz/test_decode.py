"""Fuzzing the decode worker: DecodeService (ReserveKV, the TransferKV client stream, the
StreamTokens server stream, Release, RenewLease, Stats) and its KV data plane (``KVTransferFrame`` messages
over TCP). Half the inputs are the descriptor walker's, half a KV handoff into a fresh
reservation done right and then broken a little (scenarios.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.rpc.gen.banaserve.v1 import decode_pb2
from tests.fuzz import hints
from tests.fuzz.cluster import GREEDY, PROMPTS, FuzzCluster
from tests.fuzz.conftest import MARKS, fuzz_settings
from tests.fuzz.dataplanes import DataPlaneTarget, data_call, data_plane_headers
from tests.fuzz.harness import ALWAYS, Call, calls, methods
from tests.fuzz.scenarios import mutated, transfer_frames, transfer_messages
from tests.fuzz.strategies import binaries, payloads

pytestmark = MARKS

# Besides OK and INVALID_ARGUMENT (decode.proto, docs/services.md).
DECODE = methods(
    decode_pb2.DESCRIPTOR.services_by_name["DecodeService"],
    "decode",
    {
        # FAILED_PRECONDITION: prefill_locally on a decode worker; DEADLINE_EXCEEDED: the
        # request's `timeout` already passed.
        "ReserveKV": {
            "RESOURCE_EXHAUSTED",
            "OUT_OF_RANGE",
            "ALREADY_EXISTS",
            "FAILED_PRECONDITION",
            "DEADLINE_EXCEEDED",
        },
        "TransferKV": {"NOT_FOUND"},
        "StreamTokens": {"NOT_FOUND"},
        "Release": set(),
        # NOT_FOUND: no such reservation (or gone); DEADLINE_EXCEEDED: its request's deadline.
        "RenewLease": {"NOT_FOUND", "DEADLINE_EXCEEDED"},
        "Stats": set(),
    },
    deadline_ok=("StreamTokens",),
)
BY_NAME = {m.name: m for m in DECODE}
# The data plane answers as TransferKV does; a message for no open transfer: NOT_FOUND.
DATA_PLANE = ALWAYS | {"NOT_FOUND"}


SEEDS = {
    "ReserveKV": [
        decode_pb2.ReserveKVRequest(
            request_id="fuzz-0", prompt_token_ids=PROMPTS[1], sampling=GREEDY
        )
    ],
    "StreamTokens": [decode_pb2.StreamTokensRequest(request_id="fuzz-0")],
    "Release": [decode_pb2.ReleaseRequest(request_id="fuzz-0", reason=1)],
}
_LAYER = decode_pb2.KVTransferLayer(layer=0, first_block=0, num_blocks=1)
DATA_SEEDS = [
    decode_pb2.KVTransferFrame(reservation_id="r", layer=_LAYER),
    decode_pb2.KVTransferFrame(reservation_id="r", end=decode_pb2.KVTransferEnd()),
    decode_pb2.KVTransferFrame(reservation_id="r", abort=decode_pb2.KVTransferAbort()),
]


@pytest.fixture(scope="module")
def decode_strategies(fuzz_cluster: FuzzCluster):
    h = hints.decode(fuzz_cluster)
    frame = data_plane_headers(decode_pb2.KVTransferFrame.DESCRIPTOR, h, DATA_SEEDS)
    block = fuzz_cluster.model.block_bytes
    payload = st.one_of(binaries(), st.integers(1, 3).map(lambda n: bytes(n * block)))
    return {
        "calls": {m.name: calls(m, h, SEEDS.get(m.name, ())) for m in DECODE},
        "frame": payloads(decode_pb2.TransferKVRequest.DESCRIPTOR, h),
        "message": st.tuples(frame, payload),
        "plane": DataPlaneTarget(
            "decode data plane",
            lambda: fuzz_cluster.decode_data,
            decode_pb2.KVTransferFrame,
            DATA_PLANE,
        ),
    }


def stream_tokens(cluster: FuzzCluster, fuzzer, request_id: str, data) -> None:
    request = decode_pb2.StreamTokensRequest(request_id=request_id).SerializeToString()
    cancel = data.draw(st.one_of(st.none(), st.integers(1, 2)), label="cancel after")
    cluster.fuzz(fuzzer, "decode-0", BY_NAME["StreamTokens"], Call((request,), 0.5, cancel))


@fuzz_settings("decode")
@given(data=st.data())
def test_fuzz_every_decode_rpc(fuzz_cluster, fuzzer, decode_strategies, data):
    if data.draw(st.booleans(), label="generic"):
        method = data.draw(st.sampled_from(DECODE), label="method")
        call = data.draw(decode_strategies["calls"][method.name], label="call")
        fuzz_cluster.fuzz(fuzzer, "decode-0", method, call)
        return
    prompt = data.draw(st.sampled_from(PROMPTS), label="prompt")
    request_id, reservation_id = fuzz_cluster.reserve(prompt)
    split = data.draw(st.booleans(), label="split")
    valid = transfer_frames(fuzz_cluster.model, request_id, reservation_id, prompt, split)
    frames = data.draw(mutated(valid, decode_strategies["frame"]), label="frames")
    broken = data.draw(st.booleans(), label="break") and frames != valid
    transfer = Call(tuple(frames), 10.0, break_stream=broken)
    fuzz_cluster.fuzz(fuzzer, "decode-0", BY_NAME["TransferKV"], transfer)
    stream_tokens(fuzz_cluster, fuzzer, request_id, data)


@fuzz_settings("decode data plane")
@given(data=st.data())
def test_fuzz_the_decode_data_plane(fuzz_cluster, fuzzer, decode_strategies, data):
    plane, message = decode_strategies["plane"], decode_strategies["message"]
    if data.draw(st.booleans(), label="generic"):
        messages = data.draw(st.lists(message, min_size=1, max_size=4), label="messages")
        data_call(fuzzer, fuzz_cluster.data_plane, plane, messages)
        fuzz_cluster.trim()
        return
    prompt = data.draw(st.sampled_from(PROMPTS), label="prompt")
    request_id, reservation_id = fuzz_cluster.reserve(prompt)
    split = data.draw(st.booleans(), label="split")
    valid = transfer_messages(fuzz_cluster.model, request_id, reservation_id, prompt, split)
    messages = data.draw(mutated(valid, message), label="messages")
    data_call(fuzzer, fuzz_cluster.data_plane, plane, messages)
    stream_tokens(fuzz_cluster, fuzzer, request_id, data)


def test_decode_serves_and_holds_nothing_after_the_fuzz(fuzz_cluster):
    fuzz_cluster.assert_healthy()
    fuzz_cluster.release_all_and_assert_no_leaks()
