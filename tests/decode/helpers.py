"""Factories for decode-worker tests: a real DecodeService on port 0 over a tiny-llama engine,
and the prefill side of a handoff played by a second in-process engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import torch

from services.common import kv_wire
from services.common.config import RpcConfig
from services.common.types import SamplingParams
from services.decode.core import DecodeConfig, DecodeWorker
from services.decode.servicer import decode_service
from services.engine.engine import Engine
from services.rpc.channels import open_channel
from services.rpc.convert import layout_to_proto
from services.rpc.gen.banaserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from services.rpc.server import start_server
from tests.engine.helpers import make_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 4000, (n,), generator=g).tolist()


def sampling_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
        ignore_eos=params.ignore_eos,
    )


def reserve_request(
    request_id: str, prompt: list[int], params: SamplingParams = GREEDY, **kwargs
) -> decode_pb2.ReserveKVRequest:
    return decode_pb2.ReserveKVRequest(
        request_id=request_id, prompt_token_ids=prompt, sampling=sampling_proto(params), **kwargs
    )


@asynccontextmanager
async def decode_server(
    model: Path,
    config: DecodeConfig | None = None,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    **engine_overrides,
) -> AsyncIterator[tuple[DecodeWorker, decode_pb2_grpc.DecodeServiceStub]]:
    worker = DecodeWorker(make_engine(model, **engine_overrides), config)
    await worker.start()
    rpc = RpcConfig(grace_s=0.5)
    # As ``python -m services.decode`` serves it: one transfer awaiting its header per sequence.
    service = decode_service(worker, max_awaiting_header=worker.engine.config.max_num_seqs)
    server = await start_server([service], rpc, interceptors=interceptors)
    channel = open_channel(server.address, rpc)
    try:
        yield worker, decode_pb2_grpc.DecodeServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)
        await worker.stop()


async def assert_clean(stub: decode_pb2_grpc.DecodeServiceStub, within_s: float = 2.0) -> None:
    """The leak check: no block used, nothing running or waiting, no reservation open (polled,
    because a cancelled call reaches the server a moment after the client moves on)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while True:
        stats = await stub.Stats(decode_pb2.DecodeServiceStatsRequest(), timeout=2)
        clean = (
            stats.kv.num_blocks_used == 0
            and stats.kv.num_blocks_free == stats.kv.num_blocks_total
            and stats.num_running_seqs == stats.num_waiting_seqs == 0
            and not stats.reservations
        )
        if clean:
            return
        assert loop.time() < end, stats
        await asyncio.sleep(0.02)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A ``[2, n, ...]`` layer's KV wire bytes (services/common/kv_wire.py)."""
    return kv_wire.encode(t).tobytes()


class PrefillSide:
    """A second engine that prefills a prompt, samples its first token and exports its KV."""

    def __init__(self, model: Path) -> None:
        self.engine = make_engine(model)

    def prefill(self, request_id: str, prompt: list[int], params: SamplingParams) -> int:
        self.engine.add_request(request_id, prompt, params)
        (out,) = [o for o in self.engine.step() if o.request_id == request_id]
        return out.new_token_ids[0]

    def frames(
        self,
        request_id: str,
        reservation_id: str,
        first_token: int,
        split_layers: bool = True,
        first_block: int = 0,
    ) -> Iterator[decode_pb2.TransferKVRequest]:
        """Header, every layer (odd layers in one-block chunks), end; the KV from block
        ``first_block`` on (ReserveKVResponse.num_cached_blocks). Exported up front and the
        request freed at once, so a call the server breaks early leaves nothing behind here."""
        frames = list(
            self._frames(request_id, reservation_id, first_token, split_layers, first_block)
        )
        self.engine.abort(request_id)
        return iter(frames)

    def _frames(
        self,
        request_id: str,
        reservation_id: str,
        first_token: int,
        split_layers: bool,
        first_block: int,
    ) -> Iterator[decode_pb2.TransferKVRequest]:
        num_layers = self.engine.spec.num_layers
        start = first_block * self.engine.config.block_size
        _, layout = self.engine.export_kv(request_id, 0, start)
        header = decode_pb2.KVTransferHeader(
            request_id=request_id,
            reservation_id=reservation_id,
            layout=layout_to_proto(layout, num_layers),
        )
        yield decode_pb2.TransferKVRequest(header=header)
        for layer in reversed(range(num_layers)):  # any order of layers is allowed
            data, _ = self.engine.export_kv(request_id, layer, start)
            step = 1 if split_layers and layer % 2 else data.shape[1]
            for first in range(0, data.shape[1], step):
                chunk = data[:, first : first + step]
                yield decode_pb2.TransferKVRequest(
                    layer=common_pb2.KVLayerChunk(
                        layer=layer,
                        first_block=first_block + first,
                        num_blocks=chunk.shape[1],
                        data=tensor_bytes(chunk),
                    )
                )
        yield decode_pb2.TransferKVRequest(end=decode_pb2.KVTransferEnd(first_token_id=first_token))


def reference_tokens(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    (completion,) = engine.generate([prompt], params)
    return completion.token_ids
