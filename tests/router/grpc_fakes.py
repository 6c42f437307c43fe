"""In-process servers for router tests: the real router, and minimal fake workers.

The fakes serve PrefillService and DecodeService on one server each, record every call (with
whether it carried a deadline) in one shared log, and follow the protocol of prefill.proto /
decode.proto just far enough to exercise the router's orchestration (a decode worker's
reservation names a data plane, which the prefill call must carry on). Behaviour per worker:
``tokens`` to produce, ``finish_on_prefill``, ``hang_decode`` (StreamTokens stalls after one
delta, for cancel/abort/deadline tests; as set when the stream starts); set on one worker afterwards, ``die_after_deltas`` (its
StreamTokens sends that many deltas, then it is gone: every call UNAVAILABLE) and
``prefill_dies_after_first`` (the same after its Prefill's first token); failed engine steps
(INTERNAL, the worker serving on): ``fail_step_after_deltas`` (StreamTokens, once),
``fail_prefill_steps`` (that many Prefill calls before their first token) and
``fail_prefill_after_first`` (once, after it). A reservation that
resumes a request (``resume_output_token_ids``) streams ``tokens`` after those it names.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc

from services.common.config import RpcConfig
from services.router.clients import GrpcWorkerClients
from services.router.core import Router, RouterConfig
from services.router.driver import DriverConfig, RequestDriver
from services.router.prompts import PromptEncoder, ResumeCheck
from services.router.registry import WorkerRole
from services.router.servicer import RouterServicer
from services.rpc.channels import open_channel
from services.rpc.convert import duration
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    kvstore_pb2,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from services.rpc.server import RunningServer, Service, start_server
from tests.router.factories import capacity, load

RPC = RpcConfig(grace_s=0.1)


@dataclass
class CallLog:
    calls: list[tuple] = field(default_factory=list)
    deadlines: list[tuple[str, float | None]] = field(default_factory=list)
    # request id -> the KV target's data plane as the prefill worker got it: (address, transport)
    data_planes: dict[str, tuple[str, int]] = field(default_factory=dict)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    stream_cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, context, *call) -> None:
        self.calls.append(call)
        self.deadlines.append((call[0], context.time_remaining()))


class FakeWorker(prefill_pb2_grpc.PrefillServiceServicer, decode_pb2_grpc.DecodeServiceServicer):
    def __init__(
        self,
        worker_id: str,
        log: CallLog,
        tokens: tuple[int, ...] = (7, 8, 9, 10),
        finish_on_prefill: bool = False,
        hang_decode: bool = False,
        full_reserves: int = 0,
    ) -> None:
        self.worker_id, self.log, self.tokens = worker_id, log, tokens
        self.finish_on_prefill, self.hang_decode = finish_on_prefill, hang_decode
        self.full_reserves = full_reserves  # refuse this many ReserveKV calls, as a full pool
        self.local: set[str] = set()  # requests reserved with prefill_locally
        self.shutting_down = False  # every call answers CANCELLED, as a server that stops
        self.die_after_deltas: int | None = None
        self.fail_step_after_deltas: int | None = None  # once: INTERNAL, as a failed step
        self.prefill_dies_after_first = False
        self.fail_prefill_steps = 0  # Prefill calls that fail INTERNAL before their first token
        self.fail_prefill_after_first = False  # once: INTERNAL after the first token
        self.dead = False
        self.resumed: dict[str, int] = {}  # request id -> tokens the caller has
        self.release_delay_s = 0.0  # each Release takes effect this late ("released" then)
        self.prefill_delay_s = 0.0  # a prompt queued or computing this long before its token
        self.renew_fails: grpc.StatusCode | None = None  # every RenewLease fails with it

    async def _unless_dead(self, context) -> None:
        if self.dead:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.worker_id} is gone")

    async def _die(self, context) -> None:
        self.dead = True
        await self._unless_dead(context)

    async def ReserveKV(self, request, context):
        call = ("reserve", self.worker_id, request.request_id)
        await self._unless_dead(context)
        self.resumed.pop(request.request_id, None)  # an earlier request's with this id
        self.local.discard(request.request_id)
        if request.resume_output_token_ids:
            call += ("resume", tuple(request.resume_output_token_ids))
            self.resumed[request.request_id] = len(request.resume_output_token_ids)
            assert request.prefill_locally
        if request.prefill_locally:
            call += ("prefill_locally",)
            self.local.add(request.request_id)
        elif request.local_prefill_max_tokens:  # as a D whose cache holds the prompt
            call += ("local_prefill",)
            self.local.add(request.request_id)
        self.log.record(context, *call)
        assert request.HasField("timeout") and request.HasField("lease")
        if self.full_reserves:
            self.full_reserves -= 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "72 KV blocks needed, 6 free")
        return decode_pb2.ReserveKVResponse(
            reservation_id=f"res-{request.request_id}",
            data_address=f"data-{self.worker_id}:1",
            data_transport=kvstore_pb2.DATA_TRANSPORT_TCP,
            prefilling_locally=request.request_id in self.local,
            lease=request.lease,
        )

    async def RenewLease(self, request, context):
        asked = round(request.lease.ToNanoseconds() / 1e9, 3)
        self.log.record(
            context, "renew", self.worker_id, request.request_id, request.reservation_id, asked
        )
        await self._unless_dead(context)
        if self.renew_fails is not None:
            await context.abort(self.renew_fails, "RenewLease fails here")
        return decode_pb2.RenewLeaseResponse(lease=request.lease)

    async def Prefill(self, request, context):
        t = request.target
        self.log.record(
            context, "prefill", self.worker_id, request.request_id, t.worker_id, t.reservation_id
        )
        if self.shutting_down:
            await context.abort(grpc.StatusCode.CANCELLED, "the server is shutting down")
        await self._unless_dead(context)
        self.log.data_planes[request.request_id] = (t.data_address, t.data_transport)
        if self.fail_prefill_steps:  # the step failed; the worker serves on
            self.fail_prefill_steps -= 1
            await context.abort(grpc.StatusCode.INTERNAL, "the engine step failed")
        await asyncio.sleep(self.prefill_delay_s)
        first = common_pb2.TokenDelta(token_ids=[self.tokens[0]], text=f"<{self.tokens[0]}>")
        yield prefill_pb2.PrefillResponse(first_token=first)
        if self.prefill_dies_after_first:
            await self._die(context)
        if self.fail_prefill_after_first:
            self.fail_prefill_after_first = False
            await context.abort(grpc.StatusCode.INTERNAL, "the engine step failed")
        reason = common_pb2.FINISH_REASON_STOP if self.finish_on_prefill else 0
        done = prefill_pb2.PrefillDone(
            finish_reason=reason,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=16,
            prefill=duration(0.25),
            kv_transfer=duration(0.125),
            kv_transfer_exposed=duration(0.0625),
            kv_bytes=4096,
        )
        yield prefill_pb2.PrefillResponse(done=done)

    async def StreamTokens(self, request, context):
        self.log.record(context, "stream", self.worker_id, request.request_id)
        await self._unless_dead(context)
        local = request.request_id in self.local
        start = self.resumed.get(request.request_id, 0 if local else 1)
        # As set when the stream starts: a test that clears it for the next stream must not
        # release one that has not yet resumed from its first delta (under load it had not, and
        # ran to its end: session 40's flaky take-over test).
        hang = self.hang_decode
        try:
            for sent, token in enumerate(self.tokens[start:]):
                if sent == self.die_after_deltas:
                    await self._die(context)
                if sent == self.fail_step_after_deltas:  # the step failed; the worker serves on
                    self.fail_step_after_deltas = None
                    await context.abort(grpc.StatusCode.INTERNAL, "the engine step failed")
                delta = common_pb2.TokenDelta(token_ids=[token], text=f"<{token}>")
                yield decode_pb2.StreamTokensResponse(delta=delta)
                if hang:
                    await asyncio.sleep(30)
            if self.die_after_deltas == len(self.tokens[start:]):  # after its last token
                await self._die(context)
            finished = decode_pb2.DecodeFinished(
                finish_reason=common_pb2.FINISH_REASON_LENGTH,
                num_completion_tokens=len(self.tokens),
                num_cached_tokens=16 if local else 0,  # one block of the 20-token prompt
            )
            yield decode_pb2.StreamTokensResponse(finished=finished)
        except asyncio.CancelledError:
            self.log.stream_cancelled.set()
            raise

    async def Release(self, request, context):
        reason = decode_pb2.ReleaseReason.Name(request.reason)
        self.log.record(context, "release", self.worker_id, request.request_id, reason)
        await self._unless_dead(context)
        if self.release_delay_s:  # a slow release: when it took effect is logged too
            await asyncio.sleep(self.release_delay_s)
            self.log.record(context, "released", self.worker_id, request.request_id)
        self.log.released.set()
        return decode_pb2.ReleaseResponse(found=True)


def worker_services(worker: FakeWorker) -> list[Service]:
    return [
        Service.bind(
            worker,
            prefill_pb2_grpc.add_PrefillServiceServicer_to_server,
            prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"],
        ),
        Service.bind(
            worker,
            decode_pb2_grpc.add_DecodeServiceServicer_to_server,
            decode_pb2.DESCRIPTOR.services_by_name["DecodeService"],
        ),
    ]


def dead_address() -> str:
    """A loopback port nobody listens on: calls to it fail with UNAVAILABLE at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Cluster:
    router: Router
    driver: RequestDriver
    stub: router_pb2_grpc.RouterServiceStub
    log: CallLog
    workers: dict[str, FakeWorker]

    def add(self, worker_id: str, role: WorkerRole, address: str) -> None:
        self.router.register(worker_id, address, role, capacity())
        self.router.report(worker_id, load(), 1.0)


@asynccontextmanager
async def cluster(
    prefill: int = 1,
    decode: int = 1,
    mixed: int = 0,
    policy: str = "load",
    dead: tuple[str, ...] = (),
    report_timeout_s: float = 60.0,
    no_worker_wait_s: float = 0.2,
    local_prefill_max_tokens: int = 0,
    local_prefill_queue_tokens: int = 0,
    vocab_size: int | None = None,
    max_resumes: int = DriverConfig.max_resumes,
    resumable: ResumeCheck | None = None,
    lease_s: float = DriverConfig.lease_s,
    id_reuse_wait_s: float = DriverConfig.id_reuse_wait_s,
    **behaviour,
) -> AsyncIterator[Cluster]:
    """A router with fake workers p0.., d0.. registered (each in ``dead`` at a dead address)."""
    router = Router(RouterConfig(policy=policy, report_timeout_s=report_timeout_s))
    clients = GrpcWorkerClients(RPC)
    config = DriverConfig(
        release_timeout_s=1.0,
        no_worker_wait_s=no_worker_wait_s,
        local_prefill_max_tokens=local_prefill_max_tokens,
        local_prefill_queue_tokens=local_prefill_queue_tokens,
        max_resumes=max_resumes,
        lease_s=lease_s,
        id_reuse_wait_s=id_reuse_wait_s,
    )
    driver = RequestDriver(router, clients, config)
    prompts = PromptEncoder(
        lambda text, chat: [ord(c) for c in text], vocab_size=vocab_size, resumable=resumable
    )
    servicer = RouterServicer(driver, prompts=prompts)
    servers: list[RunningServer] = []
    router_server = await start_server([router_service(servicer)], RPC)
    channel = open_channel(router_server.address, RPC)
    log = CallLog()
    stub = router_pb2_grpc.RouterServiceStub(channel)
    stub._router_address = router_server.address  # for clients that open their own channel
    c = Cluster(router, driver, stub, log, {})
    try:
        for prefix, role, count in (
            ("p", WorkerRole.PREFILL, prefill),
            ("d", WorkerRole.DECODE, decode),
            ("m", WorkerRole.MIXED, mixed),
        ):
            for i in range(count):
                worker_id = f"{prefix}{i}"
                if worker_id in dead:
                    c.add(worker_id, role, dead_address())
                    continue
                worker = FakeWorker(worker_id, log, **behaviour)
                server = await start_server(worker_services(worker), RPC)
                servers.append(server)
                c.workers[worker_id] = worker
                c.add(worker_id, role, server.address)
        yield c
    finally:
        await channel.close()
        await clients.close()
        for server in (router_server, *servers):
            await server.stop(0)


def router_service(servicer: RouterServicer) -> Service:
    return Service.bind(
        servicer,
        router_pb2_grpc.add_RouterServiceServicer_to_server,
        router_pb2.DESCRIPTOR.services_by_name["RouterService"],
    )
