"""What bounds a DecodeService call whose client stops talking or outlives its reservation: a
TransferKV's header and idle timeouts, its end with its reservation, the eviction of transfers
that named no reservation (so neither senders nor StreamTokens are kept out), the open frame, a
ReserveKV whose deadline passed, and a second StreamTokens of one request. Each test ends with
the leak check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest

from services.common.admission import (
    AdmissionConfig,
    AdmissionController,
    HoldQuota,
    MethodClass,
)
from services.decode.core import DecodeConfig, DecodeWorker
from services.decode.servicer import DecodeServicer
from services.rpc.admission import AdmissionInterceptor
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
from tests.decode.test_servicer import collect, renew, rpc_error, seconds
from tests.engine.helpers import assert_no_leaks, make_engine

C = grpc.StatusCode


async def then_silent(
    frames: Iterable[decode_pb2.TransferKVRequest], until: asyncio.Event
) -> AsyncIterator[decode_pb2.TransferKVRequest]:
    """``frames``, then nothing, with the stream held open until ``until`` is set."""
    for frame in frames:
        yield frame
    await until.wait()


EVICTED = (
    "more than 2 KV transfers waited for their first frame here; this one, the oldest, was "
    "dropped (a sender sends its open frame as the call starts)"
)


def test_silent_transfers_are_evicted_oldest_first_and_never_keep_a_sender_or_stream_out(
    tiny_llama,
):
    # Two sequences: STREAM admits 8 calls (4 x 2), of which 2 may wait for a first frame.
    admission = AdmissionController(AdmissionConfig.for_capacity(2))
    config = DecodeConfig(transfer_header_timeout_s=1.5)
    prefill = PrefillSide(tiny_llama)

    async def hand_off(stub, request_id: str, prompt: list[int]):
        reply = await stub.ReserveKV(reserve_request(request_id, prompt))
        first = prefill.prefill(request_id, prompt, GREEDY)
        return stub.TransferKV(prefill.frames(request_id, reply.reservation_id, first))

    async def tokens(stub, request_id: str) -> int:
        call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id=request_id))
        rest, finished = await collect(call)
        assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
        return len(rest) + 1

    async def main():
        interceptors = [AdmissionInterceptor(admission)]
        async with decode_server(tiny_llama, config, interceptors=interceptors, max_num_seqs=2) as (
            _,
            stub,
        ):
            await hand_off(stub, "before", prompt_ids(20, 31))
            never = asyncio.Event()
            opened = time.monotonic()
            silent = []
            for _ in range(8):  # one at a time: the server sees them in this order
                silent.append(asyncio.ensure_future(stub.TransferKV(then_silent([], never))))
                await asyncio.sleep(0.05)
            done, waiting = await asyncio.wait(silent, timeout=1.0)
            assert set(done) == set(silent[:6]) and set(waiting) == set(silent[6:])
            for call in done:  # at once: an evicted call holds its admission slot no longer
                err = call.exception()
                assert (err.code(), err.details()) == (C.RESOURCE_EXHAUSTED, EVICTED)
            # While two wait: a stream gets its slot, and a real transfer goes through (the
            # oldest silent call makes way for it).
            assert await tokens(stub, "before") == GREEDY.max_tokens
            await hand_off(stub, "during", prompt_ids(20, 32))
            assert await tokens(stub, "during") == GREEDY.max_tokens
            err = await rpc_error(silent[6])
            assert (err.code(), err.details()) == (C.RESOURCE_EXHAUSTED, EVICTED)
            assert not silent[7].done()

            err = await rpc_error(silent[7])
            assert err.code() == C.DEADLINE_EXCEEDED
            assert err.details() == "the KV transfer sent no header within 1.5s"
            assert 1.5 <= time.monotonic() - opened < 3.0
            assert admission.stats(MethodClass.STREAM).num_in_flight == 0
            never.set()
            await hand_off(stub, "after", prompt_ids(20, 33))
            assert await tokens(stub, "after") == GREEDY.max_tokens
            await assert_clean(stub)

    asyncio.run(main())


def opening(request_id: str, reservation_id: str) -> decode_pb2.TransferKVRequest:
    ids = decode_pb2.KVTransferOpen(request_id=request_id, reservation_id=reservation_id)
    return decode_pb2.TransferKVRequest(open=ids)


async def opened_then(
    first: decode_pb2.TransferKVRequest,
    later: Iterable[decode_pb2.TransferKVRequest],
    go: asyncio.Event,
) -> AsyncIterator[decode_pb2.TransferKVRequest]:
    """The open frame at once, the rest once ``go`` is set (the prompt computing meanwhile)."""
    yield first
    await go.wait()
    for frame in later:
        yield frame


def test_a_sender_that_opens_first_survives_a_flood_while_its_prompt_computes(tiny_llama):
    """A prefill worker's call names its reservation as it opens; silent calls opened after it,
    many more than may wait, never evict it, and its KV arrives seconds later as ever."""

    async def main():
        async with decode_server(tiny_llama, max_num_seqs=2) as (_, stub):
            prefill, prompt = PrefillSide(tiny_llama), prompt_ids(40, 36)
            reply = await stub.ReserveKV(reserve_request("opened", prompt))
            first = prefill.prefill("opened", prompt, GREEDY)
            frames = prefill.frames("opened", reply.reservation_id, first)
            go, never = asyncio.Event(), asyncio.Event()
            transfer = asyncio.ensure_future(
                stub.TransferKV(opened_then(opening("opened", reply.reservation_id), frames, go))
            )
            await receiving(stub, "opened")  # claimed by the open frame alone
            silent = [stub.TransferKV(then_silent([], never)) for _ in range(6)]
            errors = [await rpc_error(call) for call in silent[:4]]
            assert {(e.code(), e.details()) for e in errors} == {(C.RESOURCE_EXHAUSTED, EVICTED)}
            assert not transfer.done()
            go.set()  # the prompt has computed
            reply = await asyncio.wait_for(transfer, 10)
            assert reply.num_layers == prefill.engine.spec.num_layers
            call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="opened"))
            rest, finished = await collect(call)
            assert len(rest) + 1 == GREEDY.max_tokens
            for call in silent[4:]:
                call.cancel()
            never.set()
            await assert_clean(stub)

    asyncio.run(main())


def test_an_opened_transfer_waits_for_its_header_as_long_as_its_lease_is_renewed(tiny_llama):
    """A long prompt, or one queued behind others on its prefill worker: the header comes long
    after the open frame, past ``transfer_header_timeout_s`` and the first lease, and the KV
    goes in because the router renewed the lease meanwhile."""
    config = DecodeConfig(sweep_interval_s=0.02, transfer_header_timeout_s=0.3)

    async def main():
        async with decode_server(tiny_llama, config) as (_, stub):
            prefill, prompt = PrefillSide(tiny_llama), prompt_ids(40, 38)
            reply = await stub.ReserveKV(reserve_request("long", prompt, lease=seconds(0.3)))
            rid = reply.reservation_id
            first = prefill.prefill("long", prompt, GREEDY)
            go = asyncio.Event()
            frames = prefill.frames("long", rid, first)
            transfer = asyncio.ensure_future(
                stub.TransferKV(opened_then(opening("long", rid), frames, go))
            )
            for _ in range(12):
                await asyncio.sleep(0.1)
                await stub.RenewLease(renew("long", rid, 0.3))
            assert not transfer.done()
            go.set()
            done = await asyncio.wait_for(transfer, 10)
            assert done.num_layers == prefill.engine.spec.num_layers
            call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="long"))
            rest, _ = await collect(call)
            assert [first, *rest] == reference_tokens(make_engine(tiny_llama), prompt, GREEDY)
            await assert_clean(stub)

    asyncio.run(main())


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("unknown", C.NOT_FOUND, "no reservation 'nope' for request 'o'"),
        (
            "mismatch",
            C.INVALID_ARGUMENT,
            "the header names reservation 'nope' of request 'o'; the transfer opened ",
        ),
        ("silent", C.NOT_FOUND, "reservation of 'o' expired: its lease ran out before its KV came"),
        ("twice", C.INVALID_ARGUMENT, "a transfer must start with its header"),
    ],
)
def test_an_open_frame_is_checked_and_bounded_like_a_header(tiny_llama, case, code, message):
    async def main():
        async with decode_server(tiny_llama, DecodeConfig(sweep_interval_s=0.02)) as (_, stub):
            prefill, prompt = PrefillSide(tiny_llama), prompt_ids(40, 37)
            reply = await stub.ReserveKV(reserve_request("o", prompt, lease=seconds(0.5)))
            rid = reply.reservation_id
            first = prefill.prefill("o", prompt, GREEDY)
            frames = list(prefill.frames("o", rid, first))
            if case == "mismatch":
                frames[0].header.reservation_id = "nope"
            opened = opening("o", "nope" if case == "unknown" else rid)
            later = {"silent": [], "twice": [opening("o", rid)]}.get(case, frames)
            hold = asyncio.Event()
            started = time.monotonic()
            err = await rpc_error(
                asyncio.wait_for(stub.TransferKV(then_silent([opened, *later], hold)), 5.0)
            )
            assert err.code() == code
            assert err.details().startswith(message), err.details()
            assert time.monotonic() - started < 2.0
            hold.set()
            await stub.Release(decode_pb2.ReleaseRequest(request_id="o"))
            await assert_clean(stub)

    asyncio.run(main())


def test_a_transfer_that_stalls_after_its_header_ends_at_the_idle_timeout(tiny_llama):
    config = DecodeConfig(transfer_idle_timeout_s=0.3)

    async def main():
        async with decode_server(tiny_llama, config) as (_, stub):
            prefill, prompt = PrefillSide(tiny_llama), prompt_ids(40, 32)
            reply = await stub.ReserveKV(reserve_request("stall", prompt))  # a 10 s lease
            first = prefill.prefill("stall", prompt, GREEDY)
            frames = list(prefill.frames("stall", reply.reservation_id, first))
            hold = asyncio.Event()
            started = time.monotonic()
            err = await rpc_error(
                asyncio.wait_for(stub.TransferKV(then_silent(frames[:2], hold)), 3.0)
            )
            assert time.monotonic() - started < 1.5
            assert err.code() == C.DEADLINE_EXCEEDED
            assert err.details() == "the KV transfer for 'stall' sent nothing for 0.3s"
            hold.set()
            await assert_clean(stub)  # the reservation went with its transfer

    asyncio.run(main())


async def receiving(stub, request_id: str, within_s: float = 2.0) -> None:
    """Returns once ``request_id``'s transfer has claimed its reservation (polled)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while True:
        stats = await stub.Stats(decode_pb2.DecodeServiceStatsRequest(), timeout=2)
        states = {r.request_id: r.state for r in stats.reservations}
        if states.get(request_id) == decode_pb2.RESERVATION_STATE_RECEIVING:
            return
        assert loop.time() < end, stats
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    "ending, code, message",
    [
        (
            "lease",
            C.NOT_FOUND,
            "reservation of 'mid' expired: its lease ran out before its KV came",
        ),
        ("deadline", C.DEADLINE_EXCEEDED, "request 'mid' passed its deadline"),
        ("release", C.NOT_FOUND, "reservation of 'mid' was released"),
    ],
)
def test_a_stalled_transfer_ends_with_its_reservation_and_says_why(
    tiny_llama, ending, code, message
):
    async def main():
        async with decode_server(tiny_llama, DecodeConfig(sweep_interval_s=0.02)) as (_, stub):
            prefill, prompt = PrefillSide(tiny_llama), prompt_ids(40, 33)
            limits = {"lease": {"lease": seconds(0.3)}, "deadline": {"timeout": seconds(0.3)}}
            reply = await stub.ReserveKV(reserve_request("mid", prompt, **limits.get(ending, {})))
            first = prefill.prefill("mid", prompt, GREEDY)
            frames = list(prefill.frames("mid", reply.reservation_id, first))
            hold = asyncio.Event()
            started = time.monotonic()
            transfer = asyncio.ensure_future(stub.TransferKV(then_silent(frames[:2], hold)))
            if ending == "release":
                await receiving(stub, "mid")
                await stub.Release(decode_pb2.ReleaseRequest(request_id="mid"))
            err = await rpc_error(asyncio.wait_for(transfer, 3.0))
            assert time.monotonic() - started < 1.5
            assert (err.code(), err.details()) == (code, message)
            hold.set()
            await assert_clean(stub)

    asyncio.run(main())


class CallContext:
    """What the servicer sees of a unary call: ``left`` seconds of its deadline remain."""

    def __init__(self, left: float | None) -> None:
        self.left = left

    def time_remaining(self) -> float | None:
        return self.left

    def invocation_metadata(self) -> tuple:
        return ()

    def auth_context(self) -> dict:
        return {}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"


def test_a_reserve_whose_deadline_passed_holds_nothing(tiny_llama):
    worker = DecodeWorker(make_engine(tiny_llama))
    quota = HoldQuota(4)
    servicer = DecodeServicer(worker, quota=quota)
    request = reserve_request("late", prompt_ids(40, 34))

    async def main():
        await worker.start()
        try:
            with pytest.raises(TimeoutError, match="passed before anything was reserved"):
                await servicer.ReserveKV(request, CallContext(0.0))
            assert (await worker.stats()).reservations == [] and quota.held() == {}

            # The deadline passes while the worker reserves: the reservation is dropped.
            context, reserve = CallContext(5.0), worker.reserve

            async def reserve_past_the_deadline(*args):
                granted = await reserve(*args)
                context.left = 0.0
                return granted

            worker.reserve = reserve_past_the_deadline
            with pytest.raises(TimeoutError, match="passed while reserving; released"):
                await servicer.ReserveKV(request, context)
            stats = await worker.stats()
            assert (stats.reservations, stats.num_blocks_used, quota.held()) == ([], 0, {})

            worker.reserve = reserve  # and with time left, it holds as ever
            reply = await servicer.ReserveKV(request, CallContext(5.0))
            assert reply.num_blocks == 3 and quota.held() == {"peer:ipv4:127.0.0.1:5555": 1}
            assert await worker.release("late") == (True, 3)
        finally:
            await worker.stop()

    asyncio.run(main())
    assert_no_leaks(worker.engine)


def test_a_second_stream_of_one_request_is_failed_precondition(tiny_llama):
    async def main():
        async with decode_server(tiny_llama) as (_, stub):
            await stub.ReserveKV(reserve_request("two", prompt_ids(20, 35)))
            request = decode_pb2.StreamTokensRequest(request_id="two")
            streams = [asyncio.ensure_future(collect(stub.StreamTokens(request))) for _ in "ab"]
            # Whichever comes second is refused; the first waits for the request's KV.
            (second,), (first,) = await asyncio.wait(streams, return_when=asyncio.FIRST_COMPLETED)
            err = second.exception()
            assert err.code() == C.FAILED_PRECONDITION
            assert err.details() == "request 'two' is already being streamed"
            await stub.Release(decode_pb2.ReleaseRequest(request_id="two"))
            tokens, finished = await first
            assert tokens == [] and finished.finish_reason == common_pb2.FINISH_REASON_ABORT
            await assert_clean(stub)

    asyncio.run(main())
