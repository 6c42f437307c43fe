"""Fuzzing RouterService: Generate (a server stream, with the request's deadline drawn too),
Abort, ListWorkers and ReportLoad (a client stream of registration and load frames)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2
from tests.fuzz import hints
from tests.fuzz.cluster import PROMPTS, FuzzCluster
from tests.fuzz.conftest import MARKS, fuzz_settings
from tests.fuzz.harness import calls, methods

pytestmark = MARKS

# What each method may answer besides OK and INVALID_ARGUMENT (router.proto, docs/services.md).
ROUTER = methods(
    router_pb2.DESCRIPTOR.services_by_name["RouterService"],
    "router",
    {
        "Generate": {
            "OUT_OF_RANGE",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "RESOURCE_EXHAUSTED",
            "UNAVAILABLE",
        },
        "Abort": {"NOT_FOUND"},
        "ListWorkers": set(),
        "ReportLoad": {"ALREADY_EXISTS"},
    },
    deadline_ok=("Generate",),
)


def seeds(cluster: FuzzCluster) -> dict[str, list]:
    """Valid requests, which the walker also breaks a field at a time."""
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    sampled = common_pb2.SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=3)
    worker = router_pb2.WorkerInfo(
        worker_id="fuzz-worker",
        address="127.0.0.1:1",
        role=common_pb2.WORKER_ROLE_DECODE,
        model="tiny-llama",
        fingerprint=cluster.model.fingerprint,
        block_size=cluster.model.block_size,
        num_kv_blocks=64,
        max_model_len=2048,
    )
    load = router_pb2.LoadReport(num_kv_blocks_free=64, busy_fraction=0.5)
    return {
        "Generate": [
            router_pb2.GenerateRequest(
                token_ids=common_pb2.TokenIds(ids=PROMPTS[0]), sampling=sampling
            ),
            router_pb2.GenerateRequest(text="Hello there", sampling=sampling),
            router_pb2.GenerateRequest(
                request_id="fuzz-0", model="tiny-llama", text="1 2 3", chat=True, sampling=sampled
            ),
        ],
        "Abort": [router_pb2.AbortRequest(request_id="fuzz-0")],
        "ReportLoad": [
            router_pb2.ReportLoadRequest(worker=worker),
            router_pb2.ReportLoadRequest(load=load),
        ],
    }


@pytest.fixture(scope="module")
def router_calls(fuzz_cluster):
    h, s = hints.router(fuzz_cluster), seeds(fuzz_cluster)
    return {m.name: calls(m, h, s.get(m.name, ())) for m in ROUTER}


@fuzz_settings("router")
@given(data=st.data())
def test_fuzz_every_router_rpc(fuzz_cluster, fuzzer, router_calls, data):
    method = data.draw(st.sampled_from(ROUTER), label="method")
    fuzz_cluster.fuzz(fuzzer, "router", method, data.draw(router_calls[method.name], label="call"))


def test_router_serves_and_holds_nothing_after_the_fuzz(fuzz_cluster):
    fuzz_cluster.assert_healthy()
    fuzz_cluster.release_all_and_assert_no_leaks()
