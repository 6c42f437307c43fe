"""Every client-controlled size on the router's API is bounded before any work (issue 8, item
4): a bad id, model name, stop condition or prompt fails with a clear status before the first
frame and before any worker is called; the limits are those of services/common/limits.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2
from tests.router.grpc_fakes import cluster
from tests.router.test_generate import request
from tests.router.test_report_load import load_frame, worker_frame, workers

C = grpc.StatusCode
MB = 1 << 20


async def first_error(call) -> tuple[C, str, int]:
    """(code, details, frames received before the error)."""
    frames = 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            frames += 1
    return info.value.code(), info.value.details(), frames


def sampling(**fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=4, **fields)


BAD_REQUESTS = [
    (
        request("r" * MB),
        "request_id is 1048576 characters long; at most 128 are allowed",
    ),
    (
        request("r" * 129),
        "request_id is 129 characters long; at most 128 are allowed",
    ),
    (
        request("has space"),
        "request_id 'has space' must be printable ASCII without spaces or control characters",
    ),
    (
        request("tab\there"),
        "request_id 'tab\\there' must be printable ASCII without spaces or control characters",
    ),
    (
        request("é"),
        "request_id 'é' must be printable ASCII without spaces or control characters",
    ),
    (
        router_pb2.GenerateRequest(
            model="m" * MB, token_ids=common_pb2.TokenIds(ids=[1]), sampling=sampling()
        ),
        "model is longer than 256 bytes",
    ),
    (
        router_pb2.GenerateRequest(
            token_ids=common_pb2.TokenIds(ids=[1]), sampling=sampling(stop=["x"] * 17)
        ),
        "17 stop strings; at most 16 are allowed",
    ),
    (
        router_pb2.GenerateRequest(
            token_ids=common_pb2.TokenIds(ids=[1]), sampling=sampling(stop=["ok", "é" * 129])
        ),
        "stop string 1 is longer than 256 bytes",
    ),
    (
        router_pb2.GenerateRequest(
            token_ids=common_pb2.TokenIds(ids=[1]),
            sampling=sampling(stop_token_ids=list(range(257))),
        ),
        "257 stop token ids; at most 256 are allowed",
    ),
    # Session 40's probe: chat with token ids was served without any template.
    (
        router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[1]), chat=True),
        "chat applies the chat template to text; send text",
    ),
]


@pytest.mark.parametrize(("message", "details"), BAD_REQUESTS)
def test_oversized_or_malformed_fields_fail_before_any_frame_or_worker_call(message, details):
    async def main():
        async with cluster() as c:
            call = c.stub.Generate(message, timeout=5)
            assert await first_error(call) == (C.INVALID_ARGUMENT, details, 0)
            assert c.log.calls == [] and c.driver.num_running == 0
            # The router serves on, and ids at the bound are fine.
            frames = [f async for f in c.stub.Generate(request("r" * 128), timeout=5)]
            assert frames[0].started.request_id == "r" * 128

    asyncio.run(main())


@pytest.mark.parametrize(
    ("request_id", "details"),
    [
        ("a" * MB, "request_id is 1048576 characters long; at most 128 are allowed"),
        ("", "request_id is empty"),  # no request has it (session 40's probe: NOT_FOUND)
    ],
)
def test_abort_with_an_oversized_or_empty_id_is_invalid_argument(request_id, details):
    async def main():
        async with cluster() as c:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.stub.Abort(router_pb2.AbortRequest(request_id=request_id), timeout=5)
            assert (info.value.code(), info.value.details()) == (C.INVALID_ARGUMENT, details)

    asyncio.run(main())


def test_a_registration_with_an_oversized_worker_id_or_address_is_refused():
    async def main():
        async with cluster(prefill=0, decode=0) as c:
            for frame, details in (
                (
                    worker_frame(worker_id="w" * 200),
                    "worker_id is 200 characters long; at most 128 are allowed",
                ),
                (worker_frame(model="m" * 300), "model is longer than 256 bytes"),
            ):
                call = c.stub.ReportLoad(timeout=5)
                await call.write(frame)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert (info.value.code(), info.value.details()) == (C.INVALID_ARGUMENT, details)
            assert await workers(c.stub) == {}

    asyncio.run(main())


async def worker_with_context(c, max_model_len: int):
    """Worker d9 registered through ReportLoad with that context: its open report call."""
    report = c.stub.ReportLoad(timeout=10)
    frame = worker_frame()
    frame.worker.max_model_len = max_model_len
    await report.write(frame)
    await report.write(load_frame())
    while "d9" not in await workers(c.stub):
        await asyncio.sleep(0.01)
    return report


def test_token_ids_beyond_every_registered_workers_context_are_out_of_range_at_once():
    async def main():
        async with cluster() as c:
            # A registered decode worker with a context of 100 (and fewer free blocks than d0,
            # which serves the request that fits).
            report = await worker_with_context(c, 100)
            call = c.stub.Generate(request("long", prompt=[1] * 100), timeout=5)
            assert await first_error(call) == (
                C.OUT_OF_RANGE,
                "prompt has 100 tokens; at most 99 are accepted (a context of 100 tokens)",
                0,
            )
            assert c.log.calls == []
            frames = [f async for f in c.stub.Generate(request("fits", prompt=[1] * 99))]
            assert frames[0].started.num_prompt_tokens == 99
            await report.done_writing()
            await report

    asyncio.run(main())


def test_token_ids_outside_the_models_vocabulary_are_refused_before_any_worker_call():
    """Session 20's probe: an out-of-vocabulary id reached the decode worker's reservation,
    whose refusal named the worker; the router knows the served model's vocabulary."""

    async def main():
        async with cluster(vocab_size=100) as c:
            call = c.stub.Generate(request("oov", prompt=[5, 99, 100, 7]), timeout=5)
            assert await first_error(call) == (
                C.INVALID_ARGUMENT,
                "prompt: token id 100 is outside the model's vocabulary [0, 100)",
                0,
            )
            assert c.log.calls == []
            frames = [f async for f in c.stub.Generate(request("in", prompt=[5, 99]))]
            assert frames[0].started.num_prompt_tokens == 2

    asyncio.run(main())


def test_resume_tokens_past_the_context_are_refused_before_any_worker_call():
    async def main():
        async with cluster() as c:
            report = await worker_with_context(c, 100)
            message = request("long", prompt=[1] * 90, max_tokens=20)
            message.resume_output_token_ids.extend([2] * 11)
            assert await first_error(c.stub.Generate(message, timeout=5)) == (
                C.INVALID_ARGUMENT,
                "resume_output_token_ids: the prompt (90 tokens) and these 11 pass the model's "
                "context of 100",
                0,
            )
            assert c.log.calls == []
            await report.done_writing()
            await report

    asyncio.run(main())
