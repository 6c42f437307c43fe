"""The prefill worker's load test: its ``Prefill`` RPC, with the KV going to a sink.

A ``Prefill`` call needs a decode target to stream the prompt's KV to. Here that target is
``stubs.KVSink`` in this process, not a decode worker: it acknowledges every message as it
arrives, so the prefill worker is what is measured (a real decode worker would add its own
reservation, import and decode work to every request, and could be the one that saturates).
The sink serves the data plane (``--sink-transport``, default ucx, like a decode worker's) and
the ``TransferKV`` stream: a worker with a data plane (its ``--kv-transport`` not ``none``)
sends to the sink's data plane, one with ``--kv-transport none`` (or any worker, with
``--sink-transport stream``: the sink then names no data plane) over the stream.

Each iteration is one ``Prefill`` of a fresh prompt of ``--prompt-len`` token ids from
``--vocab-range``, drawn from a generator keyed by the seed, the run's nonce and the
iteration's index (unique across a sweep's steps: no prefix-cache hits, in this run or from an
earlier one), greedy, ``max_tokens`` 2 and ``ignore_eos`` so the first token never
ends the request and the whole KV is always sent. Recorded: ``Prefill`` (call to ``done``,
its prompt tokens count towards tokens/s and its KV bytes towards GB/s) and
``Prefill first token``. After each run the worker's ``Stats`` is the leak check (no block used,
no transfer open, nothing queued), and the sink has no transfer open.

With ``--tls-dir`` the load test is the router (``Prefill`` and ``Stats`` are the router's) and
the sink a decode worker: its gRPC server has the ``decode`` certificate, its data planes the
data-plane secret (``credentials.py``). A UCX sink authenticates no peer and listens on every
interface (docs/security.md), so with TLS the sink is TCP by default and UCX is refused.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field

import grpc

from bench.loadtest.credentials import NONE, Credentials
from bench.loadtest.driver import Recorder, ScenarioError, new_nonce
from bench.loadtest.stubs import KVSink
from services.common.config import RpcConfig
from services.common.errors import ConfigError
from services.rpc import dataplane
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from services.rpc.security import Role, secure_data_planes

SINK_TRANSPORTS = (*dataplane.KINDS, "stream")
DEFAULT_SINK = "ucx"
DEFAULT_TLS_SINK = "tcp"  # UCX authenticates no peer: with TLS the sink is TCP unless told


@dataclass(frozen=True)
class PrefillLoad:
    prompt_len: int = 128
    vocab: tuple[int, int] = (5, 4000)
    sink_transport: str = "ucx"
    rpc_timeout_s: float = 60.0
    seed: int = 0
    nonce: str = field(default_factory=new_nonce)

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ConfigError(f"prompt length must be >= 1, got {self.prompt_len}")
        if self.sink_transport not in SINK_TRANSPORTS:
            raise ConfigError(f"sink transport must be one of {', '.join(SINK_TRANSPORTS)}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bench.serve_bench import vocab_range

    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--vocab-range", type=vocab_range, default=(5, 4000),
                   help="prompt token ids from [LOW, HIGH) (default 5:4000, tiny-llama's)")  # fmt: skip
    p.add_argument("--sink-transport", choices=SINK_TRANSPORTS, default=None,
                   help="the KV sink's data plane (stream: TransferKV only; default ucx, tcp "
                   "with --tls-dir)")  # fmt: skip


def sink_transport(chosen: str | None, credentials: Credentials) -> str:
    """``--sink-transport``, or its default; UCX refused with TLS (it authenticates no peer)."""
    if chosen is None:
        return DEFAULT_TLS_SINK if credentials.tls_dir else DEFAULT_SINK
    if chosen == "ucx" and credentials.tls_dir:
        raise ConfigError(
            "--sink-transport ucx with --tls-dir: a UCX data plane authenticates no peer and "
            "listens on every interface (docs/security.md); use tcp, grpc or stream"
        )
    return chosen


class PrefillScenario:
    grpc_service = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name
    name = "request"
    sample_names = ("request", "Prefill", "Prefill first token")

    def __init__(
        self, target: str, load: PrefillLoad, rpc: RpcConfig | None = None,
        credentials: Credentials = NONE,
    ) -> None:  # fmt: skip
        self.target = target
        self.load = load
        self.credentials = credentials
        self._rpc = credentials.rpc(Role.ROUTER, rpc)
        self._nonce = load.nonce
        # The sink stands in for a decode worker: its certificate, and its data-plane secret.
        self._sink_security = credentials.security(Role.DECODE)
        sink_rpc = credentials.rpc(Role.DECODE, RpcConfig(grace_s=1.0))
        self._sink = KVSink(sink_transport(load.sink_transport, credentials), sink_rpc)
        self._channel: grpc.aio.Channel | None = None

    def hint(self, status: str, message: str) -> str:
        """What a failed warm-up likely means, for the two set-ups this test needs."""
        if "not a worker the router registered" in message:
            return (" (a prefill worker with --router sends KV only to its router's workers: "
                    "run it without --router)")  # fmt: skip
        if "loadtest-kv-sink" in message and self.load.sink_transport != "stream":
            return (f" (the worker sends KV over the sink's {self.load.sink_transport} data plane "
                    "unless it runs --kv-transport none: try --sink-transport stream, which "
                    "every worker can reach)")  # fmt: skip
        return ""

    def describe(self) -> dict:
        return {
            "prompt_len": self.load.prompt_len,
            "decode_target": f"in-process KV sink ({self.load.sink_transport})",
            "nonce": self._nonce,
        }

    async def setup(self) -> None:
        secure_data_planes(self._sink_security)  # before the sink's data plane starts
        await self._sink.start()
        self._channel = open_channel(self.target, self._rpc)
        self._stub = prefill_pb2_grpc.PrefillServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        await self._sink.stop()
        secure_data_planes(None)

    async def server_state(self) -> dict:
        s = await self._stub.Stats(prefill_pb2.PrefillServiceStatsRequest(), timeout=10)
        held = {
            "blocks used": s.kv.num_blocks_used,
            "transfers open": s.num_open_transfers,
            "transfers open at the sink": self._sink.num_open,
            "running": s.num_running_seqs,
            "prefill tokens queued": s.num_queued_prefill_tokens,
        }
        return {
            "num_blocks_used": s.kv.num_blocks_used,
            "num_open_transfers": s.num_open_transfers,
            "sink_transfers": self._sink.num_transfers,
            "sink_bytes": self._sink.num_bytes,
            "held": held,
        }

    def _prompt(self, index: int) -> list[int]:
        rng = random.Random(f"{self.load.seed}:{self._nonce}:prompt:{index}")
        low, high = self.load.vocab
        return [rng.randrange(low, high) for _ in range(self.load.prompt_len)]

    async def run_one(self, index: int, rec: Recorder) -> None:
        request_id = f"loadtest-{self._nonce}-{index}"
        prompt = self._prompt(index)
        request = prefill_pb2.PrefillRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
            target=self._sink.target(request_id),
        )
        start = rec.clock()
        async with rec.rpc("Prefill") as counts:
            done = None
            async for frame in self._stub.Prefill(request, timeout=self.load.rpc_timeout_s):
                if frame.WhichOneof("frame") == "first_token":
                    rec.mark("Prefill first token", start)
                else:
                    done = frame.done
            if done is None:
                raise ScenarioError("INCOMPLETE", "Prefill ended without done")
            if done.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                raise ScenarioError("FINISHED", "the first token ended the request")
            counts.num_tokens = done.num_prompt_tokens
            counts.num_bytes = done.kv_bytes
