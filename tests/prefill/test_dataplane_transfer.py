"""Prefill -> the decode worker's data plane (ucx, tcp, grpc) -> a real DecodeWorker.

A real PrefillService and a real DecodeService with its data-plane receiver, in this process:
the router's part (ReserveKV, Prefill into that reservation, StreamTokens) is played by the test.
The KV lands byte for byte, the continued greedy tokens equal an in-process ``Engine.generate``,
and every way a transfer can fail frees the reservation (each test ends with the leak checks).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import grpc
import pytest

from services.common.config import RpcConfig
from services.decode.core import DecodeConfig, DecodeWorker
from services.decode.dataplane_receiver import DataPlaneReceiver
from services.decode.servicer import decode_service, kv_data_handler
from services.engine.engine import Engine
from services.prefill.clients import GrpcKVTransport
from services.prefill.core import PrefillWorker
from services.prefill.dataplane_transport import DataPlaneKVTransport, TargetKVTransport
from services.prefill.servicer import prefill_service
from services.prefill.transport import KVSender, KVTarget
from services.rpc import dataplane
from services.rpc.channels import open_channel
from services.rpc.convert import DATA_TRANSPORT_FROM_PROTO, DATA_TRANSPORT_TO_PROTO, duration
from services.rpc.gen.banaserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2_grpc
from services.rpc.server import start_server
from tests.decode.helpers import GREEDY, assert_clean, reference_tokens, reserve_request
from tests.engine.helpers import make_engine
from tests.prefill.helpers import free_port, prefill_request, prompt_ids, run_prefill, status_of

RPC = RpcConfig(grace_s=0.2)
FAST_SWEEP = DecodeConfig(sweep_interval_s=0.02)
KV_BYTES_PER_BLOCK_LAYER = 2 * 16 * 2 * 64 * 4  # K+V, block 16, 2 kv heads, dim 64, float32
each_kind = pytest.mark.parametrize("kind", dataplane.KINDS)


@dataclass
class Handoff:
    decode: decode_pb2_grpc.DecodeServiceStub
    prefill: prefill_pb2_grpc.PrefillServiceStub
    worker: DecodeWorker
    receiver: DataPlaneReceiver
    prefill_worker: PrefillWorker
    decode_address: str

    async def reserve(self, request_id: str, prompt: list[int], **kw) -> KVTarget:
        reply = await self.decode.ReserveKV(reserve_request(request_id, prompt, **kw))
        kind = DATA_TRANSPORT_FROM_PROTO[reply.data_transport]
        return KVTarget(
            "decode-0", self.decode_address, reply.reservation_id, reply.data_address, kind
        )

    async def assert_clean(self) -> None:
        await assert_clean(self.decode)
        assert self.receiver.num_open == 0
        deadline = time.monotonic() + 2
        while (s := self.prefill_worker.stats()).num_blocks_used or s.num_open_transfers:
            assert time.monotonic() < deadline, s
            await asyncio.sleep(0.02)


@asynccontextmanager
async def handoff(
    kind: str, decode_engine: Engine, prefill_engine: Engine, start: bool = True, **transport
) -> AsyncIterator[Handoff]:
    """``start=False``: the decode worker's engine loop waits for ``worker.start()``, so the
    KV it received can be read before any decode step."""
    worker = DecodeWorker(decode_engine, FAST_SWEEP)
    if start:
        await worker.start()
    receiver = DataPlaneReceiver(worker)
    data = dataplane.serve(kind, kv_data_handler(receiver))
    await data.start()
    servers = [await start_server([decode_service(worker, data.address, kind)], RPC)]
    data_transport = DataPlaneKVTransport(**transport)
    prefill_worker = PrefillWorker(
        prefill_engine, TargetKVTransport(GrpcKVTransport(RPC), data_transport)
    )
    prefill_worker.start()
    servers.append(await start_server([prefill_service(prefill_worker)], RPC))
    channels = [open_channel(server.address, RPC) for server in servers]
    try:
        yield Handoff(
            decode_pb2_grpc.DecodeServiceStub(channels[0]),
            prefill_pb2_grpc.PrefillServiceStub(channels[1]),
            worker,
            receiver,
            prefill_worker,
            servers[0].address,
        )
    finally:
        for channel in channels:
            await channel.close()
        for server in reversed(servers):
            await server.stop(0)
        await prefill_worker.stop()
        await data.stop(0.1)
        await receiver.stop()
        await worker.stop()


def target_request(request_id: str, prompt: list[int], target: KVTarget, **sampling):
    request = prefill_request(request_id, prompt, target.address, target.reservation_id, **sampling)
    request.target.data_address = target.data_address
    request.target.data_transport = DATA_TRANSPORT_TO_PROTO.get(target.data_transport, 0)
    return request


async def stream(stub, request_id: str) -> list[int]:
    tokens = []
    async for frame in stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id=request_id)):
        tokens += frame.delta.token_ids
    return tokens


def exported(engine: Engine, request_id: str, layer: int):
    """One layer's K and V of the request's valid token slots, ``[2, tokens, heads, dim]``."""
    data, layout = engine.export_kv(request_id, layer)
    return data.flatten(1, 2)[:, : layout.num_tokens]


@each_kind
def test_kv_lands_byte_exact_and_decode_continues_token_identically(tiny_llama, kind):
    prompt = prompt_ids(75, 11)  # 4 full blocks and a partial one
    expected = reference_tokens(make_engine(tiny_llama), prompt, GREEDY)
    reference = make_engine(tiny_llama)  # the KV a prefill of this prompt computes
    reference.add_request("ref", prompt, GREEDY)
    reference.step()
    decode_engine, prefill_engine = make_engine(tiny_llama), make_engine(tiny_llama)
    num_layers = decode_engine.spec.num_layers

    async def main():
        # Chunks of 2 blocks: every layer crosses as three messages; the decode engine waits.
        chunk = 2 * KV_BYTES_PER_BLOCK_LAYER
        async with handoff(
            kind, decode_engine, prefill_engine, start=False, max_chunk_bytes=chunk
        ) as h:
            target = await h.reserve("r1", prompt)
            assert target.data_transport == kind and target.data_address
            request = target_request("r1", prompt, target, temperature=0, max_tokens=12)
            request.sampling.ignore_eos = True
            first, done = await run_prefill(h.prefill, request)
            for layer in range(num_layers):
                engine_id = h.worker.engine_id("r1")
                got, want = (
                    exported(decode_engine, engine_id, layer),
                    exported(reference, "ref", layer),
                )
                assert got.numpy().tobytes() == want.numpy().tobytes(), layer
            await h.worker.start()
            tokens = list(first.first_token.token_ids) + await stream(h.decode, "r1")
            await h.assert_clean()
            return tokens, done.done

    tokens, done = asyncio.run(main())
    assert tokens == expected
    assert done.kv_bytes == num_layers * 5 * KV_BYTES_PER_BLOCK_LAYER
    transfer, exposed = done.kv_transfer.ToTimedelta(), done.kv_transfer_exposed.ToTimedelta()
    assert transfer.total_seconds() > 0 and exposed <= transfer


@each_kind
def test_a_prefix_the_decode_worker_holds_is_not_sent_again(tiny_llama, kind):
    """The second prompt on a cached 4-block prefix: ReserveKV reuses those blocks, the prefill
    worker sends the blocks after them (in 2-block chunks that name their place in the
    sequence), the decode worker's KV equals a prefill's byte for byte, tokens unchanged."""
    prefix = prompt_ids(64, 12)
    prompts = {"r1": prefix + prompt_ids(11, 13), "r2": prefix + prompt_ids(40, 14)}
    expected = {r: reference_tokens(make_engine(tiny_llama), p, GREEDY) for r, p in prompts.items()}
    reference = make_engine(tiny_llama)
    reference.add_request("ref", prompts["r2"], GREEDY)
    reference.step()
    decode_engine, prefill_engine = make_engine(tiny_llama), make_engine(tiny_llama)
    num_layers = decode_engine.spec.num_layers

    async def main():
        chunk = 2 * KV_BYTES_PER_BLOCK_LAYER
        async with handoff(kind, decode_engine, prefill_engine, max_chunk_bytes=chunk) as h:
            out = {}
            for rid, prompt in prompts.items():
                reply = await h.decode.ReserveKV(reserve_request(rid, prompt))
                target = KVTarget(
                    "decode-0", h.decode_address, reply.reservation_id, reply.data_address,
                    DATA_TRANSPORT_FROM_PROTO[reply.data_transport], reply.num_cached_blocks,
                )  # fmt: skip
                request = target_request(rid, prompt, target, temperature=0, max_tokens=12)
                request.target.first_block = target.first_block
                request.sampling.ignore_eos = True
                first, done = await run_prefill(h.prefill, request)
                if rid == "r2":  # the reused blocks and the sent ones, before decoding on
                    engine_id = h.worker.engine_id(rid)
                    for layer in range(num_layers):
                        got = exported(decode_engine, engine_id, layer)[:, : len(prompt)]
                        want = exported(reference, "ref", layer)
                        assert got.numpy().tobytes() == want.numpy().tobytes(), layer
                tokens = list(first.first_token.token_ids) + await stream(h.decode, rid)
                out[rid] = (reply.num_cached_blocks, done.done.kv_bytes, tokens)
            await h.assert_clean()
            return out

    out = asyncio.run(main())
    assert {r: tokens for r, (_, _, tokens) in out.items()} == expected
    assert [(cached, sent) for cached, sent, _ in out.values()] == [
        (0, num_layers * 5 * KV_BYTES_PER_BLOCK_LAYER),
        (4, num_layers * (7 - 4) * KV_BYTES_PER_BLOCK_LAYER),
    ]


def test_concurrent_transfers_share_one_connection_and_continue_token_identically(tiny_llama):
    prompts = [prompt_ids(n, 30 + n) for n in (9, 33, 64, 120)]
    reference = make_engine(tiny_llama)
    expected = [reference_tokens(reference, p, GREEDY) for p in prompts]

    async def main():
        async with handoff("ucx", make_engine(tiny_llama), make_engine(tiny_llama), window=1) as h:

            async def one(i: int, prompt: list[int]) -> list[int]:
                target = await h.reserve(f"r{i}", prompt)
                request = target_request(f"r{i}", prompt, target, temperature=0, max_tokens=12)
                request.sampling.ignore_eos = True
                first, _ = await run_prefill(h.prefill, request)
                return list(first.first_token.token_ids) + await stream(h.decode, f"r{i}")

            tokens = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            await h.assert_clean()
            return tokens

    assert asyncio.run(main()) == expected


def test_a_target_without_a_data_plane_gets_the_grpc_stream(tiny_llama):
    prompt = prompt_ids(50, 15)
    expected = reference_tokens(make_engine(tiny_llama), prompt, GREEDY)

    async def main():
        async with handoff("tcp", make_engine(tiny_llama), make_engine(tiny_llama)) as h:
            target = replace(await h.reserve("r1", prompt), data_address="", data_transport="")
            request = target_request("r1", prompt, target, temperature=0, max_tokens=12)
            request.sampling.ignore_eos = True
            first, _ = await run_prefill(h.prefill, request)
            tokens = list(first.first_token.token_ids) + await stream(h.decode, "r1")
            await h.assert_clean()
            return tokens

    assert asyncio.run(main()) == expected


async def half_sent(
    h: Handoff, prefill: Engine, prompt: list[int], **reserve
) -> tuple[KVSender, DataPlaneKVTransport]:
    """A sender that has sent the header and two of the layers, once D has them."""
    target = await h.reserve("r1", prompt, **reserve)
    prefill.add_request("r1", prompt, GREEDY)
    prefill.step()
    transport = DataPlaneKVTransport()
    sender = await transport.open(target, "r1", prefill.spec.num_layers, 5.0)
    for layer in range(2):
        sender.send_layer(*prefill.export_kv("r1", layer))
    prefill.abort("r1")
    deadline = time.monotonic() + 2
    while True:
        stats = await h.decode.Stats(decode_pb2.DecodeServiceStatsRequest())
        if [r.state for r in stats.reservations] == [decode_pb2.RESERVATION_STATE_RECEIVING]:
            return sender, transport
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.01)


@each_kind
def test_a_sender_that_aborts_or_vanishes_mid_transfer_frees_the_reservation(tiny_llama, kind):
    prompt = prompt_ids(40, 12)

    async def main():
        prefill = make_engine(tiny_llama)
        async with handoff(kind, make_engine(tiny_llama), make_engine(tiny_llama)) as h:
            sender, transport = await half_sent(h, prefill, prompt)
            await sender.abort()  # the abort message ends the transfer at once
            await h.assert_clean()
            await transport.close()
            # Gone without a word (connection closed between messages): the lease ends it.
            sender, transport = await half_sent(h, prefill, prompt, lease=duration(0.3))
            await transport.close()
            await h.assert_clean()
            await sender.abort()  # nothing left to free; must not hang or raise

    asyncio.run(main())


@each_kind
def test_unreachable_data_plane_fails_the_prefill_with_unavailable_quickly(tiny_llama, kind):
    prompt = prompt_ids(20, 13)

    async def main():
        async with handoff(kind, make_engine(tiny_llama), make_engine(tiny_llama)) as h:
            target = await h.reserve("r1", prompt)
            dead = replace(target, data_address=f"127.0.0.1:{free_port()}")
            started = time.monotonic()
            code, details = await status_of(
                run_prefill(h.prefill, target_request("r1", prompt, dead))
            )
            assert code == grpc.StatusCode.UNAVAILABLE, details
            assert time.monotonic() - started < 2.0
            await h.decode.Release(decode_pb2.ReleaseRequest(request_id="r1"))  # the router's part
            await h.assert_clean()

    asyncio.run(main())


def test_layout_mismatch_reaches_the_prefill_caller_as_invalid_argument(tiny_llama):
    prompt = prompt_ids(40, 14)

    async def main():
        # The decode worker's blocks hold 32 tokens, the prefill worker's 16.
        decode_engine = make_engine(tiny_llama, block_size=32)
        async with handoff("ucx", decode_engine, make_engine(tiny_llama)) as h:
            target = await h.reserve("r1", prompt)
            code, details = await status_of(
                run_prefill(h.prefill, target_request("r1", prompt, target))
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "KV layout" in details, details
            await h.assert_clean()  # the rejected transfer freed the reservation

    asyncio.run(main())
