"""The router's load test: ``RouterService.Generate``, the client API.

What stands behind the router is the caller's choice:
- its real workers (a cluster from ``banaserve up``): the figures are then the whole serving
  path's, and on a small machine the workers, not the router, are what saturates;
- ``--stub-workers``: this process registers a stub prefill and a stub decode worker with the
  router (``stubs.StubWorkers``: no model, every answer at once), so the router alone is under
  load — routing, ``ReserveKV``, ``Prefill``, ``StreamTokens`` and relaying every token. Use it
  with a router that has no workers of its own (``python -m services.router``).

Each iteration is one ``Generate`` of a fresh prompt of ``--prompt-len`` token ids from
``--vocab-range``, drawn from a generator keyed by the seed, the run's nonce and the iteration's
index (unique across a sweep's steps): no prompt any server has seen, greedy, ``ignore_eos``, ``--max-tokens`` long, read to its ``finished`` frame.
Recorded: ``Generate`` (call to ``finished``; its tokens count towards tokens/s) and
``Generate first token``. After each run ``ListWorkers`` is the leak check: once the workers
report again, none holds a running sequence or a used KV block.

With ``--tls-dir`` the load test is a client (the ``client`` certificate, and the first token of
``--api-token-file`` on every call); the stub workers serve and register with the ``prefill``
and ``decode`` certificates (``credentials.py``).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field

import grpc

from bench.loadtest.credentials import NONE, Credentials
from bench.loadtest.driver import Recorder, ScenarioError, new_nonce
from bench.loadtest.stubs import StubWorkers
from services.common.config import RpcConfig
from services.common.errors import ConfigError
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.rpc.security import Role


@dataclass(frozen=True)
class RouterLoad:
    prompt_len: int = 16
    max_tokens: int = 8
    vocab: tuple[int, int] = (5, 4000)
    stub_workers: bool = False
    model: str = "tiny-llama"  # the stub workers' model name
    rpc_timeout_s: float = 60.0
    seed: int = 0
    nonce: str = field(default_factory=new_nonce)

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.max_tokens < 1:
            raise ConfigError("prompt length and max tokens must be >= 1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bench.serve_bench import vocab_range

    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per request")
    p.add_argument("--max-tokens", type=int, default=8, help="output tokens per request")
    p.add_argument("--vocab-range", type=vocab_range, default=(5, 4000),
                   help="prompt token ids from [LOW, HIGH) (default 5:4000, tiny-llama's)")  # fmt: skip
    p.add_argument("--stub-workers", action="store_true",
                   help="register instant stub workers with the router: measure it alone")  # fmt: skip
    p.add_argument("--model", default="tiny-llama",
                   help="the model name the stub workers register with")  # fmt: skip


class RouterScenario:
    grpc_service = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
    name = "request"
    sample_names = ("request", "Generate", "Generate first token")

    def __init__(
        self, target: str, load: RouterLoad, rpc: RpcConfig | None = None,
        credentials: Credentials = NONE,
    ) -> None:  # fmt: skip
        self.target = target
        self.load = load
        self.credentials = credentials
        self._rpc = credentials.rpc(Role.CLIENT, rpc)
        self._metadata = credentials.metadata
        self._nonce = load.nonce
        self._stubs = None
        if load.stub_workers:
            self._stubs = StubWorkers(target, load.model, rpc, credentials)
        self._channel: grpc.aio.Channel | None = None

    def describe(self) -> dict:
        return {
            "prompt_len": self.load.prompt_len,
            "max_tokens": self.load.max_tokens,
            "workers": "in-process stubs" if self._stubs else "the router's own",
            "nonce": self._nonce,
        }

    async def setup(self) -> None:
        self._channel = open_channel(self.target, self._rpc)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        if self._stubs is not None:
            await self._stubs.start()
            await self._stubs.wait_registered()

    async def close(self) -> None:
        if self._stubs is not None:
            await self._stubs.stop()
        if self._channel is not None:
            await self._channel.close()

    async def server_state(self) -> dict:
        reply = await self._stub.ListWorkers(
            router_pb2.ListWorkersRequest(), timeout=10, metadata=self._metadata
        )
        workers = {
            w.info.worker_id: {
                "active": w.state == router_pb2.WORKER_STATE_ACTIVE,
                "num_running_seqs": w.last_load.num_running_seqs,
                "num_kv_blocks_used": w.last_load.num_kv_blocks_used,
            }
            for w in reply.workers
        }
        held = {}
        for wid, w in workers.items():
            held[f"{wid} running"] = w["num_running_seqs"]
            held[f"{wid} blocks used"] = w["num_kv_blocks_used"]
        return {"workers": workers, "held": held}

    def _prompt(self, index: int) -> list[int]:
        rng = random.Random(f"{self.load.seed}:{self._nonce}:prompt:{index}")
        low, high = self.load.vocab
        return [rng.randrange(low, high) for _ in range(self.load.prompt_len)]

    async def run_one(self, index: int, rec: Recorder) -> None:
        request = router_pb2.GenerateRequest(
            request_id=f"loadtest-{self._nonce}-{index}",
            token_ids=common_pb2.TokenIds(ids=self._prompt(index)),
            sampling=common_pb2.SamplingParams(
                temperature=0.0, max_tokens=self.load.max_tokens, ignore_eos=True,
                detokenize=False,
            ),
        )  # fmt: skip
        start = rec.clock()
        async with rec.rpc("Generate") as counts:
            finished = None
            stream = self._stub.Generate(
                request, timeout=self.load.rpc_timeout_s, metadata=self._metadata
            )
            async for frame in stream:
                kind = frame.WhichOneof("frame")
                if kind == "delta":
                    if counts.num_tokens == 0:
                        rec.mark("Generate first token", start)
                    counts.num_tokens += len(frame.delta.token_ids)
                elif kind == "finished":
                    finished = frame.finished
            if finished is None:
                raise ScenarioError("INCOMPLETE", "Generate ended without finished")
            if finished.finish_reason == common_pb2.FINISH_REASON_ABORT:
                raise ScenarioError("ABORTED", "the router aborted the request")
