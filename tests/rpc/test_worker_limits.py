"""The workers' RPCs bound the ids and strings a caller sends (services/common/limits.py) before
their worker sees the request (issue 8, item 4): INVALID_ARGUMENT with the field and the bound.
The servicers run over a worker that records every call, so "before" is checked exactly."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from services.common.config import RpcConfig
from services.common.errors import InvalidRequestError
from services.decode.servicer import decode_service, kv_data_handler
from services.prefill.servicer import prefill_service
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from services.rpc.server import start_server

C = grpc.StatusCode
RPC = RpcConfig(grace_s=0.1)
LONG_ID = "x" * (1 << 20)
TOO_LONG = "is 1048576 characters long; at most 128 are allowed"


class RecordingWorker:
    """Stands for PrefillWorker, DecodeWorker and DataPlaneReceiver: records, does nothing."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        def record(*args, **kwargs):
            self.calls.append(name)
            raise AssertionError(f"{name} reached the worker")

        return record

    async def receive(self, frames):
        """DecodeWorker.receive: the frames are decoded (and checked) as it reads them."""
        async for frame in frames:
            self.calls.append(type(frame).__name__)
        raise AssertionError("a transfer reached its end")


@asynccontextmanager
async def serving(worker: RecordingWorker) -> AsyncIterator[grpc.aio.Channel]:
    server = await start_server([prefill_service(worker), decode_service(worker)], RPC)
    channel = open_channel(server.address, RPC)
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(0)


async def error_of(call) -> tuple[C, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            await call.read()
        else:
            await call
    return info.value.code(), info.value.details()


def prefill(**fields) -> prefill_pb2.PrefillRequest:
    target = prefill_pb2.KVTarget(
        worker_id=fields.pop("worker_id", "d0"),
        address=fields.pop("address", "127.0.0.1:1"),
        reservation_id=fields.pop("reservation_id", "res-1"),
    )
    fields.setdefault("request_id", "r1")
    return prefill_pb2.PrefillRequest(prompt_token_ids=[1, 2], target=target, **fields)


def header(**fields) -> decode_pb2.KVTransferHeader:
    layout = common_pb2.KVLayout(
        fingerprint=fields.pop("fingerprint", "fp"),
        block_hashes=fields.pop("block_hashes", [bytes(16)]),
        dtype=common_pb2.DTYPE_FLOAT32,
        block_size=16,
    )
    return decode_pb2.KVTransferHeader(
        request_id=fields.pop("request_id", "r1"),
        reservation_id=fields.pop("reservation_id", "res-1"),
        layout=layout,
    )


PREFILL_CASES = [
    (prefill(request_id=LONG_ID), f"request_id {TOO_LONG}"),
    (prefill(worker_id=LONG_ID), f"target.worker_id {TOO_LONG}"),
    (
        prefill(reservation_id="res 1"),
        "target.reservation_id 'res 1' must be printable ASCII "
        "without spaces or control characters",
    ),
    (prefill(address="h" * 300), "target.address is longer than 256 bytes"),
    (
        prefill(sampling=common_pb2.SamplingParams(stop=["s"] * 17)),
        "17 stop strings; at most 16 are allowed",
    ),
]


@pytest.mark.parametrize(("message", "details"), PREFILL_CASES)
def test_prefill_bounds_ids_addresses_and_stops(message, details):
    async def main():
        worker = RecordingWorker()
        async with serving(worker) as channel:
            call = prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(message, timeout=5)
            assert await error_of(call) == (C.INVALID_ARGUMENT, details)
        assert worker.calls == []

    asyncio.run(main())


def test_decode_bounds_ids_fingerprints_hashes_and_stops():
    async def main():
        worker = RecordingWorker()
        async with serving(worker) as channel:
            stub = decode_pb2_grpc.DecodeServiceStub(channel)
            long_id = f"request_id {TOO_LONG}"
            calls = [
                (stub.ReserveKV(decode_pb2.ReserveKVRequest(request_id=LONG_ID)), long_id),
                (
                    stub.ReserveKV(
                        decode_pb2.ReserveKVRequest(
                            request_id="r1",
                            sampling=common_pb2.SamplingParams(stop_token_ids=range(300)),
                        )
                    ),
                    "300 stop token ids; at most 256 are allowed",
                ),
                (stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id=LONG_ID)), long_id),
                (stub.Release(decode_pb2.ReleaseRequest(request_id=LONG_ID)), long_id),
            ]
            for call, details in calls:
                assert await error_of(call) == (C.INVALID_ARGUMENT, details)
        assert worker.calls == []

    asyncio.run(main())


@pytest.mark.parametrize(
    ("fields", "details"),
    [
        ({"request_id": LONG_ID}, f"request_id {TOO_LONG}"),
        ({"reservation_id": LONG_ID}, f"reservation_id {TOO_LONG}"),
        ({"fingerprint": "f" * 1000}, "layout.fingerprint is longer than 256 bytes"),
        (
            {"block_hashes": [bytes(16), b"abc"]},
            "layout.block_hashes[1] must be a 16-byte block hash, got 3 bytes",
        ),
    ],
)
def test_a_transfer_header_is_bounded_on_both_kv_paths(fields, details):
    """The TransferKV stream and the data-plane handler read headers with one function."""

    async def main():
        worker = RecordingWorker()
        async with serving(worker) as channel:
            frames = iter([decode_pb2.TransferKVRequest(header=header(**fields))])
            call = decode_pb2_grpc.DecodeServiceStub(channel).TransferKV(frames, timeout=5)
            assert await error_of(call) == (C.INVALID_ARGUMENT, details)
        handle = kv_data_handler(worker)
        reservation_id = fields.get("reservation_id", "res-1")
        frame = decode_pb2.KVTransferFrame(reservation_id=reservation_id, header=header(**fields))
        with pytest.raises(InvalidRequestError, match=re.escape(details)):
            await handle(frame.SerializeToString(), memoryview(b""))
        assert worker.calls == []

    asyncio.run(main())
