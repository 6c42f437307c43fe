"""DecodeService on a real in-process server (port 0), driven through the generated stubs:
status codes, the layer-by-layer handoff from a second engine, and that every way a request
can end gives all of its blocks back (each test ends with the Stats leak check)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from services.common.types import SamplingParams
from services.decode.core import DecodeConfig
from services.rpc.gen.banaserve.v1 import common_pb2, decode_pb2
from tests.decode.helpers import (
    GREEDY,
    PrefillSide,
    assert_clean,
    decode_server,
    prompt_ids,
    reference_tokens,
    reserve_request,
)
from tests.engine.helpers import make_engine

C = grpc.StatusCode
FAST_SWEEP = DecodeConfig(sweep_interval_s=0.02)


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def seconds(s: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(s * 1e9))
    return d


async def collect(call) -> tuple[list[int], decode_pb2.DecodeFinished]:
    tokens: list[int] = []
    while (frame := await call.read()) is not grpc.aio.EOF:
        if frame.WhichOneof("frame") == "finished":
            return tokens, frame.finished
        tokens += frame.delta.token_ids
    raise AssertionError("stream ended without a finished frame")


async def hand_off(stub, prefill: PrefillSide, request_id, prompt, params=GREEDY, **reserve_kw):
    reply = await stub.ReserveKV(reserve_request(request_id, prompt, params, **reserve_kw))
    first = prefill.prefill(request_id, prompt, params)
    frames = prefill.frames(request_id, reply.reservation_id, first)
    done = await stub.TransferKV(frames)
    return first, done


def test_reserve_rejects_what_cannot_fit_or_is_malformed(tiny_llama):
    async def main():
        # 8 blocks of 16: the context is capped at 128 tokens.
        async with decode_server(tiny_llama, num_kv_blocks=8) as (_, stub):
            ok = await stub.ReserveKV(reserve_request("a", prompt_ids(100, 1)))
            assert ok.num_blocks == 7 and ok.reservation_id
            assert ok.lease.ToTimedelta().total_seconds() == 10.0  # the default lease
            full = await rpc_error(stub.ReserveKV(reserve_request("b", prompt_ids(20, 2))))
            assert full.code() == C.RESOURCE_EXHAUSTED
            assert "2 KV blocks needed, 1 free" in full.details()
            never = await rpc_error(stub.ReserveKV(reserve_request("c", prompt_ids(200, 3))))
            assert never.code() == C.OUT_OF_RANGE
            request = reserve_request("d", [1, 2, 3])
            request.sampling.top_p = 1.5
            err = await rpc_error(stub.ReserveKV(request))
            assert err.code() == C.INVALID_ARGUMENT and "top_p" in err.details()
            request.sampling.top_p = 1.0
            request.sampling.max_tokens = 0
            err = await rpc_error(stub.ReserveKV(request))
            assert err.code() == C.INVALID_ARGUMENT and "max_tokens" in err.details()
            empty = await rpc_error(stub.ReserveKV(reserve_request("e", [])))
            assert empty.code() == C.INVALID_ARGUMENT and "empty" in empty.details()
            again = await rpc_error(stub.ReserveKV(reserve_request("a", [1, 2])))
            assert again.code() == C.ALREADY_EXISTS and "already exists" in again.details()
            stats = await stub.Stats(decode_pb2.DecodeServiceStatsRequest())
            assert [(r.request_id, r.num_blocks) for r in stats.reservations] == [("a", 7)]
            assert stats.reservations[0].state == decode_pb2.RESERVATION_STATE_RESERVED
            assert stats.kv.num_blocks_used == 7
            released = await stub.Release(decode_pb2.ReleaseRequest(request_id="a"))
            assert released.found and released.num_blocks_freed == 7
            await assert_clean(stub)

    asyncio.run(main())


def test_transfer_to_unknown_reservation_is_not_found(tiny_llama):
    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            prompt = prompt_ids(20, 4)
            first = prefill.prefill("x", prompt, GREEDY)
            err = await rpc_error(
                stub.TransferKV(prefill.frames("x", "no-such-reservation", first))
            )
            assert err.code() == C.NOT_FOUND
            await stub.ReserveKV(reserve_request("x", prompt))
            prefill.prefill("x", prompt, GREEDY)
            err = await rpc_error(stub.TransferKV(prefill.frames("x", "wrong-id", first)))
            assert err.code() == C.NOT_FOUND
            await stub.Release(decode_pb2.ReleaseRequest(request_id="x"))
            await assert_clean(stub)

    asyncio.run(main())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("head_dim", 32, "layout"),
        ("num_layers", 3, "layout"),
        ("num_tokens", 21, "KV covers 21 tokens"),
        ("fingerprint", "other-model", "different model"),
        ("dtype", common_pb2.DTYPE_BFLOAT16, "layout"),
    ],
)
def test_layout_mismatch_is_invalid_argument_and_frees_the_reservation(
    tiny_llama, field, value, message
):
    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            prompt = prompt_ids(20, 5)
            reply = await stub.ReserveKV(reserve_request("m", prompt))
            first = prefill.prefill("m", prompt, GREEDY)
            frames = list(prefill.frames("m", reply.reservation_id, first))
            setattr(frames[0].header.layout, field, value)
            err = await rpc_error(stub.TransferKV(iter(frames)))
            assert err.code() == C.INVALID_ARGUMENT and message in err.details(), err.details()
            await assert_clean(stub)  # the broken transfer freed the reservation

    asyncio.run(main())


def test_bad_chunks_are_invalid_argument(tiny_llama):
    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            prompt = prompt_ids(40, 6)
            cases = {
                "truncated data": lambda f: setattr(f[1].layer, "data", f[1].layer.data[:-4]),
                "block range": lambda f: setattr(f[1].layer, "first_block", 5),
                "missing layer": lambda f: f.pop(1),
                "no header": lambda f: f.pop(0),
            }
            for i, mutate in enumerate(cases.values()):
                rid = f"c{i}"
                reply = await stub.ReserveKV(reserve_request(rid, prompt))
                first = prefill.prefill(rid, prompt, GREEDY)
                frames = list(prefill.frames(rid, reply.reservation_id, first, split_layers=False))
                mutate(frames)
                err = await rpc_error(stub.TransferKV(iter(frames)))
                assert err.code() == C.INVALID_ARGUMENT, err.details()
                await stub.Release(decode_pb2.ReleaseRequest(request_id=rid))
            await assert_clean(stub)

    asyncio.run(main())


def test_handoff_streams_exactly_what_one_engine_generates(tiny_llama):
    reference = make_engine(tiny_llama)
    prompts = {"short": prompt_ids(5, 7), "blocks": prompt_ids(37, 8), "exact": prompt_ids(32, 9)}

    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            streams = {}
            for rid, prompt in prompts.items():
                first, done = await hand_off(stub, prefill, rid, prompt)
                assert done.num_layers == 4 and done.num_bytes > 0
                streams[rid] = (
                    first,
                    stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id=rid)),
                )
            for rid, (first, call) in streams.items():
                rest, finished = await collect(call)
                assert [first, *rest] == reference_tokens(reference, prompts[rid], GREEDY), rid
                assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
                assert finished.num_completion_tokens == GREEDY.max_tokens
            await assert_clean(stub)

    asyncio.run(main())


def test_first_token_that_ends_the_request_finishes_at_once(tiny_llama):
    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            prompt = prompt_ids(20, 10)
            reply = await stub.ReserveKV(reserve_request("one", prompt, params))
            first = prefill.prefill("one", prompt, SamplingParams(temperature=0.0, max_tokens=2))
            await stub.TransferKV(prefill.frames("one", reply.reservation_id, first))
            call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="one"))
            rest, finished = await collect(call)
            assert rest == [] and finished.num_completion_tokens == 1
            assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
            await assert_clean(stub)

    asyncio.run(main())


def test_cancelling_the_stream_mid_way_frees_every_block(tiny_llama):
    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
            await hand_off(stub, prefill, "long", prompt_ids(30, 11), params)
            call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="long"))
            frames = [await call.read() for _ in range(3)]
            assert all(f.WhichOneof("frame") == "delta" for f in frames)
            call.cancel()
            await assert_clean(stub)
            gone = await rpc_error(
                stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="long")).read()
            )
            assert gone.code() == C.NOT_FOUND

    asyncio.run(main())


def test_lease_expiry_frees_a_reservation_whose_transfer_never_came(tiny_llama):
    async def main():
        async with decode_server(tiny_llama, FAST_SWEEP) as (_, stub):
            reply = await stub.ReserveKV(
                reserve_request("late", prompt_ids(40, 12), lease=seconds(0.2))
            )
            assert reply.lease.ToNanoseconds() == 200_000_000
            stats = await stub.Stats(decode_pb2.DecodeServiceStatsRequest())
            assert stats.kv.num_blocks_used == 3 and len(stats.reservations) == 1
            # A stream opened early waits, bounded by the lease, and learns of the expiry.
            call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="late"), timeout=3)
            tokens, finished = await collect(call)
            assert tokens == [] and finished.finish_reason == common_pb2.FINISH_REASON_ABORT
            await assert_clean(stub)
            prefill = PrefillSide(tiny_llama)
            first = prefill.prefill("late", prompt_ids(40, 12), GREEDY)
            err = await rpc_error(
                stub.TransferKV(prefill.frames("late", reply.reservation_id, first))
            )
            assert err.code() == C.NOT_FOUND

    asyncio.run(main())


def renew(request_id: str, reservation_id: str, lease: float | None = None):
    kw = {} if lease is None else {"lease": seconds(lease)}
    return decode_pb2.RenewLeaseRequest(request_id=request_id, reservation_id=reservation_id, **kw)


def test_a_renewed_lease_holds_a_reservation_past_its_first_lease(tiny_llama):
    """The router renews the lease while the prompt queues and computes on its prefill worker:
    renewed every 0.1 s, a 0.3 s reservation is still there at 1 s, its KV goes in as ever;
    once renewals stop it expires one lease later. A renewal asks no more than the worker's
    longest lease, names its reservation exactly, and one for a running sequence is 0."""
    config = DecodeConfig(sweep_interval_s=0.02, default_lease_s=1.0, max_lease_s=2.0)

    async def main():
        async with decode_server(tiny_llama, config) as (_, stub):
            prompt = prompt_ids(40, 14)
            reply = await stub.ReserveKV(reserve_request("slow", prompt, lease=seconds(0.3)))
            rid = reply.reservation_id
            for _ in range(10):
                await asyncio.sleep(0.1)
                left = await stub.RenewLease(renew("slow", rid, 0.3))
                assert left.lease.ToNanoseconds() / 1e9 == pytest.approx(0.3, abs=0.05)
            stats = await stub.Stats(decode_pb2.DecodeServiceStatsRequest())
            assert [r.request_id for r in stats.reservations] == ["slow"]
            capped = await stub.RenewLease(renew("slow", rid, 100.0))
            assert capped.lease.ToNanoseconds() / 1e9 == pytest.approx(2.0, abs=0.05)
            default = await stub.RenewLease(renew("slow", rid))  # never shortens it
            assert default.lease.ToNanoseconds() / 1e9 == pytest.approx(2.0, abs=0.05)
            for request_id, reservation_id, code in [
                ("slow", "other", C.NOT_FOUND),
                ("nope", rid, C.NOT_FOUND),
                ("bad id", rid, C.INVALID_ARGUMENT),
            ]:
                err = await rpc_error(stub.RenewLease(renew(request_id, reservation_id, 1.0)))
                assert err.code() == code, (request_id, err.details())
            err = await rpc_error(stub.RenewLease(renew("slow", rid, -1.0)))
            assert err.code() == C.INVALID_ARGUMENT and "lease must be positive" in err.details()
            prefill = PrefillSide(tiny_llama)
            first = prefill.prefill("slow", prompt, GREEDY)
            await stub.TransferKV(prefill.frames("slow", rid, first))
            running = await stub.RenewLease(renew("slow", rid, 1.0))
            assert running.lease.ToNanoseconds() == 0  # it runs: no lease applies
            rest, _ = await collect(
                stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="slow"))
            )
            assert [first, *rest] == reference_tokens(make_engine(tiny_llama), prompt, GREEDY)
            err = await rpc_error(stub.RenewLease(renew("slow", rid, 1.0)))
            assert err.code() == C.NOT_FOUND  # finished

            # Renewals stop: it expires a lease after the last, and cannot be renewed then.
            reply = await stub.ReserveKV(reserve_request("left", prompt, lease=seconds(0.3)))
            await stub.RenewLease(renew("left", reply.reservation_id, 0.3))
            await asyncio.sleep(0.6)
            err = await rpc_error(stub.RenewLease(renew("left", reply.reservation_id, 0.3)))
            assert err.code() == C.NOT_FOUND, err.details()
            await assert_clean(stub)

    asyncio.run(main())


def test_deadline_expiry_aborts_a_running_request(tiny_llama):
    async def main():
        async with decode_server(tiny_llama, FAST_SWEEP) as (_, stub):
            prefill = PrefillSide(tiny_llama)
            params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
            await hand_off(stub, prefill, "slow", prompt_ids(30, 13), params, timeout=seconds(0.3))
            call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="slow"), timeout=3)
            tokens, finished = await collect(call)
            assert finished.finish_reason == common_pb2.FINISH_REASON_ABORT
            assert 0 < len(tokens) < 1999
            assert finished.num_completion_tokens == len(tokens) + 1
            await assert_clean(stub)

    asyncio.run(main())


def test_release_is_idempotent_in_every_state(tiny_llama):
    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            release = decode_pb2.ReleaseRequest(
                request_id="r", reason=decode_pb2.RELEASE_REASON_ABORTED
            )
            await stub.ReserveKV(reserve_request("r", prompt_ids(33, 14)))
            first = await stub.Release(release)
            assert (first.found, first.num_blocks_freed) == (True, 3)
            second = await stub.Release(release)
            assert (second.found, second.num_blocks_freed) == (False, 0)
            # Running: released while it decodes; its stream ends with ABORT.
            prefill = PrefillSide(tiny_llama)
            params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
            await hand_off(stub, prefill, "r", prompt_ids(33, 14), params)
            call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="r"))
            await call.read()
            running = await stub.Release(release)
            assert running.found and running.num_blocks_freed >= 3
            _, finished = await collect(call)
            assert finished.finish_reason == common_pb2.FINISH_REASON_ABORT
            assert not (await stub.Release(release)).found
            await assert_clean(stub)

    asyncio.run(main())
