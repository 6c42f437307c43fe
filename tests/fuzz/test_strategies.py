"""The descriptor walker itself (strategies.py), without any server: it builds every request
message of every service, reaches every kind of input it promises, and its wire helpers
encode exactly what protobuf does."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings

from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    dataplane_pb2,
    decode_pb2,
    kvstore_pb2,
    prefill_pb2,
    router_pb2,
)
from tests.fuzz.strategies import (
    HUGE_COUNTS,
    MAX_REPEATED_BYTES,
    edited,
    edits,
    messages,
    payloads,
    record,
    varint,
)

SERVICES = [
    (router_pb2, "RouterService"),
    (prefill_pb2, "PrefillService"),
    (decode_pb2, "DecodeService"),
    (kvstore_pb2, "KVStoreService"),
    (dataplane_pb2, "DataPlaneService"),
]
REQUEST_TYPES = sorted(
    {
        m.input_type.full_name: m.input_type
        for module, name in SERVICES
        for m in module.DESCRIPTOR.services_by_name[name].methods
    }.items()
) + [
    ("banaserve.v1.KVTransferFrame", decode_pb2.KVTransferFrame.DESCRIPTOR),
    ("banaserve.v1.KVDataRequest", kvstore_pb2.KVDataRequest.DESCRIPTOR),
]
QUICK = settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.parametrize("name,descriptor", REQUEST_TYPES, ids=[n for n, _ in REQUEST_TYPES])
def test_every_request_type_is_generated_and_serializes(name, descriptor):
    seen: set[str] = set()

    @QUICK
    @given(messages(descriptor))
    def check(message):
        assert message.DESCRIPTOR.full_name == name
        assert type(message).FromString(message.SerializeToString()) == message
        seen.update(f.name for f, _ in message.ListFields())

    check()
    # Every field, every oneof branch included, is set in some of 60 messages.
    assert seen == {f.name for f in descriptor.fields}


def test_payloads_reach_every_kind_of_input():
    """Among 300 GenerateRequest payloads: undecodable bytes (random, or a string field that
    is not UTF-8), non-finite doubles, huge repeated fields, huge strings, a prompt set."""
    kinds: Counter[str] = Counter()

    @settings(QUICK, max_examples=300)
    @given(payloads(router_pb2.GenerateRequest.DESCRIPTOR))
    def check(data):
        try:
            m = router_pb2.GenerateRequest.FromString(data)
        except Exception:
            kinds["undecodable"] += 1
            return
        t = m.sampling.temperature
        kinds["non-finite"] += m.sampling.HasField("temperature") and not abs(t) < float("inf")
        kinds["huge repeated"] += max(len(m.sampling.stop_token_ids), len(m.token_ids.ids)) > 16
        kinds["huge string"] += max(len(m.request_id), len(m.text), len(m.model)) > 128
        kinds["prompt"] += m.WhichOneof("prompt") is not None

    check()
    assert min(kinds.values()) > 0 and len(kinds) == 5, kinds


def test_edited_replaces_and_clears_fields_one_level_down():
    seed = prefill_pb2.PrefillRequest(
        request_id="q", prompt_token_ids=[5, 6], target=prefill_pb2.KVTarget(address="h:1")
    )
    d = prefill_pb2.PrefillRequest.DESCRIPTOR
    target, address = d.fields_by_name["target"], prefill_pb2.KVTarget.DESCRIPTOR.fields_by_name
    out = edited(
        seed,
        [
            ((d.fields_by_name["request_id"],), None),
            ((target, address["address"]), "x:2"),
            ((d.fields_by_name["prompt_token_ids"],), [9]),
        ],
    )
    assert (out.request_id, out.target.address, list(out.prompt_token_ids)) == ("", "x:2", [9])
    assert seed.request_id == "q"  # the seed is left as it was

    @QUICK
    @given(edits(d))
    def check(edit_list):
        assert len(edit_list) <= 3
        edited(seed, edit_list).SerializeToString()

    check()


def test_huge_repeated_fields_stay_within_the_byte_budget():
    @settings(QUICK, max_examples=200)
    @given(messages(kvstore_pb2.LookupRequest.DESCRIPTOR))
    def check(message):
        assert len(message.block_hashes) <= max(max(HUGE_COUNTS), 6)
        assert message.ByteSize() <= MAX_REPEATED_BYTES + 3 * len(message.block_hashes) + 16

    check()


def test_wire_helpers_encode_as_protobuf_does():
    assert (varint(0), varint(300)) == (b"\x00", b"\xac\x02")
    assert varint(-1) == b"\xff" * 9 + b"\x01"  # a negative int64 takes ten bytes
    assert record(2, 2, b"ab") == common_pb2.TokenDelta(text="ab").SerializeToString()
    assert record(2, 0, varint(5)) == common_pb2.KVLayerChunk(first_block=5).SerializeToString()
