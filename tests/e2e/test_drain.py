"""End to end, real processes (the router, prefill and decode workers on tiny-llama): a service
told to stop (SIGTERM) drains (``--drain-timeout``, docs/services.md "Stopping").

- Requests in flight go on to their last token with the in-process engine's tokens, over gRPC
  and over the OpenAI API's stream, while the router refuses new ones (UNAVAILABLE); it exits 0
  once they are done, well before its drain's end. Before, it gave them 5 s and cancelled
  them, and ``banaserve up`` stopped the workers under them first.
- Requests still running when the drain's time is up fail UNAVAILABLE, saying the router is
  shutting down (not that a worker was lost), and no worker holds anything afterwards.
- A decode worker told to stop gets nothing new (its reports say it drains) and finishes the
  stream it has without a resume.
- A second SIGTERM stops the router at once: what is left fails UNAVAILABLE, saying so.
- ``banaserve up`` stops the router before the workers, so a request in flight at Ctrl-C
  finishes; a second Ctrl-C kills what still runs.

The prefill worker is frozen (SIGSTOP) for a second or two to hold requests in flight (before
their first token: the router renews their reservations meanwhile), less than the channels'
keepalive takes to find it frozen.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx2
import pytest

from services.common.types import SamplingParams
from services.launcher import ClusterSpec
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests.clusters import running_cluster, wait_for
from tests.e2e.test_overload import held
from tests.e2e.test_up import children, cmdline, gone, start_up
from tests.engine.helpers import make_engine

pytestmark = pytest.mark.e2e

C = grpc.StatusCode
PROMPT = [5, 17, 301, 2048, 77, 9, 1203, 44, 3999, 12]
MAX_TOKENS = 16


def spec_with(banaserve_home, drain_s: float) -> ClusterSpec:
    return ClusterSpec(
        num_kv_blocks=256,
        kv_transport="tcp",
        extra_env={"BANASERVE_HOME": str(banaserve_home)},
        service_args={"router": ("--drain-timeout", str(drain_s))},
    )


def greedy_request(max_tokens: int = MAX_TOKENS) -> router_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=PROMPT), sampling=sampling)


def generate(address: str) -> tuple[C, list[int], str]:
    """One greedy request over a raw stub (no client library: nothing resumes it)."""
    tokens: list[int] = []
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        try:
            for frame in stub.Generate(greedy_request(), timeout=60):
                if frame.HasField("delta"):
                    tokens += frame.delta.token_ids
            return C.OK, tokens, ""
        except grpc.RpcError as exc:
            return exc.code(), tokens, exc.details()


def stream_http(url: str) -> tuple[int, list[dict]]:
    """The OpenAI API's streamed completion of PROMPT: its status and every data event, parsed
    (a request that fails before its first token gets its status and the error body alone)."""
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx2.stream("POST", url + "/completions", json=body, timeout=60) as reply:
        if reply.status_code != 200:
            return reply.status_code, [json.loads(reply.read())]
        events = [
            json.loads(line[len("data: ") :])
            for line in reply.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    return 200, events


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return make_engine(tiny_llama).generate([PROMPT], [params])[0].token_ids


def frozen_with_requests(cluster, pool, count: int):
    """``count`` gRPC requests and one HTTP stream in flight, held by the frozen prefill
    worker (the caller sends it SIGCONT)."""
    os.kill(cluster.child("prefill-0").proc.pid, signal.SIGSTOP)
    calls = [pool.submit(generate, cluster.router.address) for _ in range(count)]
    url = f"http://{cluster.router.http_address}/v1"
    streamed = pool.submit(stream_http, url)
    # Routed and reserved on the decode worker; their prompts wait on the prefill worker. (A
    # fixed 0.5 s once left the HTTP stream still connecting under load: the router's
    # SIGTERM then refused its connection.)
    wait_for(lambda: reservations(cluster) == count + 1, "every request reserved", 15)
    assert not any(c.done() for c in calls) and not streamed.done()
    return calls, streamed


def reservations(cluster) -> int:
    """The decode worker's reservations (the prefill worker is frozen: not asked)."""
    with grpc.insecure_channel(cluster.child("decode-0").address) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        return len(stub.Stats(decode_pb2.DecodeServiceStatsRequest(), timeout=5).reservations)


def test_a_stopping_router_finishes_the_requests_it_has_and_refuses_new_ones(
    banaserve_home, tiny_llama, tmp_path, expected
):
    with running_cluster(spec_with(banaserve_home, 60), tmp_path / "cluster.log") as cluster:
        router = cluster.router.proc
        with ThreadPoolExecutor(4) as pool:
            calls, streamed = frozen_with_requests(cluster, pool, 2)
            router.send_signal(signal.SIGTERM)
            try:
                time.sleep(0.3)
                code, _, details = generate(cluster.router.address)
                assert code is C.UNAVAILABLE, (code, details)
                # The HTTP API too, on a new connection: 503 with Retry-After, not a refused
                # connection (its listener closed at the signal: session 45's probe).
                http = f"http://{cluster.router.http_address}"
                body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4}
                refused = httpx2.post(http + "/v1/completions", json=body, timeout=10)
                assert refused.status_code == 503 and "Retry-After" in refused.headers
                assert "the router is shutting down" in refused.json()["error"]["message"]
                ready = httpx2.get(http + "/ready", timeout=10)
                assert (ready.status_code, ready.json()["status"]) == (503, "draining")
            finally:
                os.kill(cluster.child("prefill-0").proc.pid, signal.SIGCONT)
            started = time.monotonic()
            for call in calls:
                outcome = call.result(timeout=60)
                assert outcome == (C.OK, expected, ""), outcome[2]
            status, events = streamed.result(timeout=60)
        assert status == 200 and "error" not in events[-1], events[-1]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events) > 1
        # Done: the router exits now, not at its drain's end (60 s).
        assert router.wait(timeout=15) == 0
        assert time.monotonic() - started < 15
        wait_for(lambda: not any(held(cluster).values()), "idle workers", 15)


def test_requests_left_when_the_drain_ends_fail_unavailable_and_nothing_is_held(
    banaserve_home, tiny_llama, tmp_path
):
    with running_cluster(spec_with(banaserve_home, 1), tmp_path / "cluster.log") as cluster:
        router = cluster.router.proc
        with ThreadPoolExecutor(4) as pool:
            calls, streamed = frozen_with_requests(cluster, pool, 2)
            router.send_signal(signal.SIGTERM)
            try:
                outcomes = [call.result(timeout=20) for call in calls]
                status, [error] = streamed.result(timeout=20)
            finally:
                os.kill(cluster.child("prefill-0").proc.pid, signal.SIGCONT)
            assert router.wait(timeout=15) == 0
        for code, _, details in outcomes:
            assert code is C.UNAVAILABLE, (code, details)
            assert "the router is shutting down" in details and "drain (1s)" in details, details
        # Failed before its first token: the status says it (after one, the stream's last
        # event would).
        error = error["error"]
        assert status == 503 and error["code"] == "unavailable", (status, error)
        assert "the router is shutting down" in error["message"], error
        wait_for(lambda: not any(held(cluster).values()), "idle workers", 15)


def test_a_second_signal_stops_the_router_at_once_failing_what_is_left(
    banaserve_home, tiny_llama, tmp_path
):
    """Its drain is 60 s and its requests are held: a second SIGTERM fails them at once, with
    why, and it exits 0 within seconds, nothing held on the workers."""
    with running_cluster(spec_with(banaserve_home, 60), tmp_path / "cluster.log") as cluster:
        router = cluster.router.proc
        with ThreadPoolExecutor(4) as pool:
            calls, streamed = frozen_with_requests(cluster, pool, 2)
            router.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert not any(c.done() for c in calls)  # draining: they wait
            again = time.monotonic()
            router.send_signal(signal.SIGTERM)
            try:
                outcomes = [call.result(timeout=20) for call in calls]
                status, [error] = streamed.result(timeout=20)
                code = router.wait(timeout=20)
            finally:
                os.kill(cluster.child("prefill-0").proc.pid, signal.SIGCONT)
            stopped_s = time.monotonic() - again
        assert code == 0 and stopped_s < 8, (code, stopped_s)
        for call_code, _, details in outcomes:
            assert call_code is C.UNAVAILABLE, (call_code, details)
            assert "the router was stopped at once (a second signal)" in details, details
        assert status == 503 and "stopped at once" in error["error"]["message"], error
        wait_for(lambda: not any(held(cluster).values()), "idle workers", 15)


def test_a_stopping_decode_worker_finishes_its_stream_and_is_sent_nothing_new(
    banaserve_home, tiny_llama, tmp_path
):
    """1 prefill + 2 decode workers. The decode worker streaming a long request is sent SIGTERM:
    its reports say it drains, so the next requests all go to the other one (before, the router
    kept routing to it, each such request failing there and routed again); its stream goes on
    to the last token without a resume, and it exits 0 once that is done."""
    spec = ClusterSpec(
        num_decode=2,
        num_kvstore=0,
        num_kv_blocks=256,
        kv_transport="tcp",
        extra_env={"BANASERVE_HOME": str(banaserve_home)},
    )
    log = tmp_path / "cluster.log"
    with running_cluster(spec, log) as cluster:
        with grpc.insecure_channel(cluster.router.address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            stream = stub.Generate(greedy_request(1500), timeout=120)
            worker_id = next(stream).started.decode_worker_id
            num_tokens = len(next(stream).delta.token_ids)
            draining = cluster.child(worker_id)  # `up` registers each worker under its name
            draining.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # its next report (every 0.1 s) says it drains
            with ThreadPoolExecutor(6) as pool:
                short = list(pool.map(lambda _: decoded_on(cluster.router.address), range(6)))
            for frame in stream:
                if frame.HasField("delta"):
                    num_tokens += len(frame.delta.token_ids)
        assert num_tokens == 1500
        others = {c.name for c in cluster.children if c.name.startswith("decode")} - {draining.name}
        assert set(short) == others
        assert draining.proc.wait(timeout=30) == 0
    assert "lost worker" not in log.read_text()


def decoded_on(address: str) -> str:
    """The decode worker a short request was routed to; its call fails the test if it fails."""
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        frames = list(stub.Generate(greedy_request(4), timeout=60))
    return frames[0].started.decode_worker_id


@contextlib.contextmanager
def up_with_a_frozen_request(home):
    """``banaserve up`` (tiny-llama, 1P1D, no store) with one request in flight on its frozen
    prefill worker: the process, the prefill worker's pid, the request's future. Afterwards the
    prefill worker is let go (killed if the test's second Ctrl-C left it) and up is gone."""
    up, lines = start_up(home, "--kvstore", "0")
    router = next(line.split()[1] for line in lines if line.startswith("router "))
    [prefill] = [pid for pid in children(up.pid) if "services.prefill" in cmdline(pid)]
    os.kill(prefill, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(generate, router)
            time.sleep(0.5)
            try:
                yield up, prefill, call
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(prefill, signal.SIGCONT)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def test_up_stops_the_router_first_and_a_request_in_flight_completes(banaserve_home, tiny_llama):
    """``banaserve up``'s Ctrl-C with a request in flight: the router drains while the workers
    still serve (before, the workers stopped first and the request failed, its worker lost),
    the request completes, and up exits 0."""
    with up_with_a_frozen_request(banaserve_home) as (up, prefill, call):
        up.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert call.running()
        os.kill(prefill, signal.SIGCONT)
        code, tokens, details = call.result(timeout=60)
        assert (code, len(tokens)) == (C.OK, MAX_TOKENS), details
        assert up.wait(timeout=60) == 0
        assert "requests in flight get up to 30s to finish" in up.stderr.read()


def test_a_second_ctrl_c_stops_up_at_once(banaserve_home, tiny_llama):
    """The router would drain for 30 s (its request's prefill worker stays frozen); a second
    Ctrl-C kills what still runs: up exits 130 within seconds, every service gone."""
    with up_with_a_frozen_request(banaserve_home) as (up, prefill, call):
        kids = children(up.pid)
        up.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert up.poll() is None
        started = time.monotonic()
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=15) == 130
        assert time.monotonic() - started < 10
        assert "stopped at once" in up.stderr.read()
        assert all(gone(pid) for pid in kids)
        code, _, _ = call.result(timeout=30)
        assert code is C.UNAVAILABLE
