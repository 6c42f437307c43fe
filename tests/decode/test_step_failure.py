"""Issue 8, item 1 (b, c) on the decode side: a failed step ends its own requests' streams with
a status and a reason (not a silent ABORT), frees their blocks and steps on; a worker whose
engine loop died anyway turns NOT_SERVING, leaves the router and exits."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from services.decode.__main__ import parse_args, serve
from services.decode.core import DecodeConfig, DecodeWorker
from services.engine.engine import Engine
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import decode_pb2, decode_pb2_grpc
from tests.decode.helpers import (
    GREEDY,
    PrefillSide,
    assert_clean,
    decode_server,
    prompt_ids,
    reference_tokens,
    reserve_request,
)
from tests.decode.test_servicer import collect, rpc_error
from tests.engine.helpers import make_engine
from tests.worker_faults import (
    POISON_SEED,
    RPC,
    PoisonedStep,
    health_changes,
    listed,
    registered,
    router,
)

MIXED = DecodeConfig(prefill_locally=True)


def local_request(request_id: str, prompt: list[int], seed: int | None = None):
    request = reserve_request(request_id, prompt, GREEDY, prefill_locally=True)
    if seed is not None:
        request.sampling.seed = seed
    return request


def stream(stub, request_id: str):
    return stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id=request_id))


def test_a_failed_step_ends_its_streams_with_internal_and_the_worker_serves_on(tiny_llama):
    poison = PoisonedStep()
    waiting, bad, after = prompt_ids(30, 1), prompt_ids(20, 2), prompt_ids(25, 3)
    reference = make_engine(tiny_llama)

    async def main():
        async with decode_server(tiny_llama, MIXED, logits_hook=poison) as (_, stub):
            # Reserved, its KV not here yet: not in any step, so not failed with one.
            reply = await stub.ReserveKV(reserve_request("waiting", waiting))
            await stub.ReserveKV(local_request("bad", bad, seed=POISON_SEED))
            while not poison.num_failed:  # failed before its stream opened: kept for it
                await asyncio.sleep(0.01)
            failed = await rpc_error(collect(stream(stub, "bad")))
            prefill = PrefillSide(tiny_llama)
            first = prefill.prefill("waiting", waiting, GREEDY)
            await stub.TransferKV(prefill.frames("waiting", reply.reservation_id, first))
            rest, _ = await collect(stream(stub, "waiting"))
            await stub.ReserveKV(local_request("after", after))
            local, finished = await collect(stream(stub, "after"))
            await assert_clean(stub)
            return failed, [first, *rest], local, finished

    failed, handed_off, local, finished = asyncio.run(main())
    assert failed.code() == grpc.StatusCode.INTERNAL
    assert failed.details().startswith("the engine step computing request 'bad' failed (ref ")
    assert failed.details().endswith(" in the decode worker's log); the request was dropped")
    assert poison.num_failed == 1
    assert handed_off == reference_tokens(reference, waiting, GREEDY)
    assert local == reference_tokens(reference, after, GREEDY)
    assert finished.num_completion_tokens == GREEDY.max_tokens


def test_a_request_may_reuse_the_id_of_one_whose_step_failed(tiny_llama):
    async def main():
        async with decode_server(tiny_llama, MIXED, logits_hook=PoisonedStep()) as (_, stub):
            prompt = prompt_ids(20, 4)
            await stub.ReserveKV(local_request("r", prompt, seed=POISON_SEED))
            failed = await rpc_error(collect(stream(stub, "r")))
            await stub.ReserveKV(local_request("r", prompt))
            tokens, _ = await collect(stream(stub, "r"))
            await assert_clean(stub)
            return failed.code(), tokens

    code, tokens = asyncio.run(main())
    assert code == grpc.StatusCode.INTERNAL
    assert tokens == reference_tokens(make_engine(tiny_llama), prompt_ids(20, 4), GREEDY)


def broken_dispatch(self, outputs) -> None:
    raise RuntimeError("a bug outside any step")


class DiesWhileStreaming:
    """The loop dies at a request's second outputs, once its stream has read the first.

    With ``broken_dispatch`` the death raced the client: it could come before ``ReserveKV``
    answered or before ``StreamTokens`` reached a server already stopping (CANCELLED), each a
    flake in CI. Here the engine thread waits, once a step has had outputs, until the test has
    read them from the stream (``streamed``); the next outputs' dispatch raises."""

    def __init__(self, monkeypatch) -> None:
        self.armed = threading.Event()
        self._had_outputs = False
        dispatch, step, settle = DecodeWorker._dispatch, Engine.step, Engine.settle

        def gated(original):
            def run(engine, *args, **kwargs):
                if self._had_outputs and not self.armed.wait(30):
                    raise AssertionError("the test never read the first outputs")
                outputs = original(engine, *args, **kwargs)
                self._had_outputs = self._had_outputs or bool(outputs)
                return outputs

            return run

        def dispatch_until_armed(worker, outputs) -> None:
            if self.armed.is_set():
                raise RuntimeError("a bug outside any step")
            dispatch(worker, outputs)

        monkeypatch.setattr(Engine, "step", gated(step))
        monkeypatch.setattr(Engine, "settle", gated(settle))
        monkeypatch.setattr(DecodeWorker, "_dispatch", dispatch_until_armed)

    async def streamed(self, call) -> list[int]:
        """The first frame's tokens, then arms the death; the call stays open."""
        frame = await call.read()
        assert frame is not grpc.aio.EOF and frame.WhichOneof("frame") == "delta", frame
        self.armed.set()
        return list(frame.delta.token_ids)


def test_a_dead_engine_loop_frees_every_request_and_refuses_new_ones(tiny_llama, monkeypatch):
    dies = DiesWhileStreaming(monkeypatch)

    async def main():
        async with decode_server(tiny_llama, MIXED) as (worker, stub):
            reply = await stub.ReserveKV(reserve_request("reserved", prompt_ids(30, 5)))
            await stub.ReserveKV(local_request("running", prompt_ids(20, 6)))
            call = stream(stub, "running")
            assert len(await dies.streamed(call)) == 1
            died = await asyncio.wait_for(asyncio.shield(worker.died), 10)
            running = await rpc_error(collect(call))
            refused = await rpc_error(stub.ReserveKV(local_request("later", [5, 6, 7])))
            await assert_clean(stub)
            return reply.reservation_id, running, died, refused

    reservation, running, died, refused = asyncio.run(main())
    assert reservation
    assert (running.code(), running.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "this decode worker's engine loop stopped while 'running' ran",
    )
    assert str(died) == "a bug outside any step"
    assert (refused.code(), refused.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "this decode worker's engine loop has stopped; it is shutting down",
    )


def test_a_reservation_answered_after_the_loop_died_says_so(tiny_llama, monkeypatch):
    """ReserveKV of a local prefill whose first outputs kill the loop before the reply: the
    reply is UNAVAILABLE with the cause (it was NOT_FOUND "was released", a flake in CI)."""
    monkeypatch.setattr(DecodeWorker, "_dispatch", broken_dispatch)

    async def main():
        async with decode_server(tiny_llama, MIXED) as (worker, stub):
            call = worker._loop.call

            async def reply_after_the_death(fn):
                result = await call(fn)
                await asyncio.wait_for(asyncio.shield(worker.died), 5)
                return result

            monkeypatch.setattr(worker._loop, "call", reply_after_the_death)
            return await rpc_error(stub.ReserveKV(local_request("r", prompt_ids(20, 8))))

    error = asyncio.run(main())
    assert (error.code(), error.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "this decode worker's engine loop has stopped; it is shutting down",
    )


def test_a_worker_whose_loop_died_turns_not_serving_leaves_the_router_and_exits(
    tiny_llama, monkeypatch
):
    """The wiring of ``python -m services.decode --role mixed``, run in this process."""
    dies = DiesWhileStreaming(monkeypatch)

    async def probe(stub, seen: list[str]):
        (info,) = await registered(stub)
        watcher = asyncio.create_task(health_changes(info.address, seen))
        while not seen:
            await asyncio.sleep(0.01)
        channel = open_channel(info.address, RPC)
        worker = decode_pb2_grpc.DecodeServiceStub(channel)

        async def reserve_and_stream():
            # The loop dies while r1's stream is open: it ends saying why (UNAVAILABLE).
            await worker.ReserveKV(local_request("r1", prompt_ids(20, 7)), timeout=5)
            call = stream(worker, "r1")
            await dies.streamed(call)
            return await collect(call)

        got = await rpc_error(reserve_and_stream())
        await channel.close()
        await watcher  # until NOT_SERVING
        return info.worker_id, (got.code(), got.details())

    async def main():
        async with router() as stub:
            args = parse_args(
                ["--model", str(tiny_llama), "--router", stub._address, "--role", "mixed"]
                + ["--num-kv-blocks", "16", "--report-interval", "0.05", "--kv-transport", "none"]
            )
            seen: list[str] = []
            probing = asyncio.create_task(probe(stub, seen))
            with pytest.raises(SystemExit) as exit:
                await serve(args)
            worker_id, code = await probing
            return worker_id, code, exit.value.code, seen, await listed(stub)

    worker_id, code, message, seen, workers = asyncio.run(main())
    assert worker_id.startswith("mixed-")
    assert code == (
        grpc.StatusCode.UNAVAILABLE,
        "this decode worker's engine loop stopped while 'r1' ran",
    )
    assert message == "mixed worker: the engine loop died (RuntimeError('a bug outside any step'))"
    assert seen == ["SERVING", "NOT_SERVING"]
    assert workers == []  # deregistered: the router routes nothing more to it
