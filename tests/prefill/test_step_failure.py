"""Issue 8, item 1 (b, c): a failed step fails only its own requests, with a status and a
reason, and the prefill worker serves on; a worker whose step loop died anyway turns
NOT_SERVING, leaves the router and exits, instead of holding requests until their deadlines."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.common.types import SamplingParams
from services.prefill import __main__ as prefill_main
from services.prefill.__main__ import parse_args, serve
from services.prefill.core import PrefillWorker
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import prefill_pb2_grpc
from tests.engine.helpers import make_engine
from tests.prefill.helpers import (
    RPC,
    ImportingDecode,
    cluster,
    prefill_request,
    prompt_ids,
    run_prefill,
    status_of,
)
from tests.worker_faults import (
    POISON_SEED,
    PoisonedStep,
    health_changes,
    listed,
    registered,
    router,
)

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_a_failed_step_fails_its_request_alone_and_the_worker_serves_on(tiny_llama):
    poison = PoisonedStep()
    engine = make_engine(tiny_llama, logits_hook=poison, num_kv_blocks=32)
    held, bad, after = prompt_ids(40, 1), prompt_ids(50, 2), prompt_ids(30, 3)
    decode = ImportingDecode(make_engine(tiny_llama), hold_s=1.0)  # acks each transfer late
    decode.reservations.update({"res-held": (held, GREEDY), "res-after": (after, GREEDY)})

    async def main():
        async with cluster(engine, decode) as c:
            # A request past its step (its KV on the wire) while another one's step fails.
            transferring = c.prefill.Prefill(
                prefill_request("held", held, c.decode_address, "res-held", max_tokens=8),
                timeout=10,
            )
            assert (await transferring.read()).WhichOneof("frame") == "first_token"
            started = time.monotonic()
            request = prefill_request("bad", bad, c.decode_address, "res-bad", seed=POISON_SEED)
            failed = await status_of(run_prefill(c.prefill, request, timeout=10))
            failed_after = time.monotonic() - started
            done = await transferring.read()
            # The worker serves on: a request after the failure runs to its end.
            frames = await run_prefill(
                c.prefill, prefill_request("after", after, c.decode_address, "res-after")
            )
            await c.assert_idle()
            return failed, failed_after, done, frames

    (code, details), failed_after, done, frames = asyncio.run(main())
    assert code == grpc.StatusCode.INTERNAL
    assert details.startswith("the engine step computing request 'bad' failed (ref ")
    assert details.endswith(" in the prefill worker's log); the request was dropped")
    assert failed_after < 1.0  # at once, not at its deadline
    assert poison.num_failed == 1
    assert done.WhichOneof("frame") == "done" and done.done.kv_bytes > 0
    assert [f.WhichOneof("frame") for f in frames] == ["first_token", "done"]
    assert set(decode.decode_all()) == {"held", "after"}


def test_a_request_may_reuse_the_id_of_one_whose_step_failed(tiny_llama):
    engine = make_engine(tiny_llama, logits_hook=PoisonedStep(), num_kv_blocks=32)
    prompt = prompt_ids(40, 4)
    decode = ImportingDecode(make_engine(tiny_llama))
    decode.reservations["res-2"] = (prompt, GREEDY)

    async def main():
        async with cluster(engine, decode) as c:
            request = prefill_request("r", prompt, c.decode_address, "res-1", seed=POISON_SEED)
            failed = await status_of(run_prefill(c.prefill, request))
            frames = await run_prefill(
                c.prefill, prefill_request("r", prompt, c.decode_address, "res-2")
            )
            await c.assert_idle()
            return failed[0], [f.WhichOneof("frame") for f in frames]

    assert asyncio.run(main()) == (grpc.StatusCode.INTERNAL, ["first_token", "done"])


def broken_finish_step(self, *args) -> None:
    raise RuntimeError("a bug outside any step")


def test_a_dead_step_loop_fails_waiting_requests_and_refuses_new_ones(tiny_llama, monkeypatch):
    monkeypatch.setattr(PrefillWorker, "_finish_step", broken_finish_step)
    prompt = prompt_ids(40, 5)
    decode = ImportingDecode(make_engine(tiny_llama))
    decode.reservations["res-1"] = (prompt, GREEDY)

    async def main():
        async with cluster(make_engine(tiny_llama, num_kv_blocks=32), decode) as c:
            request = prefill_request("r1", prompt, c.decode_address)
            waiting = await status_of(run_prefill(c.prefill, request))
            died = await asyncio.wait_for(asyncio.shield(c.worker.died), 2)
            later = await status_of(run_prefill(c.prefill, prefill_request("r2", prompt, "x:1")))
            await c.assert_idle()
            return waiting, died, later

    waiting, died, later = asyncio.run(main())
    assert waiting == (
        grpc.StatusCode.UNAVAILABLE,
        "this prefill worker's engine loop stopped while 'r1' waited for it",
    )
    assert str(died) == "a bug outside any step"
    assert later == (
        grpc.StatusCode.UNAVAILABLE,
        "this prefill worker's engine loop has stopped; it is shutting down",
    )


def test_a_worker_whose_loop_died_turns_not_serving_leaves_the_router_and_exits(
    tiny_llama, monkeypatch
):
    """The wiring of ``python -m services.prefill``, run in this process."""
    monkeypatch.setattr(PrefillWorker, "_finish_step", broken_finish_step)
    # The probe's KV target is no registered decode worker: let it through to the engine.
    monkeypatch.setattr(prefill_main, "checked_by_router", lambda transport, *args: transport)
    prompt = prompt_ids(20, 6)

    async def probe(stub, seen: list[str]):
        (info,) = await registered(stub)
        watcher = asyncio.create_task(health_changes(info.address, seen))
        while not seen:
            await asyncio.sleep(0.01)
        channel = open_channel(info.address, RPC)
        request = prefill_request("r1", prompt, "127.0.0.1:1")
        got = await status_of(run_prefill(prefill_pb2_grpc.PrefillServiceStub(channel), request))
        await channel.close()
        await watcher  # until NOT_SERVING
        return info.worker_id, got

    async def main():
        async with router() as stub:
            args = parse_args(
                ["--model", str(tiny_llama), "--router", stub._address, "--num-kv-blocks", "16"]
                + ["--report-interval", "0.05", "--kv-transport", "grpc"]
            )
            seen: list[str] = []
            probing = asyncio.create_task(probe(stub, seen))
            with pytest.raises(SystemExit) as exit:
                await serve(args)
            worker_id, got = await probing
            return worker_id, got, exit.value.code, seen, await listed(stub)

    worker_id, got, code, seen, workers = asyncio.run(main())
    assert worker_id.startswith("prefill-")
    assert got[0] == grpc.StatusCode.UNAVAILABLE
    assert code == "prefill worker: the step loop died (RuntimeError('a bug outside any step'))"
    assert seen == ["SERVING", "NOT_SERVING"]
    assert workers == []  # deregistered: the router routes nothing more to it
