"""End to end, real processes (router + 1 prefill + 1 decode on tiny-llama, no KV store): the
cases an independent probe found (issue 8), and a seeded fuzz of Generate's sampling fields.

- item 1: extreme sampling values (temperature=1e-300, top_p=1e-300) once stopped the prefill
  worker for good; now they complete, and the worker serves on;
- item 3: reusing a request id right after its request timed out gave INTERNAL about half the
  time; now the new request succeeds;
- item 5: the usage after Abort said 0 completion tokens; now it counts what was delivered;
- the fuzz draws every float field from all doubles (finite and not) and every int field from
  its whole proto range: each request completes, or fails INVALID_ARGUMENT / OUT_OF_RANGE, in
  seconds; then a greedy request is served exactly and no worker holds a KV block.

The workers get 8 KV blocks each: a 128-token context, so a request asking for 2^31 tokens
finishes (LENGTH) within a second.
"""

from __future__ import annotations

import math
import random
import time

import grpc
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from services.client.client import BanaServeClient, BanaServeClientError
from services.common.types import SamplingParams
from services.launcher import ClusterSpec, LocalCluster
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests import raw_grpc
from tests.engine.helpers import make_engine

pytestmark = pytest.mark.e2e

NUM_KV_BLOCKS = 8
CONTEXT = NUM_KV_BLOCKS * 16
PROMPT = [5, 17, 301, 2048, 77, 9, 1203, 44, 3999, 12]
# Each field's whole type, half the time narrowed to where valid values lie (so about a third
# of the requests are valid and run, the rest exercise the checks).
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
DOUBLES = st.floats()  # every double: NaN, +-inf, +-0.0, subnormals and the huge included
TEMPERATURES = st.one_of(DOUBLES, st.floats(0, 2))
TOP_PS = st.one_of(DOUBLES, st.floats(0, 1))
TOP_KS = st.one_of(INT32, st.integers(0, 64))
MAX_TOKENS = st.one_of(INT32, st.integers(1, 32))
REJECTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
FINISHED = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)


@pytest.fixture(scope="module")
def cluster(banaserve_home, tiny_llama, tmp_path_factory):
    spec = ClusterSpec(
        num_kv_blocks=NUM_KV_BLOCKS,
        num_kvstore=0,
        extra_env={"BANASERVE_HOME": str(banaserve_home)},
    )
    with open(tmp_path_factory.mktemp("logs") / "cluster.log", "w") as log:
        cluster = LocalCluster(spec, log)
        cluster.start()
        channel = grpc.insecure_channel(cluster.router.address)
        try:
            yield cluster, router_pb2_grpc.RouterServiceStub(channel)
        finally:
            channel.close()
            codes = cluster.stop()
    assert set(codes.values()) == {0}, f"services exited with {codes}"


def generate(stub, request_id: str = "", timeout: float = 20.0, prompt=PROMPT, **sampling):
    """(status, finished frame or the error's details, tokens delivered)."""
    message = router_pb2.GenerateRequest(
        request_id=request_id,
        token_ids=common_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(**sampling),
    )
    tokens: list[int] = []
    try:
        for frame in stub.Generate(message, timeout=timeout):
            tokens += frame.delta.token_ids
            if frame.HasField("finished"):
                return grpc.StatusCode.OK, frame.finished, tokens
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), tokens
    raise AssertionError("the stream ended without a finished frame")


def held_blocks(cluster: LocalCluster) -> tuple[int, int, int]:
    """(decode blocks used, decode reservations open, prefill blocks used)."""
    with grpc.insecure_channel(cluster.child("decode-0").address) as ch:
        d = decode_pb2_grpc.DecodeServiceStub(ch).Stats(decode_pb2.DecodeServiceStatsRequest())
    with grpc.insecure_channel(cluster.child("prefill-0").address) as ch:
        p = prefill_pb2_grpc.PrefillServiceStub(ch).Stats(prefill_pb2.PrefillServiceStatsRequest())
    return d.kv.num_blocks_used, len(d.reservations), p.kv.num_blocks_used


def assert_nothing_held(cluster: LocalCluster, within_s: float = 5.0) -> None:
    """Frees after a cancel or deadline are asynchronous: polled, bounded."""
    deadline = time.monotonic() + within_s
    while (held := held_blocks(cluster)) != (0, 0, 0):
        assert time.monotonic() < deadline, held
        time.sleep(0.05)


def assert_greedy_served_exactly(stub, tiny_llama) -> None:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    (expected,) = make_engine(tiny_llama).generate([PROMPT], params)
    code, finished, tokens = generate(stub, temperature=0, max_tokens=8, ignore_eos=True)
    assert code == grpc.StatusCode.OK, finished
    assert tokens == expected.token_ids
    assert finished.usage.num_completion_tokens == 8


def test_vanishing_temperature_or_top_p_completes_and_the_workers_serve_on(cluster, tiny_llama):
    c, stub = cluster
    for sampling in (dict(temperature=1e-300), dict(temperature=1.0, top_p=1e-300)):
        started = time.monotonic()
        code, finished, tokens = generate(stub, max_tokens=6, ignore_eos=True, **sampling)
        assert code == grpc.StatusCode.OK, (sampling, finished)
        assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH and len(tokens) == 6
        assert time.monotonic() - started < 10
    assert_greedy_served_exactly(stub, tiny_llama)
    assert_nothing_held(c)


def test_a_deadline_longer_than_grpc_can_hold_is_served(cluster, tiny_llama):
    """Session 37's probe: ``grpc-timeout: 99999999H`` (the most the header can say; what a Go
    or C++ client sends for "no deadline") failed DEADLINE_EXCEEDED at once, "ReserveKV on
    worker 'decode-0' failed": the router handed the deadline on to its workers, and grpc's
    Python client fails one past 2^63 ns of the epoch before sending. The client library given
    ``timeout_s=1e20`` failed the same way. Both are served now, their deadline a day
    (services/rpc/deadlines.py)."""
    c, stub = cluster
    sampling = dict(temperature=0.0, max_tokens=8, ignore_eos=True)
    (expected,) = make_engine(tiny_llama).generate([PROMPT], SamplingParams(**sampling))
    for i, header in enumerate(("99999999H", "9999999H")):  # 3.6e11 s, 3.6e10 s
        message = router_pb2.GenerateRequest(
            request_id=f"long-deadline-{i}",
            token_ids=common_pb2.TokenIds(ids=PROMPT),
            sampling=common_pb2.SamplingParams(**sampling),
        )
        reply = raw_grpc.call(
            c.router.address,
            "/banaserve.v1.RouterService/Generate",
            message.SerializeToString(),
            [("grpc-timeout", header)],
            timeout_s=30,
        )
        assert (reply.status, reply.message) == (0, ""), header
        frames = [router_pb2.GenerateResponse.FromString(m) for m in reply.messages]
        assert [t for f in frames for t in f.delta.token_ids] == expected.token_ids, header
    with BanaServeClient(c.router.address) as client:
        for timeout_s in (1e20, math.inf):
            result = client.complete(PROMPT, timeout_s=timeout_s, **sampling)
            assert list(result.token_ids) == expected.token_ids, timeout_s
        with pytest.raises(BanaServeClientError, match="timeout_s must be a number of seconds"):
            client.complete(PROMPT, timeout_s=math.nan, **sampling)
        # The calls that are not a generation take the same deadlines: a long one is served,
        # NaN is refused as the caller's mistake (it was DEADLINE_EXCEEDED at once).
        assert len(client.list_workers(timeout_s=1e20)) == 2
        with pytest.raises(BanaServeClientError, match="no running request") as err:
            client.abort("no-such-request", timeout_s=1e20)  # reached the router
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        for call in (client.list_workers, lambda timeout_s: client.abort("x", timeout_s)):
            with pytest.raises(BanaServeClientError, match="timeout_s must be a number") as err:
                call(timeout_s=math.nan)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert_nothing_held(c)


def test_an_id_reused_right_after_its_request_timed_out_is_served(cluster):
    c, stub = cluster
    rng = random.Random(8)
    outcomes = []
    for trial in range(20):
        request_id = f"reuse-{trial}"
        deadline = rng.uniform(0.02, 0.3)
        first = generate(stub, request_id, deadline, max_tokens=110, ignore_eos=True)
        again = generate(stub, request_id, 20, temperature=0, max_tokens=4, ignore_eos=True)
        outcomes.append((first[0], again[0], len(again[2])))
    assert {o[0] for o in outcomes} <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK}
    assert [o[1:] for o in outcomes] == [(grpc.StatusCode.OK, 4)] * 20, outcomes
    assert_nothing_held(c)


def test_abort_reports_the_tokens_delivered(cluster):
    c, stub = cluster
    message = router_pb2.GenerateRequest(
        request_id="to-abort",
        token_ids=common_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
    )
    delivered, finished = 0, None
    for frame in stub.Generate(message, timeout=20):
        delivered += len(frame.delta.token_ids)
        if delivered >= 10 and finished is None:
            stub.Abort(router_pb2.AbortRequest(request_id="to-abort"), timeout=5)
            finished = False
        if frame.HasField("finished"):
            finished = frame.finished
    assert finished.finish_reason == common_pb2.FINISH_REASON_ABORT
    assert 10 <= delivered < 100
    assert finished.usage.num_completion_tokens == delivered
    assert_nothing_held(c)


def sampling_messages() -> st.SearchStrategy[dict]:
    """Keyword arguments of a SamplingParams message: optional fields absent or set."""
    return st.fixed_dictionaries(
        {"top_k": TOP_KS, "ignore_eos": st.booleans()},
        optional={
            "temperature": TEMPERATURES,
            "top_p": TOP_PS,
            "seed": UINT64,
            "max_tokens": MAX_TOKENS,
            "stop_token_ids": st.lists(UINT32, max_size=3),
            "stop": st.lists(st.text(max_size=3), max_size=2),
            "detokenize": st.booleans(),
        },
    )


def accepted(s: dict) -> bool:
    """What common.proto documents as valid, written out independently of the code."""
    temperature, top_p = s.get("temperature", 1.0), s.get("top_p", 1.0)
    return (
        math.isfinite(temperature)
        and temperature >= 0
        and 0 < top_p <= 1
        and s["top_k"] >= 0
        and s.get("max_tokens", 16) > 0
        and all(s.get("stop", []))
        and (s.get("detokenize", True) or not s.get("stop"))
    )


EXTREMES = (
    [
        dict(top_k=0, ignore_eos=True, temperature=t)
        for t in (1e-300, 5e-324, -0.0, 1.7976931348623157e308, math.nan, math.inf, -math.inf)
    ]
    + [
        dict(top_k=0, ignore_eos=True, temperature=1.0, top_p=p)
        for p in (1e-300, 5e-324, -0.0, 1.0, math.nan, math.inf)
    ]
    + [
        dict(top_k=2**31 - 1, ignore_eos=True, max_tokens=2**31 - 1, seed=2**64 - 1),
        dict(top_k=-(2**31), ignore_eos=False, max_tokens=-(2**31), seed=0),
        dict(top_k=1, ignore_eos=True, max_tokens=0, stop_token_ids=[2**32 - 1]),
    ]
)


def test_fuzzed_sampling_fields_complete_or_are_rejected_then_nothing_is_held(cluster, tiny_llama):
    c, stub = cluster
    seen: list[str] = []

    @settings(
        max_examples=150,
        derandomize=True,  # seeded: the same examples on every run
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # shrinking would take minutes on a cluster
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(sampling=sampling_messages())
    def one(sampling: dict) -> None:
        started = time.monotonic()
        code, finished, tokens = generate(stub, **sampling)
        elapsed = time.monotonic() - started
        seen.append("ok" if code == grpc.StatusCode.OK else "rejected")
        assert elapsed < 10, (sampling, elapsed)
        if not accepted(sampling):
            assert code in REJECTED, (sampling, code, finished)
            return
        assert code == grpc.StatusCode.OK, (sampling, code, finished)
        assert finished.finish_reason in FINISHED
        assert 1 <= len(tokens) <= min(sampling.get("max_tokens", 16), CONTEXT - len(PROMPT))
        assert finished.usage.num_completion_tokens == len(tokens)

    for extreme in reversed(EXTREMES):
        one = example(sampling=extreme)(one)
    one()
    assert seen.count("ok") > 30 and seen.count("rejected") > 30  # both kinds exercised
    assert_greedy_served_exactly(stub, tiny_llama)
    assert_nothing_held(c)
