"""Bytes that do not decode as a method's request message, sent with a generic (raw-bytes)
call: INVALID_ARGUMENT naming the method, for unary and streamed requests alike, and the server
serves on (issue 8, item 6; grpc-aio alone answers a unary one UNKNOWN `Unexpected <class
DecodeError>`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from services.common.config import RpcConfig
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import decode_pb2, decode_pb2_grpc
from services.rpc.server import start_server
from services.rpc.streams import drain
from tests.rpc.helpers import FakeDecode, fake_decode_service

C = grpc.StatusCode
# A tag with wire type 7 (there is none), a length-delimited field cut short, and a string
# field holding invalid UTF-8 (field 1 of every message here is a string).
UNDECODABLE = [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28"]
SERVICE = "/banaserve.v1.DecodeService"


class Transfers(FakeDecode):
    """TransferKV counts the frames it read before the bad one."""

    def __init__(self) -> None:
        super().__init__()
        self.frames_read = 0

    async def TransferKV(self, request_iterator, context):
        try:
            async for _ in request_iterator:
                self.frames_read += 1
        except Exception:
            await drain(request_iterator)
            raise
        return decode_pb2.TransferKVResponse(num_layers=self.frames_read)


@asynccontextmanager
async def serving(servicer: FakeDecode) -> AsyncIterator[grpc.aio.Channel]:
    config = RpcConfig(grace_s=0.1)
    server = await start_server([fake_decode_service(servicer)], config)
    channel = open_channel(server.address, config)
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(0)


async def raw_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            await call.read()
        else:
            await call
    return info.value


def expect_invalid(error: grpc.aio.AioRpcError, method: str, num_bytes: int) -> None:
    assert (error.code(), error.details()) == (
        C.INVALID_ARGUMENT,
        f"{num_bytes} bytes do not decode as the request message of {SERVICE}/{method}",
    )


@pytest.mark.parametrize("data", UNDECODABLE)
def test_undecodable_unary_request_is_invalid_argument(data):
    async def main():
        async with serving(FakeDecode()) as channel:
            error = await raw_error(channel.unary_unary(f"{SERVICE}/ReserveKV")(data))
            expect_invalid(error, "ReserveKV", len(data))
            # A unary request to a server-streaming method, before any frame.
            error = await raw_error(channel.unary_stream(f"{SERVICE}/StreamTokens")(data))
            expect_invalid(error, "StreamTokens", len(data))
            stats = await decode_pb2_grpc.DecodeServiceStub(channel).Stats(
                decode_pb2.DecodeServiceStatsRequest()
            )
            assert stats.kv.num_blocks_total == 8

    asyncio.run(main())


def test_undecodable_message_in_a_client_stream_fails_when_read():
    good = decode_pb2.TransferKVRequest(
        header=decode_pb2.KVTransferHeader(request_id="r1")
    ).SerializeToString()

    async def main():
        servicer = Transfers()
        async with serving(servicer) as channel:
            call = channel.stream_unary(f"{SERVICE}/TransferKV")(iter([good, good, b"\xff"]))
            expect_invalid(await raw_error(call), "TransferKV", 1)
            assert servicer.frames_read == 2
            ok = channel.stream_unary(f"{SERVICE}/TransferKV")(iter([good]))
            assert decode_pb2.TransferKVResponse.FromString(await ok).num_layers == 3

    asyncio.run(main())
