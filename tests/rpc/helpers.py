"""A fake DecodeService and a server factory for tests of the rpc layer itself.

The fake is deliberately tiny: what is under test is the plumbing (health, reflection, status
mapping, size limits, drain, tracing), so each method only raises or answers what a test needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import grpc

from services.common.config import RpcConfig
from services.common.errors import OutOfRangeError, RequestNotFoundError
from services.common.types import SamplingParams
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from services.rpc.server import RunningServer, Service, start_server
from services.rpc.tracing import DISABLED, Tracing

DECODE_SERVICE = "banaserve.v1.DecodeService"
MAX_PROMPT = 8
SECRET = "/secret/path/weights.safetensors"


class FakeDecode(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self) -> None:
        self.slow_started = asyncio.Event()
        self.late_failure = asyncio.Event()
        self.first_frame = asyncio.Event()  # "late" streams wait for it before their first

    async def Stats(self, request, context):
        kv = common_pb2.KVPoolStats(num_blocks_total=8, num_blocks_free=8)
        return decode_pb2.DecodeServiceStatsResponse(kv=kv)

    async def ReserveKV(self, request, context):
        if request.request_id == "boom":
            raise RuntimeError(f"bug while reading {SECRET}")
        # The real domain validation, so the message is the one users will see.
        SamplingParams(max_tokens=request.sampling.max_tokens)
        if len(request.prompt_token_ids) > MAX_PROMPT:
            raise OutOfRangeError(
                f"prompt has {len(request.prompt_token_ids)} tokens, limit {MAX_PROMPT}"
            )
        return decode_pb2.ReserveKVResponse(reservation_id="res-1", num_blocks=1)

    async def StreamTokens(self, request, context):
        if request.request_id == "late":
            await self.first_frame.wait()
        yield decode_pb2.StreamTokensResponse(delta=common_pb2.TokenDelta(token_ids=[1]))
        if request.request_id == "outlives-its-client":
            # Work that fails after the client cancelled (a prefill whose reservation the
            # router released meanwhile): it tries to abort the ended call itself.
            with suppress(asyncio.CancelledError):
                await asyncio.sleep(30)
            self.late_failure.set()
            await context.abort(grpc.StatusCode.NOT_FOUND, "the reservation is gone")
        if request.request_id == "slow":
            self.slow_started.set()
            await asyncio.sleep(30)
        raise RequestNotFoundError(f"request {request.request_id!r} is gone")


def fake_decode_service(servicer: FakeDecode) -> Service:
    return Service.bind(
        servicer,
        decode_pb2_grpc.add_DecodeServiceServicer_to_server,
        decode_pb2.DESCRIPTOR.services_by_name["DecodeService"],
    )


@asynccontextmanager
async def serving(
    config: RpcConfig | None = None, tracing: Tracing = DISABLED
) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel, FakeDecode]]:
    """A started server with the fake DecodeService and a channel to it; both closed after."""
    config = config or RpcConfig(grace_s=0.5)
    servicer = FakeDecode()
    server = await start_server([fake_decode_service(servicer)], config, tracing=tracing)
    channel = open_channel(server.address, config, tracing)
    try:
        yield server, channel, servicer
    finally:
        await channel.close()
        await server.stop(0)
