"""A prefill server and a minimal in-test DecodeService that imports KV into a real Engine.

The receiver is deliberately small (the real decode service lives in services/decode): it
buffers a transfer's chunks, and on the `end` frame imports every layer into its engine with
begin_import / import_kv / finish_import, so a test can decode on and compare tokens.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
import torch

from services.common import kv_wire
from services.common.config import RpcConfig
from services.common.errors import RequestNotFoundError
from services.common.kv_layout import KVLayout
from services.common.types import SamplingParams
from services.prefill.clients import GrpcKVTransport
from services.prefill.core import PrefillWorker
from services.prefill.servicer import prefill_service
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from services.rpc.server import Service, start_server
from services.rpc.streams import drain

RPC = RpcConfig(grace_s=0.2)


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 4000, (n,), generator=g).tolist()


def layout_from_proto(msg: common_pb2.KVLayout, layer: int) -> KVLayout:
    dtype = common_pb2.Dtype.Name(msg.dtype).removeprefix("DTYPE_").lower()
    return KVLayout(
        msg.fingerprint,
        layer,
        msg.num_tokens,
        tuple(msg.block_hashes),
        dtype,
        msg.block_size,
        msg.num_kv_heads,
        msg.head_dim,
    )


def chunk_tensor(chunk: common_pb2.KVLayerChunk, layout: KVLayout) -> torch.Tensor:
    """One chunk's ``[2, chunk.num_blocks, block_size, kv_heads, head_dim]`` (K then V)."""
    return kv_wire.decode_blocks(chunk.data, layout, chunk.num_blocks)


@dataclass
class Received:
    frames: list[str] = field(default_factory=list)  # "open", "header", "layer:<l>", "end"
    chunk_arrivals: list[float] = field(default_factory=list)


class ImportingDecode(decode_pb2_grpc.DecodeServiceServicer):
    """Reservations are registered by the test: reservation id -> (request id, prompt, params)."""

    def __init__(self, engine, hold_s: float = 0.0) -> None:
        self.engine = engine
        self.reservations: dict[str, tuple[list[int], SamplingParams]] = {}
        self.received: dict[str, Received] = {}
        self.hold_s = hold_s  # answer this late (a slow or hung receiver)

    async def TransferKV(self, request_iterator, context):
        header, chunks, seen = None, {}, Received()
        async for msg in request_iterator:
            kind = msg.WhichOneof("frame")
            if kind == "open":  # the reservation claimed as the call opens (decode.proto)
                if msg.open.reservation_id not in self.reservations:
                    await drain(request_iterator)
                    raise RequestNotFoundError(f"no reservation {msg.open.reservation_id!r}")
                seen.frames.append("open")
            elif kind == "header":
                header = msg.header
                if header.reservation_id not in self.reservations:
                    await drain(request_iterator)  # as the real decode service does
                    raise RequestNotFoundError(f"no reservation {header.reservation_id!r}")
                self.received[header.request_id] = seen
                seen.frames.append("header")
            elif kind == "layer":
                seen.frames.append(f"layer:{msg.layer.layer}")
                seen.chunk_arrivals.append(time.monotonic())
                chunks.setdefault(msg.layer.layer, []).append(msg.layer)
            else:
                seen.frames.append("end")
                await asyncio.sleep(self.hold_s)
                self._import(header, chunks, msg.end.first_token_id)
                return decode_pb2.TransferKVResponse(
                    num_layers=len(chunks),
                    num_bytes=sum(len(c.data) for cs in chunks.values() for c in cs),
                )
        raise RequestNotFoundError("transfer ended without an end frame")

    def _import(self, header, chunks, first_token: int) -> None:
        prompt, params = self.reservations.pop(header.reservation_id)
        n = header.layout.num_tokens
        self.engine.begin_import(header.request_id, [*prompt, first_token], len(prompt), n, params)
        for layer, parts in sorted(chunks.items()):
            layout = layout_from_proto(header.layout, layer)
            data = torch.cat(
                [chunk_tensor(c, layout) for c in sorted(parts, key=lambda c: c.first_block)], 1
            )
            self.engine.import_kv(header.request_id, data, layout)
        self.engine.finish_import(header.request_id)

    def decode_all(self) -> dict[str, list[int]]:
        """Run the receiving engine until every imported request finishes; tokens per request."""
        tokens: dict[str, list[int]] = {}
        while self.engine.has_unfinished_requests:
            for out in self.engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        return tokens


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    prefill: prefill_pb2_grpc.PrefillServiceStub
    worker: PrefillWorker
    decode: ImportingDecode | None
    decode_address: str

    async def stats(self) -> prefill_pb2.PrefillServiceStatsResponse:
        return await self.prefill.Stats(prefill_pb2.PrefillServiceStatsRequest(), timeout=2)

    async def assert_idle(self, within_s: float = 2.0) -> None:
        """Nothing held on the prefill side once every call has ended (cleanup after a
        cancelled call runs on the server shortly after the client sees the status)."""
        deadline = time.monotonic() + within_s
        while True:
            s = await self.stats()
            idle = s.kv.num_blocks_used == 0 and s.num_open_transfers == 0
            if idle and s.num_running_seqs == 0 and s.num_queued_prefill_tokens == 0:
                return
            assert time.monotonic() < deadline, s
            await asyncio.sleep(0.02)


@asynccontextmanager
async def cluster(
    prefill_engine, decode: ImportingDecode | None, **transport
) -> AsyncIterator[Cluster]:
    servers, channels = [], []
    decode_address = f"127.0.0.1:{free_port()}"
    if decode is not None:
        service = Service.bind(
            decode,
            decode_pb2_grpc.add_DecodeServiceServicer_to_server,
            decode_pb2.DESCRIPTOR.services_by_name["DecodeService"],
        )
        servers.append(await start_server([service], RPC))
        decode_address = servers[-1].address
    worker = PrefillWorker(prefill_engine, GrpcKVTransport(RPC, **transport))
    worker.start()
    servers.append(await start_server([prefill_service(worker)], RPC))
    channels.append(open_channel(servers[-1].address, RPC))
    try:
        yield Cluster(
            prefill_pb2_grpc.PrefillServiceStub(channels[-1]), worker, decode, decode_address
        )
    finally:
        for channel in channels:
            await channel.close()
        for server in reversed(servers):
            await server.stop(0)
        await worker.stop()


def prefill_request(
    request_id: str, prompt: list[int], address: str, reservation: str = "res-1", **sampling
) -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(**sampling),
        target=prefill_pb2.KVTarget(
            worker_id="decode-0", address=address, reservation_id=reservation
        ),
    )


async def run_prefill(stub, request, timeout: float = 4.0) -> list[prefill_pb2.PrefillResponse]:
    return [frame async for frame in stub.Prefill(request, timeout=timeout)]


async def status_of(coro) -> tuple[grpc.StatusCode, str]:
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    raise AssertionError("the call succeeded")


async def wait_for(predicate, within_s: float = 5.0) -> None:
    """Polls ``predicate`` every 20 ms until it holds; fails the test after ``within_s``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while not predicate():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.02)
