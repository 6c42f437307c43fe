"""The decode worker's load test: it plays the router and the prefill worker, so the decode
worker is the only service under load.

Setup reads the model the worker serves (``--model``, ``--dtype``, ``--block-size``: they must
be the worker's) for its KV shape and fingerprint, and makes one prompt's KV: seeded random
values of the exact shape and dtype (the worker imports it and decodes on it; the tokens it
then samples mean nothing, and ``ignore_eos`` makes every request ``--max-tokens`` long).

Each iteration is one request, as the router and a prefill worker drive it:
1. ``ReserveKV`` with a fresh prompt of ``--prompt-len`` tokens, drawn from a generator keyed
   by the seed, the run's nonce and the iteration's index (unique across a sweep's steps: the
   worker's prefix cache never holds it, from this run or an earlier one);
2. ``StreamTokens`` opened at once (the router opens it after the prefill; opening it early
   changes nothing here, and its wait is bounded by the lease);
3. the KV, every layer, sent by the prefill worker's own sender (``services.prefill``'s
   ``TargetKVTransport``): to the data plane the reservation names (``--kv-transport auto``,
   the default) or over the ``TransferKV`` stream (``grpc``), ending with a first token;
   recorded as ``TransferKV`` with its bytes, from open to the worker's acknowledgement;
4. the stream read to its ``finished`` frame (``StreamTokens``, from the acknowledgement; its
   tokens count towards tokens/s), with its first delta as ``StreamTokens first token``.
The header's block hashes are the prompt's (``services.common.hashing``), which the worker
checks. After each run the worker's ``Stats`` is the leak check: no block used, no
reservation open.

With ``--tls-dir`` no one role may make every call (``RULES``): ``ReserveKV``,
``StreamTokens`` and ``Stats`` go with the ``router`` certificate, and the KV, as a prefill
worker sends it, with ``prefill``'s (the gRPC data plane admits workers only) and the data-plane
secret (``credentials.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import grpc

from bench.loadtest.credentials import NONE, Credentials
from bench.loadtest.driver import Recorder, ScenarioError, new_nonce
from services.common.arg_types import positive
from services.common.config import RpcConfig
from services.common.errors import ConfigError
from services.common.hashing import block_hashes
from services.rpc.channels import open_channel
from services.rpc.convert import DATA_TRANSPORT_FROM_PROTO, duration
from services.rpc.gen.banaserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from services.rpc.security import Role, secure_data_planes

KV_TRANSPORTS = ("auto", "grpc")
LEASE_S = 30.0


@dataclass(frozen=True)
class DecodeLoad:
    model: str = "tiny-llama"
    dtype: str = "float32"
    block_size: int = 16
    prompt_len: int = 64
    max_tokens: int = 16
    kv_transport: str = "auto"
    rpc_timeout_s: float = 30.0
    seed: int = 0
    nonce: str = field(default_factory=new_nonce)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"block size must be >= 1, got {self.block_size}")
        if self.prompt_len < 1 or self.max_tokens < 2:
            raise ConfigError("prompt length must be >= 1 and max tokens >= 2")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ConfigError(f"kv transport must be one of {', '.join(KV_TRANSPORTS)}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-llama", help="the model the worker serves")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--block-size", type=positive(int), default=16, help="the worker's KV block size"
    )
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request (first incl.)")
    p.add_argument("--kv-transport", choices=KV_TRANSPORTS, default="auto",
                   help="auto: the data plane ReserveKV names; grpc: the TransferKV stream")  # fmt: skip


class DecodeScenario:
    grpc_service = decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name
    name = "request"
    sample_names = (
        "request",
        "ReserveKV",
        "TransferKV",
        "StreamTokens",
        "StreamTokens first token",
    )

    def __init__(
        self, target: str, load: DecodeLoad, rpc: RpcConfig | None = None,
        credentials: Credentials = NONE,
    ) -> None:  # fmt: skip
        self.target = target
        self.load = load
        self.credentials = credentials
        # Two callers, two certificates: the router's calls, and the prefill worker's KV.
        self._rpc = credentials.rpc(Role.ROUTER, rpc)
        self._sender_rpc = credentials.rpc(Role.PREFILL, rpc)
        self._sender_security = credentials.security(Role.PREFILL)
        self._nonce = load.nonce
        self._channel: grpc.aio.Channel | None = None
        self._kv_bytes: int | None = None

    def describe(self) -> dict:
        load = self.load
        return {
            "model": load.model,
            "dtype": load.dtype,
            "prompt_len": load.prompt_len,
            "max_tokens": load.max_tokens,
            "kv_transport": load.kv_transport,
            "kv_bytes_per_request": self._kv_bytes,
            "nonce": self._nonce,
        }

    async def setup(self) -> None:
        # torch and the prefill's sender load only here: the other load tests need neither.
        import torch

        from services.engine.models.llama import ModelSpec
        from services.engine.models.loader import DTYPES, fingerprint, read_config
        from services.engine.models.prepare import resolve_model
        from services.prefill.clients import GrpcKVTransport
        from services.prefill.dataplane_transport import DataPlaneKVTransport, TargetKVTransport

        load = self.load
        path = resolve_model(load.model)
        spec = ModelSpec.from_config(read_config(path))
        self._vocab_size = spec.vocab_size
        self._fingerprint = await asyncio.to_thread(fingerprint, path, load.dtype)
        num_blocks = -(-load.prompt_len // load.block_size)
        shape = (2, num_blocks, load.block_size, spec.num_kv_heads, spec.head_dim)
        g = torch.Generator().manual_seed(load.seed)
        self._layers = [
            (torch.randn(shape, generator=g) * 0.1).to(DTYPES[load.dtype])
            for _ in range(spec.num_layers)
        ]
        self._kv_bytes = sum(t.nbytes for t in self._layers)
        self._kv_heads_dim = (spec.num_kv_heads, spec.head_dim)
        secure_data_planes(self._sender_security)  # before the sender's data planes connect
        data = DataPlaneKVTransport() if load.kv_transport == "auto" else None
        self._transport = TargetKVTransport(GrpcKVTransport(self._sender_rpc), data)
        self._channel = open_channel(self.target, self._rpc)
        self._stub = decode_pb2_grpc.DecodeServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._transport.close()
            await self._channel.close()
        secure_data_planes(None)

    async def server_state(self) -> dict:
        s = await self._stub.Stats(decode_pb2.DecodeServiceStatsRequest(), timeout=10)
        held = {
            "blocks used": s.kv.num_blocks_used,
            "reservations open": len(s.reservations),
            "running": s.num_running_seqs,
            "waiting": s.num_waiting_seqs,
        }
        return {
            "num_blocks_total": s.kv.num_blocks_total,
            "num_blocks_used": s.kv.num_blocks_used,
            "num_reservations": len(s.reservations),
            "held": held,
        }

    def _layout(self, layer: int, hashes: list[bytes], first_block: int):
        from services.engine.kv_cache import KVLayout

        load = self.load
        return KVLayout(
            self._fingerprint, layer, load.prompt_len, tuple(hashes[first_block:]), load.dtype,
            load.block_size, *self._kv_heads_dim, first_block,
        )  # fmt: skip

    def _prompt(self, index: int) -> list[int]:
        rng = random.Random(f"{self.load.seed}:{self._nonce}:prompt:{index}")
        return [rng.randrange(5, self._vocab_size) for _ in range(self.load.prompt_len)]

    async def run_one(self, index: int, rec: Recorder) -> None:
        from services.prefill.transport import KVTarget

        load = self.load
        request_id = f"loadtest-{self._nonce}-{index}"
        prompt = self._prompt(index)
        sampling = common_pb2.SamplingParams(
            temperature=0.0, max_tokens=load.max_tokens, ignore_eos=True, detokenize=False
        )
        async with rec.rpc("ReserveKV"):
            reply = await self._stub.ReserveKV(
                decode_pb2.ReserveKVRequest(
                    request_id=request_id, prompt_token_ids=prompt, sampling=sampling,
                    lease=duration(LEASE_S),
                ),
                timeout=load.rpc_timeout_s,
            )  # fmt: skip
        stream = self._stub.StreamTokens(
            decode_pb2.StreamTokensRequest(request_id=request_id), timeout=load.rpc_timeout_s
        )
        try:
            target = KVTarget(
                "decode", self.target, reply.reservation_id, reply.data_address,
                DATA_TRANSPORT_FROM_PROTO.get(reply.data_transport, ""),
            )  # fmt: skip
            hashes = block_hashes(prompt, load.block_size, self._fingerprint)
            # A prompt the worker decoded before (the same --seed and --nonce again) is in its
            # prefix cache: the KV goes from the first block it does not hold, as a prefill worker sends it.
            first = reply.num_cached_blocks
            await self._transfer(target, request_id, hashes, first, prompt[-1], rec)
            await self._read_stream(stream, rec)
        finally:
            stream.cancel()  # no-op once finished; frees the request on any failure

    async def _transfer(
        self, target, request_id: str, hashes, first_block: int, first_token: int, rec
    ) -> None:
        async with rec.rpc("TransferKV") as counts:
            sender = await self._transport.open(
                target, request_id, len(self._layers), self.load.rpc_timeout_s
            )
            try:
                # From another thread, as the prefill's engine thread does: ``send_layer``
                # queues through the loop, so the layers are queued before ``finish`` runs.
                await asyncio.to_thread(self._send_layers, sender, hashes, first_block)
                stats = await sender.finish(first_token, time.monotonic())
            except BaseException:
                with contextlib.suppress(Exception):
                    await sender.abort()
                raise
            counts.num_bytes = stats.num_bytes

    def _send_layers(self, sender, hashes: list[bytes], first_block: int) -> None:
        for layer, data in enumerate(self._layers):
            sender.send_layer(data[:, first_block:], self._layout(layer, hashes, first_block))

    async def _read_stream(self, stream, rec: Recorder) -> None:
        start = rec.clock()
        async with rec.rpc("StreamTokens") as counts:
            finished = None
            async for frame in stream:
                if frame.WhichOneof("frame") == "finished":
                    finished = frame.finished
                    continue
                if counts.num_tokens == 0:
                    rec.mark("StreamTokens first token", start)
                counts.num_tokens += len(frame.delta.token_ids)
            if finished is None:
                raise ScenarioError("INCOMPLETE", "StreamTokens ended without finished")
            if finished.finish_reason == common_pb2.FINISH_REASON_ABORT:
                raise ScenarioError("ABORTED", "the worker aborted the request")
