"""Who may call what over gRPC (issue 16, item 4): real servers on 127.0.0.1 with mutual TLS.

Each attack the probe ran against an open cluster, now refused: a fake decode worker
registering over ReportLoad, direct ReserveKV calls into a decode worker, a handshake without a
certificate of the cluster's CA, the client API without its token, and a client aborting
another's request. Each test also shows the legitimate call still passing.
"""

from __future__ import annotations

import asyncio

import grpc

from services.rpc.convert import duration
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    router_pb2,
)
from services.rpc.security import Role
from tests.router.factories import BLOCK_SIZE, FINGERPRINT, NUM_BLOCKS
from tests.security.helpers import (
    TOKEN_A,
    TOKEN_B,
    C,
    bearer,
    channel_as,
    code_of,
    generate_request,
    router_stub,
    secure_cluster,
)


def _fake_registration(worker_id: str) -> list[router_pb2.ReportLoadRequest]:
    info = router_pb2.WorkerInfo(
        worker_id=worker_id,
        address="127.0.0.1:1",
        role=common_pb2.WORKER_ROLE_DECODE,
        model="m",
        fingerprint=FINGERPRINT,  # copied from ListWorkers, as the probe did
        block_size=BLOCK_SIZE,
        num_kv_blocks=NUM_BLOCKS,
        max_model_len=128,
    )
    return [router_pb2.ReportLoadRequest(worker=info)]


async def _worker_ids(stub) -> list[str]:
    reply = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
    return sorted(w.info.worker_id for w in reply.workers)


def test_report_load_needs_a_worker_certificate(certs):
    async def main():
        async with secure_cluster(certs, (TOKEN_A,)) as c:
            for role in (Role.CLIENT, Role.ROUTER, Role.KVSTORE, Role.COORDINATOR):
                async with channel_as(c.address, certs, role) as channel:
                    call = router_stub(channel).ReportLoad(
                        iter(_fake_registration("evil")), metadata=bearer(TOKEN_A), timeout=5
                    )
                    assert await code_of(call) == C.PERMISSION_DENIED, role
            assert sorted(w.worker_id for w in c.router.workers()) == ["d0", "p0"]
            # A decode worker's certificate registers: the call ends cleanly at the half-close
            # (a refused registration ends it with an error status).
            async with channel_as(c.address, certs, Role.DECODE) as channel:
                load = router_pb2.ReportLoadRequest(load=router_pb2.LoadReport())
                frames = [*_fake_registration("d1"), load]
                reply = await router_stub(channel).ReportLoad(iter(frames), timeout=5)
            assert reply == router_pb2.ReportLoadResponse()

    asyncio.run(main())


def test_decode_worker_methods_only_for_the_router(certs):
    """The probe filled a decode worker's slots with 64 direct ReserveKV calls."""

    async def main():
        async with secure_cluster(certs) as c:
            reserve = decode_pb2.ReserveKVRequest(
                request_id="x", prompt_token_ids=[1, 2, 3], lease=duration(5), timeout=duration(5)
            )
            for role in (Role.CLIENT, Role.PREFILL, Role.DECODE, Role.KVSTORE):
                async with channel_as(c.worker_address, certs, role) as channel:
                    stub = decode_pb2_grpc.DecodeServiceStub(channel)
                    assert await code_of(stub.ReserveKV(reserve, timeout=5)) == C.PERMISSION_DENIED
                    release = decode_pb2.ReleaseRequest(request_id="x")
                    assert await code_of(stub.Release(release, timeout=5)) == C.PERMISSION_DENIED
                    renew = decode_pb2.RenewLeaseRequest(request_id="x", reservation_id="res-x")
                    assert await code_of(stub.RenewLease(renew, timeout=5)) == C.PERMISSION_DENIED
            assert c.log.calls == []  # no call reached the worker
            async with channel_as(c.worker_address, certs, Role.ROUTER) as channel:
                stub = decode_pb2_grpc.DecodeServiceStub(channel)
                reply = await stub.ReserveKV(reserve, timeout=5)
            assert reply.reservation_id == "res-x"

    asyncio.run(main())


def test_handshake_refused_without_a_certificate_of_the_cluster_ca(certs, foreign_certs):
    async def main():
        async with secure_cluster(certs, (TOKEN_A,)) as c:
            for channel in (
                channel_as(c.address, None),  # plaintext
                channel_as(c.address, foreign_certs, Role.DECODE),  # another CA's "decode"
            ):
                async with channel:
                    stub = router_stub(channel)
                    listing = stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
                    assert await code_of(listing) == C.UNAVAILABLE
            async with channel_as(c.address, certs, Role.CLIENT) as channel:
                assert await _worker_ids(router_stub(channel)) == []  # none connected by call

    asyncio.run(main())


def test_client_api_needs_a_valid_bearer_token(certs):
    async def main():
        async with secure_cluster(certs, (TOKEN_A, TOKEN_B)) as c:
            async with channel_as(c.address, certs, Role.CLIENT) as channel:
                stub = router_stub(channel)
                for metadata in (
                    (),
                    bearer("not-the-token-0123456789"),
                    (("authorization", TOKEN_A),),
                ):
                    call = stub.Generate(generate_request(), metadata=metadata, timeout=5)
                    assert await code_of(call) == C.UNAUTHENTICATED
                abort = router_pb2.AbortRequest(request_id="r1")
                assert await code_of(stub.Abort(abort, timeout=5)) == C.UNAUTHENTICATED
                assert c.log.calls == []
                call = stub.Generate(generate_request(), metadata=bearer(TOKEN_B), timeout=5)
                frames = [f async for f in call]
            tokens = [t for f in frames if f.HasField("delta") for t in f.delta.token_ids]
            assert tokens == [7, 8, 9, 10]
            assert frames[-1].finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert c.driver.num_running == 0

    asyncio.run(main())


def test_token_only_mode_refuses_the_client_api_without_tls():
    async def main():
        async with secure_cluster(None, (TOKEN_A,)) as c, channel_as(c.address, None) as channel:
            stub = router_stub(channel)
            call = stub.Generate(generate_request(), timeout=5)
            assert await code_of(call) == C.UNAUTHENTICATED
            call = stub.Generate(generate_request(), metadata=bearer(TOKEN_A), timeout=5)
            assert [f.WhichOneof("frame") for f in [f async for f in call]][-1] == "finished"

    asyncio.run(main())


def test_a_client_may_abort_only_its_own_requests(certs):
    async def main():
        async with secure_cluster(certs, (TOKEN_A, TOKEN_B), hang_decode=True) as c:
            async with channel_as(c.address, certs, Role.CLIENT) as channel:
                stub = router_stub(channel)
                call = stub.Generate(
                    generate_request("victim"), metadata=bearer(TOKEN_A), timeout=5
                )
                assert [(await call.read()).WhichOneof("frame") for _ in range(2)] == [
                    "started",
                    "delta",
                ]
                abort = router_pb2.AbortRequest(request_id="victim")
                foreign = stub.Abort(abort, metadata=bearer(TOKEN_B), timeout=5)
                assert await code_of(foreign) == C.PERMISSION_DENIED
                assert c.driver.num_running == 1
                await stub.Abort(abort, metadata=bearer(TOKEN_A), timeout=5)
                rest = []
                while (frame := await call.read()) is not grpc.aio.EOF:
                    rest.append(frame)
            assert rest[-1].finished.finish_reason == common_pb2.FINISH_REASON_ABORT
            await asyncio.wait_for(c.log.released.wait(), 3)
            assert c.driver.num_running == 0

    asyncio.run(main())
