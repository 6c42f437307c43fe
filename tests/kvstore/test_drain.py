"""A kvstore node told to stop (SIGTERM), a real process against a real Redis: it leaves the
index at once (a lookup names none of its blocks), refuses a new write (UNAVAILABLE), still
serves a read pinned before the signal, byte for byte, and exits 0 once that pin is released.
Before, a node with no gRPC call open stopped at once: the pinned read failed, and its reader
recomputed the prompt."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import grpc
import pytest

from services.child_process import Child
from services.rpc import dataplane
from services.rpc.gen.banaserve.v1 import kvstore_pb2 as pb
from services.rpc.gen.banaserve.v1 import kvstore_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
C = grpc.StatusCode
LAYERS, LAYER_BYTES = 2, 1024
HASHES = [bytes([i]) * 16 for i in range(1, 3)]


def test_a_stopping_node_leaves_the_index_and_serves_the_reads_pinned_before(
    redis_server, kv_prefix, tmp_path
):
    argv = [sys.executable, "-m", "services.kvstore", "--port", "0", "--redis",
            redis_server.url, "--key-prefix", kv_prefix, "--data-transport", "tcp"]  # fmt: skip
    with open(tmp_path / "kvstore.log", "w") as log:
        node = Child("kvstore-0", argv, dict(os.environ), log)
        try:
            node.wait_ready(time.monotonic() + 60)
            outcome = asyncio.run(_drain_while_pinned(node))
            code = node.proc.wait(timeout=15)
        finally:
            if node.proc.poll() is None:
                node.kill()
    payload, read, looked_up, reserve, alive, exited_s = outcome
    assert looked_up == []  # out of the index from the signal on
    assert reserve[0] == C.UNAVAILABLE and "stopping: it takes no new write" in reserve[1]
    assert read == payload  # the pinned read, served during the drain
    assert alive  # held up by the pin, not by its 30 s drain's end
    assert code == 0 and exited_s < 5, (code, exited_s)


async def _drain_while_pinned(node: Child):
    async with grpc.aio.insecure_channel(node.address) as channel:
        stub = kvstore_pb2_grpc.KVStoreServiceStub(channel)
        (me,) = (await stub.Lookup(pb.LookupRequest(block_hashes=HASHES))).nodes
        client = await dataplane.connect("tcp", me.data_address, 5)
        try:
            payload = await _write(stub, client)
            found = await stub.Lookup(pb.LookupRequest(block_hashes=HASHES))
            assert list(found.node_ids) == [me.node_id] * 2
            pin = await stub.Pin(pb.PinRequest(block_hashes=HASHES))
            assert pin.num_pinned == 2
            node.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            looked_up = list((await stub.Lookup(pb.LookupRequest(block_hashes=HASHES))).node_ids)
            try:
                request = pb.ReserveRequest(
                    block_hashes=[bytes([9]) * 16], num_layers=LAYERS, layer_bytes=LAYER_BYTES
                )
                await stub.Reserve(request)
                reserve = (C.OK, "")
            except grpc.aio.AioRpcError as exc:
                reserve = (exc.code(), exc.details())
            read = []
            for layer in range(LAYERS):
                message = pb.KVDataRead(pin_id=pin.pin_id, layer=layer, num_blocks=2)
                _, got = await client.request(pb.KVDataRequest(read=message).SerializeToString())
                read.append(bytes(got))
            alive = node.proc.poll() is None
            unpinned = time.monotonic()
            await stub.Unpin(pb.UnpinRequest(pin_id=pin.pin_id))
        finally:
            await client.close()
    while node.proc.poll() is None and time.monotonic() < unpinned + 15:
        await asyncio.sleep(0.05)
    return payload, read, looked_up, reserve, alive, time.monotonic() - unpinned


async def _write(stub, client) -> list[bytes]:
    reply = await stub.Reserve(
        pb.ReserveRequest(block_hashes=HASHES, num_layers=LAYERS, layer_bytes=LAYER_BYTES)
    )
    payload = [os.urandom(2 * LAYER_BYTES) for _ in range(LAYERS)]
    for layer in range(LAYERS):
        write = pb.KVDataWrite(reservation_id=reply.reservation_id, layer=layer,
                               block_hashes=HASHES)  # fmt: skip
        await client.request(pb.KVDataRequest(write=write).SerializeToString(), payload[layer])
    assert (await stub.Commit(pb.CommitRequest(reservation_id=reply.reservation_id))).num_committed
    return payload
