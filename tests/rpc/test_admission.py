"""Admission control (services/common/admission.py, services/rpc/admission.py): the exact
admit / queue / shed decision for each call, the fair-share order of waiters, per-client caps,
every way a slot comes back (release, error, cancel while queued, cancel just after the grant),
the interceptor on a real server (RESOURCE_EXHAUSTED with retry-after, health never shed,
streams held until they end), the per-client cap on a decode worker's reservations, and the
HTTP API's 429 / 503. Every test ends with nothing held."""

from __future__ import annotations

import argparse
import asyncio
import logging
from contextlib import asynccontextmanager

import grpc
import httpx2
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.admission import (
    AdmissionConfig,
    AdmissionController,
    ClassLimits,
    HoldQuota,
    MethodClass,
    Outcome,
    OverloadedError,
    Ticket,
    fair_share,
)
from services.common.config import RpcConfig
from services.common.errors import REASON_MARGIN_S, ConfigError, ResourceExhaustedError
from services.decode import core
from services.decode.servicer import decode_service
from services.router.openai_api import OpenAIApi
from services.router.openai_errors import http_client_identity
from services.router.openai_server import HttpServer
from services.rpc.admission import (
    AdmissionInterceptor,
    add_admission_args,
    admission_config,
    client_identity,
    follow_capacity,
    reservation_quota,
)
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import decode_pb2, decode_pb2_grpc
from services.rpc.server import start_server
from tests.router.grpc_fakes import cluster
from tests.router.test_openai_api import LIMITS, MODEL, completion

WORK, STREAM = MethodClass.WORK, MethodClass.STREAM
RPC = RpcConfig(grace_s=0.1)


def controller(in_flight=2, queued=1, per_client=2, wait_s=5.0, stream=4) -> AdmissionController:
    work = ClassLimits(in_flight, queued, wait_s, per_client)
    return AdmissionController(AdmissionConfig(work, ClassLimits(stream)))


def assert_idle(ctl: AdmissionController) -> None:
    for cls in (WORK, STREAM):
        s = ctl.stats(cls)
        assert (s.num_in_flight, s.num_queued, ctl.holders(cls)) == (0, 0, {})


# -- decisions -------------------------------------------------------------------------------


def test_admit_queue_shed_decisions_in_order():
    async def main():
        ctl = controller(in_flight=2, queued=1, per_client=2)
        a1 = await ctl.admit(WORK, "a")
        assert ctl.offer(WORK, "a") is Outcome.ADMITTED
        a2 = await ctl.admit(WORK, "a")
        assert ctl.offer(WORK, "a") is Outcome.SHED_CLIENT_LIMIT  # holds 2 = its cap
        assert ctl.offer(WORK, "b") is Outcome.QUEUED
        b = asyncio.ensure_future(ctl.admit(WORK, "b"))
        await asyncio.sleep(0)  # b enqueues
        assert ctl.offer(WORK, "c") is Outcome.SHED_QUEUE_FULL
        with pytest.raises(OverloadedError) as shed:
            await ctl.admit(WORK, "c")
        assert shed.value.outcome is Outcome.SHED_QUEUE_FULL
        assert isinstance(shed.value, ResourceExhaustedError)
        assert str(shed.value) == "overloaded: 2 work calls in flight and 1 queued"
        with pytest.raises(OverloadedError) as shed:
            await ctl.admit(WORK, "a")
        assert str(shed.value) == "client 'a' holds its share (2 work calls in flight or queued)"
        assert ctl.holders(WORK) == {"a": 2, "b": 1}
        a1.release()
        b_ticket = await b
        assert ctl.holders(WORK) == {"a": 1, "b": 1}
        a1.release()  # idempotent: releasing twice frees one slot
        assert ctl.stats(WORK).num_in_flight == 2
        a2.release()
        b_ticket.release()
        s = ctl.stats(WORK)
        assert (s.num_admitted, s.num_waited, s.peak_in_flight, s.peak_queued) == (3, 1, 2, 1)
        assert dict(s.num_shed) == {Outcome.SHED_QUEUE_FULL: 1, Outcome.SHED_CLIENT_LIMIT: 1}
        assert_idle(ctl)

    asyncio.run(main())


def test_freed_slot_goes_to_the_waiting_client_holding_fewest():
    async def main():
        ctl = controller(in_flight=2, queued=4, per_client=3)
        a = [await ctl.admit(WORK, "a"), await ctl.admit(WORK, "a")]
        waiting = {asyncio.ensure_future(ctl.admit(WORK, c)): c for c in ("a", "b", "c")}
        await asyncio.sleep(0)
        assert ctl.stats(WORK).num_queued == 3

        async def next_admitted() -> tuple[str, Ticket]:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1
            task = done.pop()
            return waiting.pop(task), task.result()

        a[0].release()  # a holds 2 (1 running, 1 queued), b and c 1 each: b waited longest
        b = await next_admitted()
        assert b[0] == "b"
        a[1].release()  # a holds 1 (queued), c 1: a waited longer
        second = await next_admitted()
        assert second[0] == "a"
        b[1].release()
        third = await next_admitted()
        assert third[0] == "c"
        second[1].release()
        third[1].release()
        assert_idle(ctl)

    asyncio.run(main())


def test_a_queued_call_is_shed_when_its_wait_or_deadline_runs_out():
    async def main():
        ctl = controller(in_flight=1, queued=2, per_client=3, wait_s=0.05)
        held = await ctl.admit(WORK, "a")
        with pytest.raises(OverloadedError) as shed:
            await ctl.admit(WORK, "b")  # max_wait_s
        assert shed.value.outcome is Outcome.SHED_WAIT_TIMEOUT
        assert str(shed.value) == "overloaded: no work slot freed within 0.05s"
        with pytest.raises(OverloadedError):
            await ctl.admit(WORK, "b", timeout_s=0.0)  # the call's own deadline is sooner
        assert ctl.holders(WORK) == {"a": 1}
        assert ctl.stats(WORK).num_shed[Outcome.SHED_WAIT_TIMEOUT] == 2
        held.release()
        assert_idle(ctl)

    asyncio.run(main())


def test_a_call_whose_deadline_comes_first_is_shed_before_it():
    """A queued call with less time left than ``max_wait_s`` is shed ``REASON_MARGIN_S``
    before its deadline, so its caller reads RESOURCE_EXHAUSTED and retry-after (before
    session 36 the shed came at the deadline itself, where the caller's timer won)."""

    async def main():
        ctl = controller(in_flight=1, queued=2, per_client=3, wait_s=5.0)
        held = await ctl.admit(WORK, "a")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(OverloadedError) as shed:
            await ctl.admit(WORK, "b", timeout_s=1.0)
        took = loop.time() - started
        assert shed.value.outcome is Outcome.SHED_WAIT_TIMEOUT
        held.release()
        assert_idle(ctl)
        return took

    took = asyncio.run(main())
    assert 1.0 - REASON_MARGIN_S - 0.01 <= took < 1.0, took


def test_cancelled_waiters_leak_nothing_even_just_after_their_grant():
    async def main():
        ctl = controller(in_flight=1, queued=2, per_client=3)
        held = await ctl.admit(WORK, "a")
        cancelled = asyncio.ensure_future(ctl.admit(WORK, "b"))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert ctl.holders(WORK) == {"a": 1}
        # Granted and cancelled in the same turn: the waiter hands its slot on to the next.
        granted = asyncio.ensure_future(ctl.admit(WORK, "b"))
        after = asyncio.ensure_future(ctl.admit(WORK, "c"))
        await asyncio.sleep(0)
        held.release()  # grants b...
        granted.cancel()  # ...whose task is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await granted
        ticket = await after
        assert ctl.holders(WORK) == {"c": 1}
        ticket.release()
        assert_idle(ctl)

    asyncio.run(main())


def test_disabled_admits_everything():
    async def main():
        limits = ClassLimits(1, 0, 0.0, 1)
        ctl = AdmissionController(AdmissionConfig(limits, limits, enabled=False))
        tickets = [await ctl.admit(WORK, "a") for _ in range(3)]
        assert ctl.stats(WORK).num_in_flight == 3
        for t in tickets:
            t.release()
        assert_idle(ctl)

    asyncio.run(main())


def test_hold_quota_caps_each_client_and_drops_once():
    quota = HoldQuota(2)
    holds = [quota.take("a"), quota.take("a")]
    with pytest.raises(OverloadedError) as refused:
        quota.take("a")
    assert str(refused.value) == (
        "client 'a' holds 2 reservations here, its share (at most 2 per client)"
    )
    b = quota.take("b")
    holds[0].drop()
    holds[0].drop()
    assert quota.held() == {"a": 1, "b": 1}
    for h in (holds[1], quota.take("a"), b):
        h.drop()
    assert quota.held() == {}
    with pytest.raises(ConfigError):
        HoldQuota(0)
    trusting = HoldQuota(1, trusted_clients=frozenset({"cert:router"}))
    router = [trusting.take("cert:router") for _ in range(3)]
    assert trusting.held() == {"cert:router": 3}
    for h in router:
        h.drop()
    assert trusting.held() == {}


def test_a_trusted_client_is_exempt_from_the_per_client_cap_only():
    async def main():
        work = ClassLimits(2, 0, 0.0, 1)
        trusted = frozenset({"cert:router"})
        ctl = AdmissionController(AdmissionConfig(work, work, trusted_clients=trusted))
        tickets = [await ctl.admit(WORK, "cert:router") for _ in range(2)]
        assert ctl.offer(WORK, "cert:router") is Outcome.SHED_QUEUE_FULL  # the class limit
        for t in tickets:
            t.release()
        assert_idle(ctl)

    asyncio.run(main())


# -- config ----------------------------------------------------------------------------------


def test_config_defaults_derive_from_capacity():
    assert [fair_share(n) for n in (1, 2, 4, 64, 256)] == [1, 1, 3, 48, 192]
    parser = argparse.ArgumentParser()
    add_admission_args(parser, reservations=True)
    args = parser.parse_args([])
    config = admission_config(args, 64)
    assert config.work == ClassLimits(64, 64, 1.0, 48)
    assert config.stream == ClassLimits(256, 0, 0.0, 0)
    assert (config.stream.per_client, config.retry_after_s, config.enabled) == (256, 1.0, True)
    assert reservation_quota(args, 64).max_per_client == 48
    args = parser.parse_args(
        ["--admission-max-in-flight", "8", "--admission-max-queued", "0"]
        + ["--admission-max-wait", "0.5", "--admission-max-per-client", "8"]
        + ["--max-reservations-per-client", "5"]
    )
    assert admission_config(args, 64).work == ClassLimits(8, 0, 0.5, 8)
    assert reservation_quota(args, 64).max_per_client == 5
    assert reservation_quota(parser.parse_args(["--no-admission"]), 64) is None
    for bad in (dict(max_in_flight=0), dict(max_in_flight=1, max_queued=-1),
                dict(max_in_flight=1, max_wait_s=float("nan"))):  # fmt: skip
        with pytest.raises(ConfigError):
            ClassLimits(**bad)


def test_reconfigured_limits_grant_waiters_at_once_and_shrink_as_calls_end():
    async def main():
        ctl = controller(in_flight=1, queued=2, per_client=3)
        first = await ctl.admit(WORK, "a")
        waiting = asyncio.ensure_future(ctl.admit(WORK, "b"))
        await asyncio.sleep(0)
        assert ctl.stats(WORK).num_queued == 1
        ctl.reconfigure(AdmissionConfig(ClassLimits(3, 2, 5.0, 3), ClassLimits(12)))
        second = await asyncio.wait_for(waiting, 1)  # the grown slot, without a release
        assert ctl.stats(WORK).num_in_flight == 2
        ctl.reconfigure(AdmissionConfig(ClassLimits(1, 0, 5.0, 1), ClassLimits(4)))
        assert ctl.offer(WORK, "c") is Outcome.SHED_QUEUE_FULL  # 2 in flight, 1 allowed
        first.release()
        assert ctl.offer(WORK, "c") is Outcome.SHED_QUEUE_FULL  # still 1 in flight
        second.release()
        assert ctl.offer(WORK, "c") is Outcome.ADMITTED
        assert_idle(ctl)

    asyncio.run(main())


def test_the_router_capacity_follows_its_workers_unless_a_flag_fixes_it():
    parser = argparse.ArgumentParser()
    add_admission_args(parser)
    seqs = [0]

    async def follow(argv: list[str], capacities: list[int]) -> list[ClassLimits]:
        args = parser.parse_args(argv)
        ctl = AdmissionController(admission_config(args, 64))
        task = asyncio.ensure_future(follow_capacity(lambda: seqs[0], ctl, args, 64, 0.01))
        seen = []
        for n in capacities:
            seqs[0] = n
            await asyncio.sleep(0.05)
            seen.append(ctl.config.work)
        task.cancel()
        return seen

    seen = asyncio.run(follow([], [0, 128, 512, 96, 32]))
    in_flight = [limits.max_in_flight for limits in seen]
    assert in_flight == [64, 128, 512, 96, 64]  # at least the floor
    assert seen[2] == ClassLimits(512, 512, 1.0, 384)  # queue and share derived as at start
    # An explicit per-client cap stays; an explicit capacity is not followed at all.
    seen = asyncio.run(follow(["--admission-max-per-client", "5"], [256]))
    assert seen[0] == ClassLimits(256, 256, 1.0, 5)
    seen = asyncio.run(follow(["--admission-max-in-flight", "8"], [256]))
    assert seen[0].max_in_flight == 8


def test_every_method_of_every_service_is_classified():
    from services.rpc.gen.banaserve.v1 import kvstore_pb2, prefill_pb2, router_pb2

    classes = {}
    for module, name in (
        (router_pb2, "RouterService"),
        (prefill_pb2, "PrefillService"),
        (decode_pb2, "DecodeService"),
        (kvstore_pb2, "KVStoreService"),
    ):
        service = module.DESCRIPTOR.services_by_name[name]
        for m in service.methods:
            classes[m.name if name != "KVStoreService" else f"kv.{m.name}"] = (
                AdmissionController.classify(f"/{service.full_name}/{m.name}").value
            )
    assert classes == {
        "Generate": "work", "Abort": "exempt", "ListWorkers": "exempt", "ReportLoad": "exempt",
        "Prefill": "work", "Stats": "exempt",
        "ReserveKV": "work", "TransferKV": "stream", "StreamTokens": "stream", "Release": "exempt",
        "RenewLease": "exempt",
        "kv.Lookup": "work", "kv.Pin": "work", "kv.Reserve": "work", "kv.Commit": "stream",
        "kv.Unpin": "exempt", "kv.Abort": "exempt", "kv.Stats": "exempt",
    }  # fmt: skip
    assert AdmissionController.classify("/grpc.health.v1.Health/Check") is MethodClass.EXEMPT


# -- on a real server: a decode servicer over a worker that waits when told to --------------


class GatedWorker:
    """Stands for DecodeWorker: ``reserve`` waits for ``gate`` when the request id says
    "slow"; every reservation stays until ``end(request_id)``."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.ends: dict[str, asyncio.Event] = {}

    async def reserve(
        self, request_id, prompt, params, lease_s, timeout_s, locally, local_max=0, resume=()
    ):
        if request_id.startswith("slow"):
            await self.gate.wait()
        if request_id.startswith("fail"):
            raise ResourceExhaustedError("no blocks")
        self.ends[request_id] = asyncio.Event()
        return core.Reservation(request_id, f"res-{request_id}", core.RequestStatus.RESERVED, 1, 5)

    def ended(self, request_id: str) -> asyncio.Event:
        return self.ends.get(request_id) or asyncio.Event()

    async def stream(self, request_id: str):
        await self.gate.wait()
        yield core.Finished(core.FinishReason.STOP, 1, 0)

    def end(self, request_id: str) -> None:
        self.ends.pop(request_id).set()

    async def stats(self):
        return core.WorkerStats(8, 8, 0, 0, 0, [])


@asynccontextmanager
async def decode_server(ctl: AdmissionController, quota: HoldQuota | None = None):
    worker = GatedWorker()
    server = await start_server(
        [decode_service(worker, quota=quota)], RPC, interceptors=[AdmissionInterceptor(ctl)]
    )
    channel = open_channel(server.address, RPC)
    try:
        yield worker, decode_pb2_grpc.DecodeServiceStub(channel), channel
    finally:
        await channel.close()
        await server.stop(0)


def reserve(stub, request_id: str, client: str = "", **kwargs):
    metadata = (("x-banaserve-client", client),) if client else None
    request = decode_pb2.ReserveKVRequest(request_id=request_id, prompt_token_ids=[1, 2])
    return stub.ReserveKV(request, metadata=metadata, **kwargs)


def test_interceptor_sheds_with_retry_after_and_never_sheds_health():
    async def main():
        ctl = controller(in_flight=1, queued=0, per_client=2, stream=1)
        async with decode_server(ctl) as (worker, stub, channel):
            slow = reserve(stub, "slow-1")
            while ctl.stats(WORK).num_in_flight == 0:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as shed:
                await reserve(stub, "r2", timeout=5)
            assert shed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert shed.value.details() == "overloaded: 1 work calls in flight and 0 queued"
            assert ("retry-after", "1") in tuple(shed.value.trailing_metadata())
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            await stub.Stats(decode_pb2.DecodeServiceStatsRequest(), timeout=5)  # exempt
            # A stream holds its STREAM slot until it ends, here by the client's cancel.
            tokens = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="slow-1"))
            while ctl.stats(STREAM).num_in_flight == 0:
                await asyncio.sleep(0.01)
            second = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="x"))
            with pytest.raises(grpc.aio.AioRpcError) as shed:
                await second.read()
            assert shed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            tokens.cancel()
            worker.gate.set()
            assert (await slow).reservation_id == "res-slow-1"
            while ctl.stats(STREAM).num_in_flight or ctl.stats(WORK).num_in_flight:
                await asyncio.sleep(0.01)
            # A handler that fails gives its slot back too.
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await reserve(stub, "fail-1", timeout=5)
            assert failed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert failed.value.details() == "no blocks"
        assert_idle(ctl)

    asyncio.run(main())


def test_one_client_cannot_take_every_reservation_slot():
    """The probe's attack: ReserveKV after ReserveKV from one caller filled every sequence
    slot of a decode worker. Each caller now holds at most its share; others are served."""

    async def main():
        ctl = controller(in_flight=64, queued=64, per_client=48, stream=256)
        quota = HoldQuota(3)
        async with decode_server(ctl, quota) as (worker, stub, _):
            for i in range(3):
                await reserve(stub, f"hog-{i}", "hog", timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await reserve(stub, "hog-3", "hog", timeout=5)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == (
                "client 'client:hog' holds 3 reservations here, its share (at most 3 per client)"
            )
            await reserve(stub, "other-0", "other", timeout=5)
            # No name: the peer address (this channel's connection) is the client.
            await reserve(stub, "anon-0", timeout=5)
            held = quota.held()
            assert held.pop("client:hog") == 3 and held.pop("client:other") == 1
            assert list(held.values()) == [1] and next(iter(held)).startswith("peer:ipv4:127.")
            with pytest.raises(grpc.aio.AioRpcError):
                await reserve(stub, "fail-1", "hog2", timeout=5)  # a failed reserve holds nothing
            worker.end("hog-0")  # the request ended: its slot counts no more
            while quota.held()["client:hog"] == 3:
                await asyncio.sleep(0.01)
            await reserve(stub, "hog-3", "hog", timeout=5)
            for request_id in list(worker.ends):
                worker.end(request_id)
            while quota.held():
                await asyncio.sleep(0.01)
        assert_idle(ctl)

    asyncio.run(main())


# -- the OpenAI HTTP API ---------------------------------------------------------------------


def test_http_api_answers_429_for_a_client_over_its_share_and_503_when_full():
    async def main():
        ctl = controller(in_flight=1, queued=0, per_client=1)
        async with cluster() as c:
            api = OpenAIApi(c.driver, MODEL, LIMITS, admission=ctl)
            http = HttpServer(api.app, "127.0.0.1", 0, grace_s=0.1, on_stop=api.close)
            await http.start()
            try:
                async with httpx2.AsyncClient(base_url=f"http://{http.address}", timeout=10) as h:
                    hog = await ctl.admit(WORK, "client:hog")
                    headers = {"x-banaserve-client": "hog"}
                    mine = await h.post("/v1/completions", json=completion(), headers=headers)
                    other = await h.post("/v1/completions", json=completion())
                    hog.release()
                    ok = await h.post("/v1/completions", json=completion())
                    streamed = await h.post("/v1/completions", json=completion(stream=True))
            finally:
                await http.stop()
        assert (mine.status_code, mine.headers["retry-after"]) == (429, "1")
        assert mine.json()["error"] == {
            "message": "client 'client:hog' holds its share (1 work calls in flight or queued)",
            "type": "rate_limit_error",
            "param": None,
            "code": "resource_exhausted",
        }
        assert (other.status_code, other.headers["retry-after"]) == (503, "1")
        assert other.json()["error"]["type"] == "service_unavailable_error"
        assert (ok.status_code, streamed.status_code) == (200, 200)
        assert streamed.text.endswith("data: [DONE]\n\n")
        assert ctl.stats(WORK).num_admitted == 3
        assert_idle(ctl)

    asyncio.run(main())


class FakeContext:
    def __init__(self, metadata=(), auth=None) -> None:
        self._metadata, self._auth = metadata, auth or {}

    def invocation_metadata(self):
        return self._metadata

    def auth_context(self):
        return self._auth

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"


def test_client_identity_prefers_the_authenticated_identity_then_the_name_then_the_peer():
    named = ("x-banaserve-client", "batch-jobs")
    token = ("authorization", "Bearer s3cret")
    assert client_identity(FakeContext()) == "peer:ipv4:127.0.0.1:5555"
    assert client_identity(FakeContext((named,))) == "client:batch-jobs"
    assert client_identity(FakeContext((named, token))).startswith("token:")
    assert "s3cret" not in client_identity(FakeContext((token,)))
    long_name = ("x-banaserve-client", "x" * 1000)
    assert client_identity(FakeContext((long_name,))) == "client:" + "x" * 128


async def _dribble(address: str, body_start: bytes, declared: int):  # noqa: ANN202
    """A connection that declares a body of ``declared`` bytes and sends only ``body_start``."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n")  # fmt: skip
    writer.write(head.encode() + body_start)
    await writer.drain()
    return reader, writer


def test_http_clients_that_withhold_their_bodies_hold_no_slot_and_are_cut_off(caplog):
    """Session 20's probe: 64 connections each sending half a body held every WORK slot (the
    slot was taken before the body was read, with no time limit), shutting out every client
    of both APIs. Now the body is read first, within ``body_timeout_s`` (then 408), and one
    host is one client: a withheld body holds nothing, and a normal request still runs."""

    async def main():
        ctl = controller(in_flight=2, queued=0, per_client=2)
        async with cluster() as c:
            api = OpenAIApi(c.driver, MODEL, LIMITS, admission=ctl, body_timeout_s=0.5)
            http = HttpServer(api.app, "127.0.0.1", 0, grace_s=0.1, on_stop=api.close)
            await http.start()
            try:
                slow = [await _dribble(http.address, b'{"prompt":', 100) for _ in range(4)]
                async with httpx2.AsyncClient(base_url=f"http://{http.address}", timeout=10) as h:
                    ok = await h.post("/v1/completions", json=completion())
                    assert ctl.stats(WORK).num_admitted == 1
                    # The withheld bodies time out: 408 in OpenAI's shape, each connection's.
                    answers = [await asyncio.wait_for(r.read(4096), 10) for r, _ in slow]
                    # A client that sends half a body and goes away is no internal error.
                    _, gone = await _dribble(http.address, b'{"prompt":', 100)
                    gone.close()
                    await asyncio.sleep(0.2)
                    after = await h.post("/v1/completions", json=completion())
                for _, w in slow:
                    w.close()
            finally:
                await http.stop()
        assert ok.status_code == 200 and after.status_code == 200
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
            assert b"the request body did not arrive within 0.5 s (10 bytes came)" in answer
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert_idle(ctl)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())


def test_an_http_client_is_its_host_not_each_connection():
    class Peer:
        host, port = "10.0.0.7", 50123

    class FakeRequest:
        def __init__(self, headers=None, port=50123):  # noqa: ANN001
            self.headers = headers or {}
            self.client = Peer()
            self.client.port = port

    assert http_client_identity(FakeRequest()) == "peer:10.0.0.7"
    assert http_client_identity(FakeRequest(port=50999)) == http_client_identity(FakeRequest())
    assert http_client_identity(FakeRequest({"x-banaserve-client": "etl"})) == "client:etl"
