"""Fuzzing the kvstore node: KVStoreService (Lookup, Pin, Unpin, Reserve, Commit, Abort, Stats)
and its data plane (``KVDataRequest`` reads and writes over TCP). Besides the descriptor
walker's inputs, a two-phase write done right and then broken a little (reserve, writes,
commit) and pinned reads of what was written (scenarios.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.rpc.gen.banaserve.v1 import kvstore_pb2
from tests.fuzz import hints
from tests.fuzz.conftest import MARKS, fuzz_settings
from tests.fuzz.dataplanes import DataPlaneTarget, data_call, data_plane_headers
from tests.fuzz.harness import ALWAYS, Call, calls, methods
from tests.fuzz.scenarios import kv_read, kv_writes, mutated
from tests.fuzz.strategies import binaries

pytestmark = MARKS

# Besides OK and INVALID_ARGUMENT (kvstore.proto, docs/kvstore.md): Unpin and Abort are
# idempotent (OK for any id), Commit of an unknown reservation is NOT_FOUND.
KVSTORE = methods(
    kvstore_pb2.DESCRIPTOR.services_by_name["KVStoreService"],
    "kvstore",
    {
        "Lookup": set(),
        "Pin": set(),
        "Unpin": set(),
        "Reserve": {"RESOURCE_EXHAUSTED"},
        "Commit": {"NOT_FOUND"},
        "Abort": set(),
        "Stats": set(),
    },
    invariants={"Pin": lambda replies: check_pin(replies[0])},
)
BY_NAME = {m.name: m for m in KVSTORE}


def check_pin(reply: kvstore_pb2.PinResponse) -> None:
    # kvstore.proto: "0 when nothing was pinned; else names the pin".
    assert (reply.pin_id == 0) == (reply.num_pinned == 0), f"Pin answered {reply}"


# A read of a pin or a write of a reservation that is not open: NOT_FOUND.
DATA_PLANE = ALWAYS | {"NOT_FOUND"}


SEEDS = {
    "Lookup": [kvstore_pb2.LookupRequest(block_hashes=[b"\x01" * 16, b"\x02" * 16])],
    "Pin": [kvstore_pb2.PinRequest(block_hashes=[b"\x01" * 16])],
    "Reserve": [
        kvstore_pb2.ReserveRequest(
            block_hashes=[b"\x03" * 16, b"\x04" * 16], num_layers=2, layer_bytes=64
        )
    ],
    "Commit": [kvstore_pb2.CommitRequest(reservation_id=1)],
    "Unpin": [kvstore_pb2.UnpinRequest(pin_id=1)],
}
DATA_SEEDS = [
    kvstore_pb2.KVDataRequest(read=kvstore_pb2.KVDataRead(pin_id=1, layer=0, num_blocks=1)),
    kvstore_pb2.KVDataRequest(
        write=kvstore_pb2.KVDataWrite(reservation_id=1, layer=0, block_hashes=[b"\x03" * 16])
    ),
]


@pytest.fixture(scope="module")
def kvstore_strategies(fuzz_cluster):
    h = hints.kvstore(fuzz_cluster)
    header = data_plane_headers(kvstore_pb2.KVDataRequest.DESCRIPTOR, h, DATA_SEEDS)
    payload = st.one_of(binaries(), st.sampled_from([8, 64, 128, 4096]).map(bytes))
    return {
        "calls": {m.name: calls(m, h, SEEDS.get(m.name, ())) for m in KVSTORE},
        "message": st.tuples(header, payload),
        "plane": DataPlaneTarget(
            "kvstore data plane",
            lambda: fuzz_cluster.kvstore_data,
            kvstore_pb2.KVDataRequest,
            DATA_PLANE,
        ),
    }


def write(cluster, fuzzer, strategies, data) -> None:
    """Reserve fresh blocks, write them (mutated messages), commit (checked like any call)."""
    hashes = data.draw(
        st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=3, unique=True),
        label="hashes",
    )
    num_layers = data.draw(st.integers(1, 3), label="layers")
    layer_bytes = data.draw(st.sampled_from([8, 64]), label="layer bytes")
    request = kvstore_pb2.ReserveRequest(
        block_hashes=hashes, num_layers=num_layers, layer_bytes=layer_bytes
    )
    reply = cluster.kvstore.Reserve(request, timeout=10)
    cluster.learn(BY_NAME["Reserve"].path, request.SerializeToString(), [reply.SerializeToString()])
    written = [hashes[i] for i in reply.to_write]
    split = data.draw(st.booleans(), label="split")
    valid = kv_writes(reply.reservation_id, written, num_layers, layer_bytes, split)
    messages = data.draw(mutated(valid, strategies["message"]), label="messages")
    data_call(fuzzer, cluster.data_plane, strategies["plane"], messages)
    commit = kvstore_pb2.CommitRequest(reservation_id=reply.reservation_id).SerializeToString()
    cluster.fuzz(fuzzer, "kvstore-0", BY_NAME["Commit"], Call((commit,), 10.0))


def read(cluster, fuzzer, strategies, data) -> None:
    """Pin blocks written before, read their layers (mutated messages), unpin."""
    request = kvstore_pb2.PinRequest(block_hashes=cluster.opened.kv_hashes[-3:])
    pin = cluster.kvstore.Pin(request, timeout=10)
    # Remembered at once: hypothesis may end the test case at any draw below, and ``trim``
    # unpins what the fuzzer holds.
    cluster.learn(BY_NAME["Pin"].path, request.SerializeToString(), [pin.SerializeToString()])
    valid = [kv_read(pin.pin_id, layer, pin.num_pinned) for layer in range(pin.num_layers)]
    messages = data.draw(mutated(valid, strategies["message"]), label="messages")
    data_call(fuzzer, cluster.data_plane, strategies["plane"], messages)
    unpin = kvstore_pb2.UnpinRequest(pin_id=pin.pin_id).SerializeToString()
    cluster.fuzz(fuzzer, "kvstore-0", BY_NAME["Unpin"], Call((unpin,), 10.0))


@fuzz_settings("kvstore")
@given(data=st.data())
def test_fuzz_every_kvstore_rpc(fuzz_cluster, fuzzer, kvstore_strategies, data):
    method = data.draw(st.sampled_from(KVSTORE), label="method")
    call = data.draw(kvstore_strategies["calls"][method.name], label="call")
    fuzz_cluster.fuzz(fuzzer, "kvstore-0", method, call)


@fuzz_settings("kvstore data plane")
@given(data=st.data())
def test_fuzz_the_kvstore_data_plane(fuzz_cluster, fuzzer, kvstore_strategies, data):
    kind = data.draw(st.sampled_from(["generic", "write", "read"]), label="kind")
    if kind == "write":
        write(fuzz_cluster, fuzzer, kvstore_strategies, data)
    elif kind == "read":
        read(fuzz_cluster, fuzzer, kvstore_strategies, data)
    else:
        messages = data.draw(
            st.lists(kvstore_strategies["message"], min_size=1, max_size=4), label="messages"
        )
        data_call(fuzzer, fuzz_cluster.data_plane, kvstore_strategies["plane"], messages)
    fuzz_cluster.trim()


def test_kvstore_serves_and_holds_nothing_after_the_fuzz(fuzz_cluster):
    fuzz_cluster.assert_healthy()
    fuzz_cluster.release_all_and_assert_no_leaks()
