"""The decode worker's data-plane receiver driven by raw data-plane messages (tcp; the planes
themselves are tests/rpc/test_dataplane.py's concern): the protocol's errors, and that neither a
bad chunk nor a sender gone silent keeps a reservation or a transfer open."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from services.common.config import RpcConfig
from services.decode.core import DecodeConfig, DecodeWorker
from services.decode.dataplane_receiver import DataPlaneReceiver
from services.decode.servicer import decode_service, kv_data_handler
from services.rpc import dataplane
from services.rpc.channels import open_channel
from services.rpc.convert import duration
from services.rpc.gen.banaserve.v1 import decode_pb2, decode_pb2_grpc
from services.rpc.server import start_server
from tests.decode.helpers import GREEDY, PrefillSide, assert_clean, prompt_ids, reserve_request
from tests.engine.helpers import make_engine


@asynccontextmanager
async def receiving(model) -> AsyncIterator[tuple]:
    worker = DecodeWorker(make_engine(model), DecodeConfig(sweep_interval_s=0.02))
    await worker.start()
    receiver = DataPlaneReceiver(worker)
    data = dataplane.serve("tcp", kv_data_handler(receiver))
    await data.start()
    rpc = RpcConfig(grace_s=0.2)
    server = await start_server([decode_service(worker, data.address, "tcp")], rpc)
    channel = open_channel(server.address, rpc)
    client = await dataplane.connect("tcp", data.address, timeout_s=2)
    try:
        yield receiver, decode_pb2_grpc.DecodeServiceStub(channel), client
    finally:
        await client.close()
        await channel.close()
        await server.stop(0)
        await data.stop(0.1)
        await receiver.stop()
        await worker.stop()


def message(reservation_id: str, frame: decode_pb2.TransferKVRequest) -> tuple[bytes, bytes]:
    """A TransferKV frame as its data-plane message: (KVTransferFrame, payload)."""
    kind = frame.WhichOneof("frame")
    if kind == "layer":
        c = frame.layer
        ref = decode_pb2.KVTransferLayer(
            layer=c.layer, first_block=c.first_block, num_blocks=c.num_blocks
        )
        msg = decode_pb2.KVTransferFrame(reservation_id=reservation_id, layer=ref)
        return msg.SerializeToString(), c.data
    msg = decode_pb2.KVTransferFrame(reservation_id=reservation_id, **{kind: getattr(frame, kind)})
    return msg.SerializeToString(), b""


async def status(request) -> str:
    with pytest.raises(dataplane.DataPlaneError) as info:
        await request
    return info.value.code


def test_protocol_errors_a_bad_chunk_and_a_silent_sender_leave_nothing_open(tiny_llama):
    prompt = prompt_ids(40, 21)
    prefill = PrefillSide(tiny_llama)

    async def transfer(stub, request_id: str, lease_s: float):
        reply = await stub.ReserveKV(reserve_request(request_id, prompt, lease=duration(lease_s)))
        first = prefill.prefill(request_id, prompt, GREEDY)
        frames = prefill.frames(request_id, reply.reservation_id, first, split_layers=False)
        return reply.reservation_id, [message(reply.reservation_id, f) for f in frames]

    async def main():
        async with receiving(tiny_llama) as (receiver, stub, client):
            rid, msgs = await transfer(stub, "bad", 10.0)
            header, layer = msgs[0], msgs[1]
            assert await status(client.request(*layer)) == "NOT_FOUND"  # no header yet
            end = message(rid, decode_pb2.TransferKVRequest(end={}))
            assert await status(client.request(*end)) == "NOT_FOUND"
            abort = decode_pb2.KVTransferFrame(reservation_id=rid, abort={})
            await client.request(abort.SerializeToString())  # nothing open: answered OK
            other = decode_pb2.KVTransferFrame.FromString(header[0])
            other.reservation_id = "another"
            assert await status(client.request(other.SerializeToString())) == "INVALID_ARGUMENT"
            assert await client.request(*header) == (b"", bytearray())  # accepted
            assert await status(client.request(*header)) == "INVALID_ARGUMENT"  # twice
            assert receiver.num_open == 1
            truncated = (layer[0], layer[1][:-4])
            assert await status(client.request(*truncated)) == "INVALID_ARGUMENT"
            await assert_clean(stub)  # the failed transfer freed its reservation
            assert receiver.num_open == 0
            assert await status(client.request(*layer)) == "NOT_FOUND"

            # A sender silent after its header: the 0.3 s lease ends the waiting transfer.
            rid, msgs = await transfer(stub, "silent", 0.3)
            await client.request(*msgs[0])
            assert receiver.num_open == 1
            await asyncio.sleep(0.4)
            await assert_clean(stub)
            assert receiver.num_open == 0
            assert await status(client.request(*msgs[1])) == "NOT_FOUND"

    asyncio.run(main())
