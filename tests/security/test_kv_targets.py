"""Arbitrary KV targets (issue 16, item 4): the probe made a prefill worker stream a prompt's KV
to an address of its choosing. Now only the router may call Prefill (mutual TLS), and the worker
checks every target against the router's list of registered decode workers before connecting."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.prefill.kv_targets import (
    CheckedKVTransport,
    RegisteredTargets,
    checked_by_router,
    router_lister,
)
from services.prefill.transport import KVTarget, KVTransport, TransferError
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from services.rpc.security import Role
from tests.router.factories import BLOCK_SIZE, FINGERPRINT, NUM_BLOCKS
from tests.security.helpers import C, channel_as, code_of, secure_cluster, secured

D0 = KVTarget("d0", "127.0.0.1:5000", "res-1", "127.0.0.1:5001", "tcp")


class RecordingTransport(KVTransport):
    def __init__(self) -> None:
        self.opened: list[str] = []

    async def open(self, target, request_id, num_layers, timeout_s):
        self.opened.append(target.worker_id)
        return object()

    async def close(self) -> None:
        pass


class Listing:
    """The router's decode workers, as ``list_workers`` returns them; counts the calls."""

    def __init__(self, **workers: str) -> None:
        self.workers = dict(workers)
        self.num_calls = 0

    async def __call__(self) -> dict[str, str]:
        self.num_calls += 1
        return dict(self.workers)


def _registration(worker_id: str, address: str) -> list[router_pb2.ReportLoadRequest]:
    info = router_pb2.WorkerInfo(
        worker_id=worker_id,
        address=address,
        role=common_pb2.WORKER_ROLE_DECODE,
        model="m",
        fingerprint=FINGERPRINT,
        block_size=BLOCK_SIZE,
        num_kv_blocks=NUM_BLOCKS,
        max_model_len=128,
    )
    load = router_pb2.ReportLoadRequest(load=router_pb2.LoadReport())
    return [router_pb2.ReportLoadRequest(worker=info), load]


async def _until_none(frames: asyncio.Queue):
    while (frame := await frames.get()) is not None:
        yield frame


def _open(transport: KVTransport, target: KVTarget):
    return transport.open(target, "r1", 2, 5.0)


def test_a_target_the_router_never_registered_is_refused_before_any_connection():
    async def main():
        listing = Listing(d0="127.0.0.1:5000")
        inner = RecordingTransport()
        transport = CheckedKVTransport(inner, RegisteredTargets(listing))
        evil = [
            KVTarget("evil", "10.0.0.66:5000", "res-1"),  # unknown worker
            KVTarget("d0", "10.0.0.66:5000", "res-1"),  # a known id at another address
            KVTarget("d0", "127.0.0.1:5000", "res-1", "10.0.0.66:5001", "tcp"),  # data elsewhere
        ]
        for target in evil:
            with pytest.raises(TransferError) as info:
                await _open(transport, target)
            assert info.value.code == "PERMISSION_DENIED"
        assert inner.opened == []
        assert listing.num_calls == 3  # each miss asked the router again
        await _open(transport, D0)
        await _open(transport, D0)
        assert inner.opened == ["d0", "d0"]
        assert listing.num_calls == 3  # a known target costs no call

    asyncio.run(main())


def test_a_worker_registered_after_the_last_listing_is_found_by_one_refresh():
    async def main():
        listing = Listing(d0="127.0.0.1:5000")
        targets = RegisteredTargets(listing)
        await targets.check(D0)
        listing.workers["d1"] = "127.0.0.1:6000"
        d1 = KVTarget("d1", "127.0.0.1:6000", "res-2")
        await asyncio.gather(targets.check(d1), targets.check(d1))  # concurrent misses share it
        assert listing.num_calls == 2

    asyncio.run(main())


def test_router_lists_its_decode_workers_and_only_the_router_calls_prefill(certs):
    async def main():
        async with secure_cluster(certs) as c:
            async with channel_as(c.address, certs, Role.DECODE) as worker_channel:
                # d9 registers over ReportLoad, as a real decode worker does, and stays.
                frames: asyncio.Queue = asyncio.Queue()
                for frame in _registration("d9", "127.0.0.1:7000"):
                    frames.put_nowait(frame)
                report = router_pb2_grpc.RouterServiceStub(worker_channel).ReportLoad(
                    _until_none(frames), timeout=10
                )
                async with channel_as(c.address, certs, Role.PREFILL) as channel:
                    list_workers = router_lister(channel)
                    workers = await list_workers()
                    while not workers:  # the router handles the registration frames meanwhile
                        workers = await list_workers()
                frames.put_nowait(None)
                await report
            assert workers == {"d9": "127.0.0.1:7000"}
            request = prefill_pb2.PrefillRequest(
                request_id="r1",
                prompt_token_ids=[1, 2, 3],
                target=prefill_pb2.KVTarget(
                    worker_id="evil", address="10.0.0.66:5000", reservation_id="res-1"
                ),
                sampling=common_pb2.SamplingParams(max_tokens=1),
            )
            for role in (Role.CLIENT, Role.DECODE, Role.PREFILL, Role.COORDINATOR):
                async with channel_as(c.worker_address, certs, role) as channel:
                    call = prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(request, timeout=5)
                    assert await code_of(call) == C.PERMISSION_DENIED
            assert c.log.calls == []

    asyncio.run(main())


def test_the_channel_for_target_checks_connects_at_start_not_at_the_first_check():
    # The router's name is looked up (and the connection made) while the worker starts: a
    # request's check never waits on a lookup (compose smoke, docs/reliability.md defect 8).
    async def main():
        async with secure_cluster(None) as c:
            inner = RecordingTransport()
            checked = checked_by_router(inner, c.address, secured(Role.PREFILL, None))
            channel = checked.router_channel
            assert channel is not None
            for _ in range(100):
                if channel.get_state() is grpc.ChannelConnectivity.READY:
                    break
                await asyncio.sleep(0.05)
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            assert inner.opened == []  # no check, no call was made
            await checked.close()

    asyncio.run(main())
