"""The router's request metrics (``RequestMetrics`` as the driver's observer) over the real
driver, gRPC servicer and HTTP API, against fake workers (grpc_fakes.py): every request ends in
exactly one outcome, cancelled ones (a gRPC cancel, an HTTP client gone, streamed or not)
included, with the tokens it delivered; an aborted request's TTFT is its real one."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx2
import pytest

from services.common.metrics import REQUEST_OUTCOMES, RequestMetrics
from services.router.openai_api import OpenAIApi
from services.router.openai_server import HttpServer
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2
from tests.router.grpc_fakes import cluster
from tests.router.test_generate import request, resumed_request, seconds, status_of
from tests.router.test_openai_api import LIMITS, MODEL, _take, completion


def sample(m: RequestMetrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def outcomes(m: RequestMetrics) -> dict[str, float]:
    """The outcomes counted so far (every one is exported, from 0)."""
    counts = {o: sample(m, "banaserve_router_requests_total", outcome=o) for o in REQUEST_OUTCOMES}
    return {o: n for o, n in counts.items() if n}


def tokens(m: RequestMetrics, kind: str) -> float:
    return sample(m, "banaserve_router_tokens_total", kind=kind)


async def until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def observed(**kwargs):
    """A fake cluster whose driver reports to a fresh ``RequestMetrics``: (cluster, metrics)."""

    class Observed:
        async def __aenter__(self):
            self._cm = cluster(**kwargs)
            c = await self._cm.__aenter__()
            c.driver.observer = self.metrics = RequestMetrics()
            return c, self.metrics

        async def __aexit__(self, *exc):
            return await self._cm.__aexit__(*exc)

    return Observed()


def test_a_grpc_call_cancelled_mid_stream_counts_cancelled_with_the_tokens_it_delivered():
    async def main():
        async with observed(hang_decode=True) as (c, m):
            call = c.stub.Generate(request(), timeout=5)
            kinds = [(await call.read()).WhichOneof("frame") for _ in range(3)]
            assert kinds == ["started", "delta", "delta"]
            call.cancel()
            await asyncio.wait_for(c.log.released.wait(), 3)
            await until(lambda: c.driver.num_running == 0 and outcomes(m))
            await asyncio.sleep(0.1)  # nothing more is counted for it
            assert outcomes(m) == {"cancelled": 1}
            assert (tokens(m, "prompt"), tokens(m, "completion")) == (20, 2)
            assert sample(m, "banaserve_router_kv_transfer_bytes_total") == 4096  # it moved
            assert sample(m, "banaserve_router_ttft_seconds_count") == 1
            assert sample(m, "banaserve_router_ttft_seconds_sum") > 0

    asyncio.run(main())


def test_an_aborted_request_records_its_real_ttft_and_tpot_by_the_documented_formula():
    async def main():
        async with observed(hang_decode=True) as (c, m):
            call = c.stub.Generate(request("victim"), timeout=5)
            for _ in range(3):  # started, P's token, D's first
                await call.read()
            await asyncio.sleep(0.05)  # the abort comes well after the last token
            await c.stub.Abort(router_pb2.AbortRequest(request_id="victim"), timeout=2)
            frame = await call.read()
            assert frame.finished.finish_reason == common_pb2.FINISH_REASON_ABORT
            t = frame.finished.timings
            ttft, total = seconds(t.ttft), seconds(t.total)
            # Its caller is told its TTFT (and prefill) too, not 0.
            assert 0 < ttft < total and t.kv_bytes == 4096
            assert outcomes(m) == {"abort": 1}
            assert sample(m, "banaserve_router_ttft_seconds_count") == 1
            assert sample(m, "banaserve_router_ttft_seconds_sum") == pytest.approx(ttft, abs=1e-6)
            # (e2e - ttft) / (2 tokens - 1), not e2e / (2 - 1).
            tpot = sample(m, "banaserve_router_tpot_seconds_sum")
            assert tpot == pytest.approx(total - ttft, abs=1e-6)
            assert (tokens(m, "prompt"), tokens(m, "completion")) == (20, 2)

    asyncio.run(main())


def test_a_request_aborted_before_its_first_token_observes_no_ttft():
    async def main():
        async with observed(decode=0, no_worker_wait_s=5.0) as (c, m):
            call = c.stub.Generate(request("early"), timeout=5)  # waits for a decode worker
            await until(lambda: c.driver.num_running == 1)
            c.driver.abort("early")
            frames = [f async for f in call]
            assert frames[-1].finished.finish_reason == common_pb2.FINISH_REASON_ABORT
            assert seconds(frames[-1].finished.timings.ttft) == 0
            assert outcomes(m) == {"abort": 1}
            assert sample(m, "banaserve_router_ttft_seconds_count") == 0
            assert sample(m, "banaserve_router_e2e_seconds_count") == 0
            assert (tokens(m, "prompt"), tokens(m, "completion")) == (20, 0)

    asyncio.run(main())


@pytest.mark.parametrize("resent_tokens", [[7], []], ids=["with-tokens", "before-any-token"])
def test_a_request_its_client_resends_counts_one_outcome_and_each_token_once(resent_tokens):
    """The client's stream broke on its side and it sent the request again (``take_over``): one
    request, one ``length``; the old call (ABORTED to its dead stream) counts no outcome of its
    own (it counted ``error`` before), and the prompt once."""

    async def main():
        async with observed(hang_decode=True) as (c, m):
            old = c.stub.Generate(request(), timeout=10)
            assert (await old.read()).WhichOneof("frame") == "started"
            assert (await old.read()).WhichOneof("frame") == "delta"  # token 7
            c.workers["d0"].hang_decode = False
            resend = resumed_request(resent_tokens)
            resend.resume = True
            frames = [frame async for frame in c.stub.Generate(resend, timeout=5)]
            assert frames[-1].finished.usage.num_completion_tokens == 4
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while True:  # d0's token 8 may have come before the resend
                    assert (await old.read()).WhichOneof("frame") == "delta"
            assert info.value.code() == grpc.StatusCode.ABORTED
            await until(lambda: c.driver.num_running == 0)
            await asyncio.sleep(0.1)
            assert outcomes(m) == {"length": 1}
            assert tokens(m, "prompt") == 20
            # The old call delivered token 7 (and maybe 8); the resend all it sent.
            delivered = sum(len(f.delta.token_ids) for f in frames if f.HasField("delta"))
            assert tokens(m, "completion") >= 1 + delivered

    asyncio.run(main())


def test_a_grpc_deadline_counts_error_not_cancelled():
    async def main():
        async with observed(hang_decode=True) as (c, m):
            error = await status_of(c.stub.Generate(request(), timeout=0.5))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(c.log.released.wait(), 3)
            await until(lambda: outcomes(m))
            assert outcomes(m) == {"error": 1}
            assert (tokens(m, "prompt"), tokens(m, "completion")) == (20, 2)

    asyncio.run(main())


def test_a_request_failed_after_its_worker_was_lost_counts_its_prompt_and_delivered_tokens():
    async def main():
        async with observed(max_resumes=0) as (c, m):
            c.workers["d0"].die_after_deltas = 1  # P's token 7, d0's 8, then d0 is gone
            error = await status_of(c.stub.Generate(request(), timeout=5))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            await until(lambda: outcomes(m))
            assert outcomes(m) == {"error": 1}
            assert (tokens(m, "prompt"), tokens(m, "completion")) == (20, 2)
            assert tokens(m, "cached") == 16  # as the prefill worker said
            assert sample(m, "banaserve_router_kv_transfer_bytes_total") == 4096
            assert sample(m, "banaserve_router_ttft_seconds_count") == 1

    asyncio.run(main())


def test_a_request_refused_by_the_driver_counts_refused_and_no_tokens():
    async def main():
        async with observed() as (c, m):
            c.driver.begin_drain()
            error = await status_of(c.stub.Generate(request(), timeout=5))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert outcomes(m) == {"refused": 1}
            assert (tokens(m, "prompt"), tokens(m, "completion")) == (0, 0)

    asyncio.run(main())


def test_finished_requests_count_their_finish_reason_once():
    async def main():
        async with observed() as (c, m):
            frames = [f async for f in c.stub.Generate(request(), timeout=5)]
            assert frames[-1].finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
            await asyncio.sleep(0.1)
            assert outcomes(m) == {"length": 1}
            assert (tokens(m, "prompt"), tokens(m, "completion")) == (20, 4)

    asyncio.run(main())


async def _http(c):
    api = OpenAIApi(c.driver, MODEL, LIMITS, clock=lambda: 0.0)
    http = HttpServer(api.app, "127.0.0.1", 0, grace_s=0.1, on_stop=api.close)
    await http.start()
    return http


def test_an_http_streaming_client_that_disconnects_counts_cancelled_with_its_tokens():
    async def main():
        async with observed(hang_decode=True) as (c, m):
            http = await _http(c)
            try:
                async with httpx2.AsyncClient(base_url=f"http://{http.address}", timeout=10) as h:
                    body = completion(stream=True)
                    async with h.stream("POST", "/v1/completions", json=body) as r:
                        data = [line async for line in _take(r.aiter_lines(), 3)]
                        assert [line[:6] for line in data] == ["data: ", "", "data: "]
                await asyncio.wait_for(c.log.released.wait(), 10)
                await until(lambda: c.driver.num_running == 0 and outcomes(m))
                await asyncio.sleep(0.1)
                assert outcomes(m) == {"cancelled": 1}
                assert (tokens(m, "prompt"), tokens(m, "completion")) == (20, 2)
            finally:
                await http.stop()

    asyncio.run(main())


def test_an_http_client_that_disconnects_while_waiting_for_its_body_counts_cancelled():
    async def main():
        async with observed(hang_decode=True) as (c, m):
            http = await _http(c)
            try:
                host, port = http.address.rsplit(":", 1)
                reader, writer = await asyncio.open_connection(host, int(port))
                body = json.dumps(completion()).encode()
                head = (
                    f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                )
                writer.write(head.encode() + body)
                await until(lambda: any(call[0] == "stream" for call in c.log.calls))
                writer.close()
                await asyncio.wait_for(c.log.released.wait(), 10)
                await until(lambda: c.driver.num_running == 0 and outcomes(m))
                await asyncio.sleep(0.1)
                assert outcomes(m) == {"cancelled": 1}
                assert tokens(m, "prompt") == 20
                assert tokens(m, "completion") in (1, 2)  # P's token, D's if it came first
            finally:
                await http.stop()

    asyncio.run(main())


def test_requests_the_front_ends_refuse_count_refused():
    """A bad prompt or bad sampling parameters, refused by the gRPC servicer's or the HTTP
    API's own checks before the driver is called, count ``refused`` (they counted nothing)."""

    async def main():
        async with observed() as (c, m):
            error = await status_of(c.stub.Generate(request(temperature=-1.0), timeout=5))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert outcomes(m) == {"refused": 1}
            http = await _http(c)
            try:
                async with httpx2.AsyncClient(base_url=f"http://{http.address}", timeout=10) as h:
                    reply = await h.post("/v1/completions", json=completion(temperature=-1))
                    assert reply.status_code == 400
            finally:
                await http.stop()
            assert outcomes(m) == {"refused": 2}
            assert (tokens(m, "prompt"), tokens(m, "completion")) == (0, 0)

    asyncio.run(main())
