"""KVStoreService keeps kvstore.proto's contract (issue 8, item 6): Abort and Unpin are
idempotent, every call that takes block hashes rejects the same bad hash the same way, and
undecodable request bytes are INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.limits import MAX_BLOCK_HASHES
from services.rpc import dataplane
from services.rpc.gen.banaserve.v1 import kvstore_pb2 as pb
from tests.kvstore.test_servicer import HASHES, LAYER_BYTES, served_node

C = grpc.StatusCode
SHORT = b"abc"  # 3 bytes: no block hash
BAD_HASH = "block_hashes[1] must be a 16-byte block hash, got 3 bytes"


async def error_of(call) -> tuple[C, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


async def assert_idle(stub) -> None:
    stats = await stub.Stats(pb.KVStoreServiceStatsRequest())
    assert (stats.num_pins, stats.num_reservations, stats.num_blocks) == (0, 0, 0)


def test_abort_and_unpin_of_unknown_or_released_ids_answer_ok(redis_server, kv_prefix):
    async def main():
        async with served_node(redis_server.url, kv_prefix, 8 * LAYER_BYTES) as (stub, _):
            await stub.Abort(pb.KVStoreServiceAbortRequest(reservation_id=12345))
            await stub.Unpin(pb.UnpinRequest(pin_id=6789))
            reserve = pb.ReserveRequest(block_hashes=HASHES[:1], num_layers=1, layer_bytes=8)
            reservation = await stub.Reserve(reserve)
            pin = await stub.Pin(pb.PinRequest(block_hashes=HASHES[:1]))
            # Nothing committed yet: no pin is held, so its id is 0 (kvstore.proto).
            assert (pin.num_pinned, pin.pin_id) == (0, 0)
            for _ in range(2):  # the second time the id is gone: still OK
                abort = pb.KVStoreServiceAbortRequest(reservation_id=reservation.reservation_id)
                await stub.Abort(abort)
                await stub.Unpin(pb.UnpinRequest(pin_id=pin.pin_id))
            # Commit is not idempotent: an unknown reservation is still NOT_FOUND.
            commit = pb.CommitRequest(reservation_id=reservation.reservation_id)
            assert (await error_of(stub.Commit(commit)))[0] == C.NOT_FOUND
            await assert_idle(stub)

    asyncio.run(main())


def test_every_call_rejects_a_malformed_hash_the_same_way(redis_server, kv_prefix):
    hashes = [HASHES[0], SHORT]

    async def main():
        async with served_node(redis_server.url, kv_prefix, 8 * LAYER_BYTES) as (stub, client):
            calls = [
                stub.Lookup(pb.LookupRequest(block_hashes=hashes)),
                stub.Pin(pb.PinRequest(block_hashes=hashes)),
                stub.Reserve(pb.ReserveRequest(block_hashes=hashes, num_layers=1, layer_bytes=8)),
            ]
            for call in calls:
                assert await error_of(call) == (C.INVALID_ARGUMENT, BAD_HASH)
            write = pb.KVDataWrite(reservation_id=1, block_hashes=hashes)
            with pytest.raises(dataplane.DataPlaneError) as info:
                await client.request(pb.KVDataRequest(write=write).SerializeToString(), b"x" * 16)
            assert (info.value.code, info.value.message) == ("INVALID_ARGUMENT", BAD_HASH)
            # Too many hashes: refused before Redis is asked.
            many = pb.LookupRequest(block_hashes=[HASHES[0]] * (MAX_BLOCK_HASHES + 1))
            code, message = await error_of(stub.Lookup(many))
            assert (code, message) == (
                C.INVALID_ARGUMENT,
                "block_hashes has 262145 hashes; at most 262144 are allowed",
            )
            # The good prefix alone still works.
            found = await stub.Lookup(pb.LookupRequest(block_hashes=hashes[:1]))
            assert list(found.node_ids) == []
            await assert_idle(stub)

    asyncio.run(main())


def test_undecodable_request_bytes_are_invalid_argument(redis_server, kv_prefix):
    async def main():
        async with served_node(redis_server.url, kv_prefix, 8 * LAYER_BYTES) as (stub, client):
            with pytest.raises(dataplane.DataPlaneError) as info:  # the data plane alike
                await client.request(b"\xff\xff", b"")
            assert (info.value.code, info.value.message) == (
                "INVALID_ARGUMENT",
                "2 bytes do not decode as banaserve.v1.KVDataRequest",
            )
            [node] = (await stub.Lookup(pb.LookupRequest())).nodes  # this node's address
            async with grpc.aio.insecure_channel(node.grpc_address) as channel:
                unpin = channel.unary_unary("/banaserve.v1.KVStoreService/Unpin")
                assert await error_of(unpin(b"\xff\xff")) == (
                    C.INVALID_ARGUMENT,
                    "2 bytes do not decode as the request message of "
                    "/banaserve.v1.KVStoreService/Unpin",
                )
            await assert_idle(stub)

    asyncio.run(main())
