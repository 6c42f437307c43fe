"""Generate through the real router over gRPC, against fake workers (grpc_fakes.py): the call
sequence, relaying, deadlines, cancellation, abort, retry on worker loss, and bad input."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import pytest

from services.common.errors import InvalidRequestError
from services.router.registry import WorkerRole, WorkerStatus
from services.rpc.gen.banaserve.v1 import common_pb2, kvstore_pb2, router_pb2
from services.rpc.status import ROUTER_UNAVAILABLE
from tests.router.factories import BLOCK_SIZE, NUM_BLOCKS, load
from tests.router.grpc_fakes import cluster

C = grpc.StatusCode
PROMPT = list(range(1, 21))


def request(request_id: str = "r1", prompt=PROMPT, **sampling) -> router_pb2.GenerateRequest:
    sampling.setdefault("max_tokens", 4)
    return router_pb2.GenerateRequest(
        request_id=request_id,
        token_ids=common_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(**sampling),
    )


async def collect(call) -> list[router_pb2.GenerateResponse]:
    return [frame async for frame in call]


async def status_of(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(call)
    return info.value


def seconds(d) -> float:
    return d.seconds + d.nanos / 1e9


def test_generate_reserves_prefills_then_streams_and_relays_everything():
    async def main():
        async with cluster() as c:
            frames = await collect(c.stub.Generate(request(), timeout=5))
            assert c.log.calls == [
                ("reserve", "d0", "r1"),
                ("prefill", "p0", "r1", "d0", "res-r1"),
                ("stream", "d0", "r1"),
            ]
            # D's data plane, from its reservation, reaches P with the target.
            assert c.log.data_planes == {"r1": ("data-d0:1", kvstore_pb2.DATA_TRANSPORT_TCP)}
            # The callee sees a deadline on every call, no later than the client's (give or take
            # the rounding of grpc's timeout header, seen as up to ~10 ms on a busy machine).
            assert all(0 < left <= 5.05 for _, left in c.log.deadlines), c.log.deadlines
            kinds = [f.WhichOneof("frame") for f in frames]
            assert kinds == ["started", "delta", "delta", "delta", "delta", "finished"]
            started = frames[0].started
            assert (started.request_id, started.num_prompt_tokens) == ("r1", 20)
            assert (started.prefill_worker_id, started.decode_worker_id) == ("p0", "d0")
            assert [list(f.delta.token_ids) for f in frames[1:5]] == [[7], [8], [9], [10]]
            assert "".join(f.delta.text for f in frames[1:5]) == "<7><8><9><10>"
            done = frames[-1].finished
            assert done.finish_reason == common_pb2.FINISH_REASON_LENGTH
            usage = done.usage
            assert (usage.num_prompt_tokens, usage.num_completion_tokens) == (20, 4)
            assert usage.num_cached_tokens == 16
            t = done.timings
            assert 0 < seconds(t.routing) <= seconds(t.ttft) <= seconds(t.total) < 5
            assert (seconds(t.prefill), seconds(t.kv_transfer)) == (0.25, 0.125)
            assert (seconds(t.kv_transfer_exposed), t.kv_bytes) == (0.0625, 4096)
            assert c.driver.num_running == 0

    asyncio.run(main())


def test_text_prompt_is_tokenized_and_router_assigns_an_id():
    async def main():
        async with cluster() as c:
            message = router_pb2.GenerateRequest(text="hi", sampling={"max_tokens": 4})
            frames = await collect(c.stub.Generate(message, timeout=5))
            assert frames[0].started.request_id.startswith("req-")
            assert frames[0].started.num_prompt_tokens == 2

    asyncio.run(main())


def test_first_token_ending_the_request_releases_the_reservation():
    async def main():
        async with cluster(finish_on_prefill=True) as c:
            frames = await collect(c.stub.Generate(request(), timeout=5))
            assert [f.WhichOneof("frame") for f in frames] == ["started", "delta", "finished"]
            assert frames[-1].finished.finish_reason == common_pb2.FINISH_REASON_STOP
            assert frames[-1].finished.usage.num_completion_tokens == 1
            assert c.log.calls[-1] == (
                "release",
                "d0",
                "r1",
                "RELEASE_REASON_FINISHED_ON_PREFILL",
            )
            assert [call[0] for call in c.log.calls] == ["reserve", "prefill", "release"]

    asyncio.run(main())


def test_the_lease_on_d_is_renewed_while_p_has_the_prompt():
    """A prompt that waits or computes on P longer than its lease on D (a long prompt, a queue
    behind others): the router renews the lease every third of it, naming the reservation,
    until P is done; then no more."""

    async def main():
        async with cluster(lease_s=0.3) as c:
            c.workers["p0"].prefill_delay_s = 1.0
            frames = await collect(c.stub.Generate(request(), timeout=10))
            assert frames[-1].WhichOneof("frame") == "finished"
            renewals = [call for call in c.log.calls if call[0] == "renew"]
            assert 6 <= len(renewals) <= 11, c.log.calls  # every ~0.1 s for ~1 s, give or take
            assert set(renewals) == {("renew", "d0", "r1", "res-r1", 0.3)}
            names = [call[0] for call in c.log.calls]
            assert names[:2] == ["reserve", "prefill"] and names[-1] == "stream"
            await asyncio.sleep(0.5)
            assert len([call for call in c.log.calls if call[0] == "renew"]) == len(renewals)

    asyncio.run(main())


@pytest.mark.parametrize("code", [C.UNIMPLEMENTED, C.NOT_FOUND])
def test_a_lease_d_will_not_renew_is_asked_once(code):
    """A decode worker older than RenewLease, or a reservation already gone: one try, no
    more; the request goes on as it would have (here P is done within the lease)."""

    async def main():
        async with cluster(lease_s=0.6) as c:
            c.workers["p0"].prefill_delay_s = 0.5
            c.workers["d0"].renew_fails = code
            frames = await collect(c.stub.Generate(request(), timeout=10))
            assert frames[-1].WhichOneof("frame") == "finished"
            assert [call[0] for call in c.log.calls] == ["reserve", "prefill", "renew", "stream"]

    asyncio.run(main())


def test_client_cancel_releases_on_the_decode_worker():
    async def main():
        async with cluster(hang_decode=True) as c:
            call = c.stub.Generate(request(), timeout=5)
            kinds = [(await call.read()).WhichOneof("frame") for _ in range(3)]
            assert kinds == ["started", "delta", "delta"]
            call.cancel()
            await asyncio.wait_for(c.log.released.wait(), 3)
            await asyncio.wait_for(c.log.stream_cancelled.wait(), 3)
            assert c.log.calls[-1] == ("release", "d0", "r1", "RELEASE_REASON_ABORTED")
            assert c.log.deadlines[-1][1] is not None  # the cleanup call is bounded too
            assert c.driver.num_running == 0

    asyncio.run(main())


def test_deadline_expiry_releases_and_reports_deadline_exceeded():
    async def main():
        async with cluster(hang_decode=True) as c:
            error = await status_of(c.stub.Generate(request(), timeout=0.5))
            assert error.code() == C.DEADLINE_EXCEEDED
            await asyncio.wait_for(c.log.released.wait(), 3)
            assert c.log.calls[-1] == ("release", "d0", "r1", "RELEASE_REASON_DEADLINE_EXCEEDED")

    asyncio.run(main())


def test_abort_ends_the_stream_with_reason_abort_and_releases():
    async def main():
        async with cluster(hang_decode=True) as c:
            call = c.stub.Generate(request("victim"), timeout=5)
            for _ in range(3):
                await call.read()
            await c.stub.Abort(router_pb2.AbortRequest(request_id="victim"), timeout=2)
            rest = []
            while (frame := await call.read()) is not grpc.aio.EOF:
                rest.append(frame)
            assert [f.WhichOneof("frame") for f in rest] == ["finished"]
            assert rest[0].finished.finish_reason == common_pb2.FINISH_REASON_ABORT
            await asyncio.wait_for(c.log.released.wait(), 3)
            assert c.log.calls[-1] == ("release", "d0", "victim", "RELEASE_REASON_ABORTED")
            unknown = c.stub.Abort(router_pb2.AbortRequest(request_id="victim"), timeout=2)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unknown
            assert info.value.code() == C.NOT_FOUND
            assert "no running request 'victim'" in info.value.details()

    asyncio.run(main())


def test_duplicate_live_request_id_is_already_exists():
    async def main():
        async with cluster(hang_decode=True) as c:
            first = c.stub.Generate(request("dup"), timeout=5)
            await first.read()
            error = await status_of(c.stub.Generate(request("dup"), timeout=5))
            assert error.code() == C.ALREADY_EXISTS
            assert "'dup' is already running" in error.details()
            first.cancel()

    asyncio.run(main())


def test_lost_prefill_worker_is_removed_and_the_request_retried_on_another():
    async def main():
        async with cluster(prefill=2, dead=("p0",)) as c:
            frames = await collect(c.stub.Generate(request(), timeout=5))
            assert frames[0].started.prefill_worker_id == "p1"
            assert frames[-1].finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert c.log.calls == [
                ("reserve", "d0", "r1"),
                # p0 unreachable: the reservation is released, which shows d0 is alive.
                ("release", "d0", "r1", "RELEASE_REASON_PEER_LOST"),
                ("reserve", "d0", "r1"),
                ("prefill", "p1", "r1", "d0", "res-r1"),
                ("stream", "d0", "r1"),
            ]
            status = {w.worker_id: w.status for w in c.router.workers()}
            assert status == {
                "d0": WorkerStatus.HEALTHY,
                "p0": WorkerStatus.REMOVED,
                "p1": WorkerStatus.HEALTHY,
            }

    asyncio.run(main())


def test_a_prefill_worker_that_answers_cancelled_as_it_stops_is_lost_and_the_request_retried():
    """A worker's server cancels its calls while it shuts down: found once in the full suite, a
    decode worker whose loop died answered CANCELLED. That is the worker going away, as
    UNAVAILABLE is, not the client's cancel: the request is retried on another pair."""

    async def main():
        async with cluster(prefill=2) as c:
            c.workers["p0"].shutting_down = True
            c.router.report("p1", load(queued=4096), 2.0)  # p0 first: the least loaded
            frames = await collect(c.stub.Generate(request(), timeout=5))
            assert frames[0].started.prefill_worker_id == "p1"
            assert frames[-1].finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert [call[:2] for call in c.log.calls][:3] == [
                ("reserve", "d0"),
                ("prefill", "p0"),
                ("release", "d0"),
            ]
            assert {w.worker_id: w.status for w in c.router.workers()}["p0"] is (
                WorkerStatus.REMOVED
            )

    asyncio.run(main())


def test_lost_decode_worker_is_removed_and_the_request_retried_on_another():
    async def main():
        async with cluster(decode=2, dead=("d0",)) as c:
            frames = await collect(c.stub.Generate(request(), timeout=5))
            assert frames[0].started.decode_worker_id == "d1"
            assert [call[:2] for call in c.log.calls] == [
                ("reserve", "d1"),
                ("prefill", "p0"),
                ("stream", "d1"),
            ]
            assert c.router.workers()[0].status is WorkerStatus.REMOVED

    asyncio.run(main())


def test_losing_a_worker_twice_fails_with_unavailable():
    async def main():
        async with cluster(prefill=2, dead=("p0", "p1")) as c:
            error = await status_of(c.stub.Generate(request(), timeout=5))
            assert error.code() == C.UNAVAILABLE
            details = error.details()
            assert "worker 'p1' was lost before the first token, after 2 retries in" in details, (
                details
            )
            assert "then no healthy mixed or prefill worker" in details, details
            # The router decided it: a client does not resume it as a lost router's stream.
            assert ROUTER_UNAVAILABLE in tuple(error.trailing_metadata())
            assert c.driver.num_running == 0

    asyncio.run(main())


def tokens_of(frames) -> list[int]:
    return [t for f in frames if f.WhichOneof("frame") == "delta" for t in f.delta.token_ids]


def test_a_decode_worker_lost_mid_stream_resumes_the_request_on_another():
    async def main():
        async with cluster(decode=2) as c:
            c.workers["d0"].die_after_deltas = 1  # P's token 7, d0's 8, then d0 is gone
            c.router.report("d1", load(free=90), 2.0)  # d0 first: the most free blocks
            frames = await collect(c.stub.Generate(request(), timeout=5))
            kinds = [f.WhichOneof("frame") for f in frames]
            assert kinds == ["started", "delta", "delta", "delta", "delta", "finished"]
            assert frames[0].started.decode_worker_id == "d0"  # one Started: the first pair
            assert tokens_of(frames) == [7, 8, 9, 10]
            done = frames[-1].finished
            assert done.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert done.usage.num_completion_tokens == 4  # what the caller got, once each
            assert done.timings.kv_bytes == 4096  # P's hand-off, before the loss
            assert done.decode_worker_id == "d1"  # where it ended (probe, session 42)
            assert c.log.calls == [
                ("reserve", "d0", "r1"),
                ("prefill", "p0", "r1", "d0", "res-r1"),
                ("stream", "d0", "r1"),
                ("release", "d0", "r1", "RELEASE_REASON_PEER_LOST"),
                # d1 prefills the prompt and the two tokens the caller has, and goes on.
                ("reserve", "d1", "r1", "resume", (7, 8), "prefill_locally"),
                ("stream", "d1", "r1"),
            ]
            status = {w.worker_id: w.status for w in c.router.workers()}
            assert status["d0"] is WorkerStatus.REMOVED and status["d1"] is WorkerStatus.HEALTHY
            assert c.driver.num_running == 0 and c.router.num_inflight() == 0

    asyncio.run(main())


def test_a_prefill_worker_lost_during_its_hand_off_resumes_on_the_decode_worker():
    """The caller has the first token; the only prefill worker is gone: no prefill worker is
    needed, D prefills the prompt and that token itself."""

    async def main():
        async with cluster() as c:
            c.workers["p0"].prefill_dies_after_first = True
            frames = await collect(c.stub.Generate(request(), timeout=5))
            assert tokens_of(frames) == [7, 8, 9, 10]
            assert [f.WhichOneof("frame") for f in frames].count("started") == 1
            assert c.log.calls == [
                ("reserve", "d0", "r1"),
                ("prefill", "p0", "r1", "d0", "res-r1"),
                ("release", "d0", "r1", "RELEASE_REASON_PEER_LOST"),  # d0 answers: p0 is lost
                ("reserve", "d0", "r1", "resume", (7,), "prefill_locally"),
                ("stream", "d0", "r1"),
            ]
            assert {w.worker_id: w.status for w in c.router.workers()}["p0"] is (
                WorkerStatus.REMOVED
            )

    asyncio.run(main())


def test_a_mixed_worker_lost_mid_stream_resumes_on_another():
    async def main():
        async with cluster(prefill=0, decode=0, mixed=2, policy="colocated") as c:
            c.workers["m0"].die_after_deltas = 3
            c.router.report("m1", load(queued=4096, free=90), 2.0)  # m0 first
            frames = await collect(c.stub.Generate(request(), timeout=5))
            assert tokens_of(frames) == [7, 8, 9, 10]
            assert [call[:4] for call in c.log.calls][-2:] == [
                ("reserve", "m1", "r1", "resume"),
                ("stream", "m1", "r1"),
            ]
            assert c.log.calls[-2][4] == (7, 8, 9)

    asyncio.run(main())


@pytest.mark.parametrize(("max_resumes", "code"), [(2, None), (0, C.INTERNAL)])
def test_a_request_whose_decode_step_failed_is_resumed_and_its_worker_kept(max_resumes, code):
    """A failed step (INTERNAL: e.g. a layer migration's helper lost with its layers) freed the
    request on a worker that serves on: resumed, the worker not removed; with no resume
    allowed the INTERNAL comes through as before."""

    async def main():
        async with cluster(decode=1, max_resumes=max_resumes) as c:
            c.workers["d0"].fail_step_after_deltas = 1
            call = c.stub.Generate(request(), timeout=5)
            if code is not None:
                assert (await status_of(call)).code() == code
            else:
                assert tokens_of(await collect(call)) == [7, 8, 9, 10]
                assert c.log.calls[-2] == ("reserve", "d0", "r1", "resume", (7, 8),
                                           "prefill_locally")  # fmt: skip
            assert c.router.workers()[0].status is WorkerStatus.HEALTHY
            assert c.driver.num_running == 0 and c.router.num_inflight() == 0

    asyncio.run(main())


@pytest.mark.parametrize("failures", [1, 2])
def test_a_prefill_step_failed_before_the_first_token_is_routed_again_once(failures):
    """P's step failed (INTERNAL; P freed the request and serves on) before the caller had a
    token: D's reservation is released and the request routed again, P kept; a second
    failure comes through as the step's INTERNAL."""

    async def main():
        async with cluster() as c:
            c.workers["p0"].fail_prefill_steps = failures
            call = c.stub.Generate(request(), timeout=5)
            one_try = [
                ("reserve", "d0", "r1"),
                ("prefill", "p0", "r1", "d0", "res-r1"),
                ("release", "d0", "r1", "RELEASE_REASON_PEER_LOST"),
            ]
            if failures == 1:
                assert tokens_of(await collect(call)) == [7, 8, 9, 10]
                assert c.log.calls == [*one_try, *one_try[:2], ("stream", "d0", "r1")]
            else:
                error = await status_of(call)
                assert error.code() == C.INTERNAL
                assert "the engine step failed" in error.details()
                assert c.log.calls == one_try * 2
            assert all(w.status is WorkerStatus.HEALTHY for w in c.router.workers())
            assert c.driver.num_running == 0 and c.router.num_inflight() == 0

    asyncio.run(main())


def test_a_prefill_step_failed_after_the_first_token_is_resumed_on_the_decode_worker():
    async def main():
        async with cluster() as c:
            c.workers["p0"].fail_prefill_after_first = True
            frames = await collect(c.stub.Generate(request(), timeout=5))
            assert tokens_of(frames) == [7, 8, 9, 10]
            assert [f.WhichOneof("frame") for f in frames].count("started") == 1
            assert c.log.calls[2:] == [
                ("release", "d0", "r1", "RELEASE_REASON_PEER_LOST"),
                ("reserve", "d0", "r1", "resume", (7,), "prefill_locally"),
                ("stream", "d0", "r1"),
            ]
            assert all(w.status is WorkerStatus.HEALTHY for w in c.router.workers())

    asyncio.run(main())


def test_a_mixed_worker_step_failed_before_the_first_token_is_routed_again():
    async def main():
        async with cluster(prefill=0, decode=0, mixed=1, policy="colocated") as c:
            c.workers["m0"].fail_step_after_deltas = 0  # its prompt's step
            frames = await collect(c.stub.Generate(request(), timeout=5))
            assert tokens_of(frames) == [7, 8, 9, 10]
            assert [f.WhichOneof("frame") for f in frames].count("started") == 1
            assert c.log.calls == [
                ("reserve", "m0", "r1", "prefill_locally"),
                ("stream", "m0", "r1"),
                ("release", "m0", "r1", "RELEASE_REASON_PEER_LOST"),
                ("reserve", "m0", "r1", "prefill_locally"),
                ("stream", "m0", "r1"),
            ]
            assert c.router.workers()[0].status is WorkerStatus.HEALTHY
            assert c.driver.num_running == 0 and c.router.num_inflight() == 0

    asyncio.run(main())


def resumed_request(tokens, **sampling) -> router_pb2.GenerateRequest:
    message = request(**sampling)
    message.resume_output_token_ids.extend(tokens)
    return message


def test_a_request_its_client_resumes_goes_on_from_its_tokens_on_a_decode_worker():
    """The client's stream broke (its router lost) after tokens 7 and 8: the request sent again
    with them goes on from there on a decode-capable worker, in one new stream (its own
    Started, then only the tokens after them); its usage counts all four."""

    async def main():
        async with cluster() as c:
            frames = await collect(c.stub.Generate(resumed_request([7, 8]), timeout=5))
            kinds = [f.WhichOneof("frame") for f in frames]
            assert kinds == ["started", "delta", "delta", "finished"]
            assert frames[0].started.request_id == "r1"
            assert frames[0].started.num_prompt_tokens == len(PROMPT)
            assert tokens_of(frames) == [9, 10]
            done = frames[-1].finished
            assert done.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert done.usage.num_completion_tokens == 4
            assert c.log.calls == [
                ("reserve", "d0", "r1", "resume", (7, 8), "prefill_locally"),
                ("stream", "d0", "r1"),
            ]
            assert c.driver.num_running == 0 and c.router.num_inflight() == 0

    asyncio.run(main())


@pytest.mark.parametrize("resent_tokens", [[7], []], ids=["with-tokens", "before-any-token"])
def test_a_resend_by_the_client_takes_over_its_request_still_running_here(resent_tokens):
    """The client's stream broke on its side only (a connection that died without closing: the
    router still streams into it) and the client sends the request again under its id: the old
    call ends ABORTED and the resend goes on from the tokens it has, after the old reservation's
    release, instead of ALREADY_EXISTS."""

    async def main():
        async with cluster(hang_decode=True) as c:
            old = c.stub.Generate(request(), timeout=10)
            assert (await old.read()).WhichOneof("frame") == "started"
            assert tokens_of([await old.read()]) == [7]  # the prefill worker's token
            # d0's stream has started, and stalls after this token: only now may the next
            # stream run free. Cleared after token 7 alone, it was cleared before d0's stream
            # started when the machine was loaded, and the old request ran to its end before
            # the resend came (CI, session 47).
            assert tokens_of([await old.read()]) == [8]
            c.workers["d0"].hang_decode = False
            resend = resumed_request(resent_tokens)
            resend.resume = True
            frames = await collect(c.stub.Generate(resend, timeout=5))
            assert tokens_of(frames) == [7, 8, 9, 10][len(resent_tokens) :]
            assert frames[-1].finished.usage.num_completion_tokens == 4
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await old.read()
            error = info.value
            assert error.code() == C.ABORTED
            assert "'r1' was sent again by its client" in error.details()
            calls = [call[:3] for call in c.log.calls]
            # The old reservation is released before the resend reserves anything.
            assert calls[calls.index(("release", "d0", "r1")) + 1] == ("reserve", "d0", "r1")
            assert c.driver.num_running == 0 and c.router.num_inflight() == 0

    asyncio.run(main())


@pytest.mark.parametrize("first_ends", ["taken over", "cancelled"])
def test_two_resends_at_once_never_let_a_reservation_overlap_a_release_still_running(
    first_ends,
):
    """Found by a probe: two resends of one running request at once. The first takes the
    request over and waits for the old one's release; the second takes it over from the first,
    which ends while it waits (or the first's client cancels it then, and the second comes
    after). The second must wait for the old release too: it waited only for the first, whose
    task was done at once, and its reservation went in before the old Release, which then freed
    it on the worker (NOT_FOUND)."""

    async def main():
        async with cluster(hang_decode=True) as c:
            d0 = c.workers["d0"]
            old = c.stub.Generate(request(), timeout=10)
            assert (await old.read()).WhichOneof("frame") == "started"
            d0.hang_decode, d0.release_delay_s = False, 0.3
            first, second = resumed_request([7]), resumed_request([7])
            first.resume = second.resume = True
            first_call = c.stub.Generate(first, timeout=5)
            await asyncio.sleep(0.1)  # the first has taken over; the old release is under way
            if first_ends == "cancelled":
                first_call.cancel()
                await asyncio.sleep(0.05)
            frames = await collect(c.stub.Generate(second, timeout=5))
            assert tokens_of(frames) == [8, 9, 10]
            if first_ends == "taken over":
                assert (await status_of(first_call)).code() == C.ABORTED
            calls = [call[0] for call in c.log.calls if call[0] != "stream"]
            # One reservation at a time: each later one only once the one before is released.
            assert calls == ["reserve", "prefill", "release", "released", "reserve"], c.log.calls
            assert c.driver.num_running == 0 and c.router.num_inflight() == 0

    asyncio.run(main())


def test_a_request_aborted_while_its_stream_was_broken_is_not_started_again_by_its_resend():
    """Found by a probe: an Abort answered OK, but the ABORT frame went into the client's dead
    connection, and the client library's resend (its keepalive found the connection dead) ran
    the request again in full. The resend of an aborted request now ends aborted, counting the
    tokens it came with; another caller's resend, or a new request with the id, runs."""

    async def main():
        async with cluster(hang_decode=True) as c:
            alice = (("authorization", "Bearer alice"),)
            old = c.stub.Generate(request(), timeout=10, metadata=alice)
            assert (await old.read()).WhichOneof("frame") == "started"
            await c.stub.Abort(router_pb2.AbortRequest(request_id="r1"), timeout=2, metadata=alice)
            c.workers["d0"].hang_decode = False
            resend = resumed_request([7])
            resend.resume = True
            frames = await collect(c.stub.Generate(resend, timeout=5, metadata=alice))
            assert [f.WhichOneof("frame") for f in frames] == ["started", "finished"]
            assert frames[0].started.request_id == "r1"
            assert frames[1].finished.finish_reason == common_pb2.FINISH_REASON_ABORT
            assert frames[1].finished.usage.num_completion_tokens == 1
            assert [call[0] for call in c.log.calls].count("reserve") == 1  # not run again
            # Forgotten once answered: a second resend, and a new request, run.
            frames = await collect(c.stub.Generate(resend, timeout=5, metadata=alice))
            assert tokens_of(frames) == [8, 9, 10]
            assert tokens_of(await collect(c.stub.Generate(request(), timeout=5))) == [7, 8, 9, 10]

    asyncio.run(main())


def test_a_resend_of_an_aborted_request_by_another_caller_or_after_a_new_one_runs():
    async def main():
        async with cluster() as c:
            c.workers["d0"].hang_decode = True
            old = c.stub.Generate(request(), timeout=10)
            await old.read()
            await c.stub.Abort(router_pb2.AbortRequest(request_id="r1"), timeout=2)
            c.workers["d0"].hang_decode = False
            resend = resumed_request([7])
            resend.resume = True
            other = (("authorization", "Bearer mallory"),)
            frames = await collect(c.stub.Generate(resend, timeout=5, metadata=other))
            assert tokens_of(frames) == [8, 9, 10]
            c.workers["d0"].hang_decode = True
            old = c.stub.Generate(request(), timeout=10)
            await old.read()
            await c.stub.Abort(router_pb2.AbortRequest(request_id="r1"), timeout=2)
            c.workers["d0"].hang_decode = False
            assert tokens_of(await collect(c.stub.Generate(request(), timeout=5))) == [7, 8, 9, 10]
            frames = await collect(c.stub.Generate(resend, timeout=5))  # after a new one
            assert tokens_of(frames) == [8, 9, 10]

    asyncio.run(main())


def test_a_resend_by_another_caller_does_not_take_over_the_request():
    async def main():
        async with cluster(hang_decode=True) as c:
            owner = (("authorization", "Bearer alice"),)
            old = c.stub.Generate(request(), timeout=10, metadata=owner)
            await old.read()
            resend = resumed_request([7])
            resend.resume = True
            other = (("authorization", "Bearer mallory"),)
            error = await status_of(c.stub.Generate(resend, timeout=5, metadata=other))
            assert error.code() == C.ALREADY_EXISTS
            assert tokens_of([await old.read()]) == [7]  # still streaming to its caller
            assert c.driver.num_running == 1
            old.cancel()

    asyncio.run(main())


def test_a_request_resumed_with_all_its_tokens_finishes_without_a_worker():
    async def main():
        async with cluster() as c:
            message = resumed_request([7, 8, 9, 10])
            message.request_id = ""  # the router names it: the started frame says how
            frames = await collect(c.stub.Generate(message, timeout=5))
            assert [f.WhichOneof("frame") for f in frames] == ["started", "finished"]
            assert frames[0].started.request_id.startswith("req-")
            assert frames[0].started.num_prompt_tokens == len(PROMPT)
            assert frames[0].started.decode_worker_id == ""  # no worker served it
            assert frames[1].finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert frames[1].finished.usage.num_completion_tokens == 4
            assert c.log.calls == []

    asyncio.run(main())


def test_a_resumed_request_whose_worker_fails_before_its_next_token_is_routed_again():
    async def main():
        async with cluster(prefill=0, decode=0, mixed=1, policy="colocated") as c:
            c.workers["m0"].fail_step_after_deltas = 0
            frames = await collect(c.stub.Generate(resumed_request([7]), timeout=5))
            assert tokens_of(frames) == [8, 9, 10]
            assert [f.WhichOneof("frame") for f in frames].count("started") == 1
            assert [call[:4] for call in c.log.calls] == [
                ("reserve", "m0", "r1", "resume"),
                ("stream", "m0", "r1"),
                ("release", "m0", "r1", "RELEASE_REASON_PEER_LOST"),
                ("reserve", "m0", "r1", "resume"),
                ("stream", "m0", "r1"),
            ]

    asyncio.run(main())


@pytest.mark.parametrize(
    ("tokens", "vocab_size", "message"),
    [
        ([7, 8, 9, 10, 11], None, "resume_output_token_ids: 5 tokens, more than max_tokens (4)"),
        ([7, 5000], 4096, "resume_output_token_ids: token id 5000 is outside the model's"),
    ],
)
def test_resume_tokens_the_request_cannot_have_are_refused_before_any_work(
    tokens, vocab_size, message
):
    async def main():
        async with cluster(vocab_size=vocab_size) as c:
            error = await status_of(c.stub.Generate(resumed_request(tokens), timeout=5))
            assert error.code() == C.INVALID_ARGUMENT
            assert message in error.details()
            assert c.log.calls == []

    asyncio.run(main())


def test_a_worker_lost_after_the_last_token_finishes_the_request_without_a_resume():
    async def main():
        async with cluster(decode=2) as c:
            c.workers["d0"].die_after_deltas = 3  # 8, 9, 10: the 4 tokens asked for, no end
            c.router.report("d1", load(free=90), 2.0)
            frames = await collect(c.stub.Generate(request(), timeout=5))
            assert tokens_of(frames) == [7, 8, 9, 10]
            done = frames[-1].finished
            assert done.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert (done.usage.num_completion_tokens, done.timings.kv_bytes) == (4, 4096)
            assert [call[:2] for call in c.log.calls][-2:] == [("stream", "d0"), ("release", "d0")]
            assert c.driver.num_running == 0 and c.router.num_inflight() == 0

    asyncio.run(main())


def test_a_resume_that_finds_its_next_worker_dead_too_spends_no_resume_on_it():
    """Two decode workers die together: the resumed try's reserve on the second, not yet
    removed, fails; the request goes on on the third within --max-resumes 1."""

    async def main():
        async with cluster(decode=3, dead=("d1",), max_resumes=1) as c:
            c.workers["d0"].die_after_deltas = 1
            c.router.report("d2", load(free=80), 2.0)  # d0, then d1, then d2
            frames = await collect(c.stub.Generate(request(), timeout=5))
            assert tokens_of(frames) == [7, 8, 9, 10]
            reserves = [call[1] for call in c.log.calls if call[0] == "reserve"]
            assert reserves == ["d0", "d2"]  # (d1's address refuses: no fake records it)
            status = {w.worker_id: w.status for w in c.router.workers()}
            assert status == {"d0": WorkerStatus.REMOVED, "d1": WorkerStatus.REMOVED,
                              "d2": WorkerStatus.HEALTHY, "p0": WorkerStatus.HEALTHY}  # fmt: skip

    asyncio.run(main())


@pytest.mark.parametrize(("max_resumes", "fails_after"), [(0, "lost after 2 tokens ("),
                                                          (2, "lost after 4 tokens, after 2 resumes")])  # fmt: skip
def test_a_request_that_loses_more_workers_than_it_may_resume_fails_unavailable(
    max_resumes, fails_after
):
    async def main():
        async with cluster(decode=3, max_resumes=max_resumes, tokens=(7, 8, 9, 10, 11, 12)) as c:
            for worker in ("d0", "d1", "d2"):
                c.workers[worker].die_after_deltas = 1
            error = await status_of(c.stub.Generate(request(max_tokens=6), timeout=5))
            assert error.code() == C.UNAVAILABLE
            assert fails_after in error.details(), error.details()
            assert c.driver.num_running == 0 and c.router.num_inflight() == 0

    asyncio.run(main())


def test_colocated_request_is_prefilled_and_decoded_by_one_mixed_worker():
    async def main():
        async with cluster(prefill=0, decode=0, mixed=1, policy="colocated") as c:
            frames = await collect(c.stub.Generate(request(), timeout=5))
            # No Prefill call, no transfer: the mixed worker's stream starts with token one.
            assert c.log.calls == [
                ("reserve", "m0", "r1", "prefill_locally"),
                ("stream", "m0", "r1"),
            ]
            kinds = [f.WhichOneof("frame") for f in frames]
            assert kinds == ["started", "delta", "delta", "delta", "delta", "finished"]
            started = frames[0].started
            assert (started.prefill_worker_id, started.decode_worker_id) == ("m0", "m0")
            assert [list(f.delta.token_ids) for f in frames[1:5]] == [[7], [8], [9], [10]]
            done = frames[-1].finished
            assert (done.usage.num_completion_tokens, done.usage.num_cached_tokens) == (4, 16)
            t = done.timings
            assert 0 < seconds(t.ttft) <= seconds(t.total) < 5
            assert (seconds(t.kv_transfer), t.kv_bytes) == (0.0, 0)
            assert c.driver.num_running == 0

    asyncio.run(main())


def test_lost_mixed_worker_before_the_first_token_is_retried_on_another():
    async def main():
        async with cluster(prefill=0, decode=0, mixed=2, dead=("m0",)) as c:
            frames = await collect(c.stub.Generate(request(), timeout=5))
            assert frames[0].started.prefill_worker_id == "m1"
            assert [call[:2] for call in c.log.calls] == [("reserve", "m1"), ("stream", "m1")]
            assert c.router.workers()[0].status is WorkerStatus.REMOVED

    asyncio.run(main())


def test_cancel_of_a_colocated_request_releases_it():
    async def main():
        async with cluster(prefill=0, decode=0, mixed=1, hang_decode=True) as c:
            call = c.stub.Generate(request(), timeout=5)
            # The fake stalls after its first delta, which here is the first token.
            kinds = [(await call.read()).WhichOneof("frame") for _ in range(2)]
            assert kinds == ["started", "delta"]
            call.cancel()
            await asyncio.wait_for(c.log.released.wait(), 3)
            assert c.log.calls[-1] == ("release", "m0", "r1", "RELEASE_REASON_ABORTED")
            assert c.driver.num_running == 0

    asyncio.run(main())


def test_a_request_counts_on_its_workers_until_reported_or_ended():
    """The fakes never report: P's prompt tokens and D's blocks stay counted while the request
    runs, and stop counting when it ends (here, cancelled), not before and not never."""

    async def main():
        async with cluster(hang_decode=True) as c:
            call = c.stub.Generate(request(), timeout=5)
            kinds = [(await call.read()).WhichOneof("frame") for _ in range(2)]
            assert kinds == ["started", "delta"]
            w = {info.worker_id: info for info in c.router.workers()}
            p0, d0 = w["p0"], w["d0"]
            assert (p0.num_queued_tokens, NUM_BLOCKS - d0.num_free_blocks) == (20, 2)
            call.cancel()
            await asyncio.wait_for(c.log.released.wait(), 3)
            for _ in range(100):
                if c.router.num_inflight() == 0:
                    break
                await asyncio.sleep(0.01)
            assert c.router.num_inflight() == 0

    asyncio.run(main())


def test_a_prompt_prefilled_on_its_decode_worker_stops_counting_on_the_prefill_worker():
    async def main():
        async with cluster(local_prefill_max_tokens=8, hang_decode=True) as c:
            call = c.stub.Generate(request(), timeout=5)
            kinds = [(await call.read()).WhichOneof("frame") for _ in range(2)]
            assert kinds == ["started", "delta"]
            assert [x[:2] for x in c.log.calls] == [("reserve", "d0"), ("stream", "d0")]
            w = {info.worker_id: info for info in c.router.workers()}
            p0, d0 = w["p0"], w["d0"]
            # P never sees it; D's reports will count the prompt it admitted.
            assert (p0.num_queued_tokens, NUM_BLOCKS - d0.num_free_blocks) == (0, 2)
            call.cancel()

    asyncio.run(main())


async def prefilled_on_d0(c) -> None:
    """A request goes to d0 alone, which prefills it (no call to p0) and streams it."""
    call = c.stub.Generate(request(), timeout=5)
    kinds = [(await call.read()).WhichOneof("frame") for _ in range(2)]
    assert kinds == ["started", "delta"]
    assert [x[:2] + x[3:] for x in c.log.calls] == [
        ("reserve", "d0", "local_prefill"),
        ("stream", "d0"),
    ]
    call.cancel()


def test_a_prompt_past_the_prefill_workers_context_is_prefilled_on_its_decode_worker():
    """Probe, session 42: a prefill pool smaller than the decode pool (16 against 64 blocks)
    ended a 255-token prompt LENGTH after one token, and refused longer ones OUT_OF_RANGE, at
    the prefill worker's context, though the decode worker's holds them: D prefills them."""

    async def main():
        async with cluster(hang_decode=True) as c:
            prompt_len = len(PROMPT)
            for worker_id, role, context in (
                ("p0", WorkerRole.PREFILL, prompt_len + 1),  # its first token would end it
                ("d0", WorkerRole.DECODE, NUM_BLOCKS * BLOCK_SIZE),
            ):
                info = next(w for w in c.router.workers() if w.worker_id == worker_id)
                c.router.register(
                    worker_id, info.address, role,
                    replace(info.capacity, max_model_len=context),
                )  # fmt: skip
                c.router.report(worker_id, load(), 2.0)
            await prefilled_on_d0(c)

    asyncio.run(main())


@pytest.mark.parametrize("queue_rule", [True, False])
def test_with_no_prefill_worker_the_decode_worker_prefills_if_the_queue_rule_is_on(queue_rule):
    """Probe, session 42: the only prefill worker stopping (SIGTERM, back ~6 s later) failed a
    request UNAVAILABLE after --no-worker-wait-s (5 s), beside a free decode worker. With the
    router's queue rule on (banaserve mode) an absent prefill worker is an endless queue: the
    decode worker prefills the prompt itself. Without it (static PD) the request waits."""

    async def main():
        rule = 1280 if queue_rule else 0
        async with cluster(local_prefill_queue_tokens=rule, hang_decode=True) as c:
            c.router.remove("p0", "stopping")
            if not queue_rule:
                error = await status_of(c.stub.Generate(request(), timeout=5))
                assert error.code() == C.UNAVAILABLE
                assert "no healthy mixed or prefill worker" in error.details()
                assert c.log.calls == []
                return
            await prefilled_on_d0(c)

    asyncio.run(main())


def test_a_request_waits_for_decode_room_instead_of_failing():
    async def main():
        async with cluster() as c:
            c.router.report("d0", load(free=0, used=NUM_BLOCKS), 2.0)  # d0 is full
            call = c.stub.Generate(request(), timeout=5)
            await asyncio.sleep(0.3)
            assert c.log.calls == []  # queued at the router, no worker called yet
            c.router.report("d0", load(), 3.0)  # running requests ended
            frames = await collect(call)
            assert frames[-1].finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert [call[0] for call in c.log.calls] == ["reserve", "prefill", "stream"]

    asyncio.run(main())


def test_a_reservation_refused_for_room_waits_for_the_next_report_and_retries():
    async def main():
        async with cluster(full_reserves=1) as c:
            call = c.stub.Generate(request(), timeout=5)
            await asyncio.sleep(0.3)
            # Refused once: d0 counts as full until it reports, so nothing else was tried.
            assert c.log.calls == [("reserve", "d0", "r1")]
            c.router.report("d0", load(), 2.0)
            frames = await collect(call)
            assert frames[-1].finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert [call[0] for call in c.log.calls] == ["reserve", "reserve", "prefill", "stream"]

    asyncio.run(main())


def test_a_request_that_never_gets_room_ends_at_its_deadline():
    async def main():
        async with cluster() as c:
            c.router.report("d0", load(free=0, used=NUM_BLOCKS), 2.0)
            loop = asyncio.get_running_loop()
            started = loop.time()
            error = await status_of(c.stub.Generate(request(), timeout=0.5))
            assert error.code() == C.DEADLINE_EXCEEDED
            assert loop.time() - started < 1.5
            assert c.log.calls == [] and c.driver.num_running == 0

    asyncio.run(main())


def test_a_request_larger_than_any_worker_fails_at_once():
    async def main():
        async with cluster() as c:
            big = request(prompt=list(range(1, 30)), max_tokens=NUM_BLOCKS * 16)
            error = await status_of(c.stub.Generate(big, timeout=5))
            assert error.code() == C.RESOURCE_EXHAUSTED
            assert "more than any decode or mixed worker holds in total" in error.details()

    asyncio.run(main())


def test_no_workers_is_unavailable_with_a_clear_message_after_the_wait():
    async def main():
        async with cluster(prefill=0, decode=1, no_worker_wait_s=0.3) as c:
            loop = asyncio.get_running_loop()
            started = loop.time()
            error = await status_of(c.stub.Generate(request(), timeout=5))
            assert error.code() == C.UNAVAILABLE
            assert "no healthy mixed or prefill worker to prefill request 'r1'" in error.details()
            assert 0.3 <= loop.time() - started < 2.0
            assert c.log.calls == []
            # a deadline shorter than the wait: still UNAVAILABLE with the reason, in time
            async with cluster(prefill=0, decode=1, no_worker_wait_s=10.0) as c:
                started = loop.time()
                error = await status_of(c.stub.Generate(request(), timeout=0.5))
                assert error.code() == C.UNAVAILABLE and loop.time() - started < 0.5

    asyncio.run(main())


def test_a_request_waits_for_a_worker_that_registers_meanwhile():
    # The prefill worker missed its reports (expired) and registers again 0.3 s later: the
    # request routed meanwhile waits for it instead of failing (a compose start, a restart).
    async def main():
        async with cluster(no_worker_wait_s=5.0) as c:
            [address] = [w.address for w in c.router.workers() if w.worker_id == "p0"]
            c.router.remove("p0", "test: missed its reports")
            call = asyncio.ensure_future(collect(c.stub.Generate(request(), timeout=10)))
            await asyncio.sleep(0.3)
            assert not call.done()
            c.add("p0", WorkerRole.PREFILL, address)
            frames = await call
            assert frames[-1].WhichOneof("frame") == "finished"

    asyncio.run(main())


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (router_pb2.GenerateRequest(text=""), "prompt is empty"),
        (router_pb2.GenerateRequest(), "prompt is empty"),
        (request(prompt=[]), "prompt is empty"),
        (request(max_tokens=0), "max_tokens must be > 0, got 0"),
        (request(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
        (request(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (request(temperature=-1.0), "temperature must be >= 0"),
    ],
)
def test_bad_input_is_invalid_argument_before_any_worker_call(message, expected):
    async def main():
        async with cluster() as c:
            error = await status_of(c.stub.Generate(message, timeout=5))
            assert error.code() == C.INVALID_ARGUMENT
            assert expected in error.details()
            assert c.log.calls == []

    asyncio.run(main())


def test_a_resend_whose_tokens_end_the_request_before_the_last_is_refused_and_takes_nothing_over():
    """A buggy client resends its running request with tokens whose second would have ended it
    (a stop token): INVALID_ARGUMENT before any work, and the request still running under the id
    goes on untouched. Before session 27 the resend took the request over (ending it) and the worker then
    refused the resend. The stop check here stands in for the router's real one (the model's
    stop conditions replayed on its tokenizer: tests/router/test_resume_check.py)."""

    def resumable(prompt, outputs, params, context):
        if 99 in outputs[:-1]:
            raise InvalidRequestError("resumed output token 1 (99) would have finished it")

    async def main():
        async with cluster(hang_decode=True, resumable=resumable) as c:
            old = c.stub.Generate(request(), timeout=10)
            assert (await old.read()).WhichOneof("frame") == "started"
            assert tokens_of([await old.read()]) == [7]
            resend = resumed_request([7, 99, 8])
            resend.resume = True
            error = await status_of(c.stub.Generate(resend, timeout=5))
            assert error.code() == C.INVALID_ARGUMENT
            assert "would have finished" in error.details()
            # Still running (stalled in d0's stream by ``hang_decode``), its call not ended.
            assert c.driver.num_running == 1 and not old.done()
            assert [call[:2] for call in c.log.calls].count(("reserve", "d0")) == 1
            assert ("release", "d0") not in [call[:2] for call in c.log.calls]
            old.cancel()

    asyncio.run(main())


def test_a_draining_router_refuses_new_requests_and_fails_those_left_at_its_end():
    """``RequestDriver.drain``: a request running when it starts and ending within it
    completes; a new one fails UNAVAILABLE before any work; one still running at the drain's
    end fails UNAVAILABLE saying the router is shutting down (no ROUTER_UNAVAILABLE marker: the
    client library resumes it elsewhere), and what it held on the decode worker is released."""

    async def main():
        async with cluster(hang_decode=True) as c:
            hung = c.stub.Generate(request("hung"), timeout=10)
            kinds = [(await hung.read()).WhichOneof("frame") for _ in range(3)]
            assert kinds == ["started", "delta", "delta"]  # now 30 s to its next token
            c.workers["d0"].hang_decode = False
            c.workers["p0"].prefill_delay_s = 0.4
            quick = asyncio.ensure_future(collect(c.stub.Generate(request("quick"), timeout=10)))
            await asyncio.sleep(0.1)
            draining = asyncio.ensure_future(c.driver.drain(1.0))
            await asyncio.sleep(0.05)
            refused = await status_of(c.stub.Generate(request("new"), timeout=5))
            assert refused.code() == C.UNAVAILABLE
            assert "shutting down" in refused.details()
            assert ("reserve", "d0", "new") not in c.log.calls
            assert (await quick)[-1].WhichOneof("frame") == "finished"  # ended within the drain
            assert await draining == 1
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await hung.read()
            error = info.value
            assert error.code() == C.UNAVAILABLE
            assert "the router is shutting down" in error.details() and "(1s)" in error.details()
            assert ROUTER_UNAVAILABLE not in tuple(error.trailing_metadata() or ())
            await asyncio.wait_for(c.log.released.wait(), 3)
            assert ("release", "d0", "hung", "RELEASE_REASON_ABORTED") in c.log.calls
            assert c.driver.num_running == 0

    asyncio.run(main())
