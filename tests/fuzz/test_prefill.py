"""Fuzzing PrefillService: Prefill (a server stream: the request's deadline and an early cancel
are drawn too) and Stats. Half the inputs are the descriptor walker's alone; half prefill into a
fresh reservation on the decode worker as the router would, with up to three fields of the
request (its id, prompt, sampling, any part of the target) broken."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.rpc.gen.banaserve.v1 import common_pb2, kvstore_pb2, prefill_pb2
from tests.fuzz import hints
from tests.fuzz.cluster import GREEDY, PROMPTS
from tests.fuzz.conftest import MARKS, fuzz_settings
from tests.fuzz.harness import DEADLINES, Call, calls, methods
from tests.fuzz.strategies import edited, edits

pytestmark = MARKS

# Besides OK and INVALID_ARGUMENT (prefill.proto): a bad request, a prompt that never fits, a
# target that cannot be reached, a target the router never registered (PERMISSION_DENIED,
# docs/security.md "KV targets"), and the target's own answer to the KV (decode.proto:
# NOT_FOUND for a reservation that is not there).
PREFILL = methods(
    prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"],
    "prefill",
    {
        "Prefill": {
            "OUT_OF_RANGE",
            "RESOURCE_EXHAUSTED",
            "UNAVAILABLE",
            "NOT_FOUND",
            "PERMISSION_DENIED",
        },
        "Stats": set(),
    },
    deadline_ok=("Prefill",),
)
PREFILL_METHOD = PREFILL[0]
assert PREFILL_METHOD.name == "Prefill"


@pytest.fixture(scope="module")
def prefill_strategies(fuzz_cluster):
    h = hints.prefill(fuzz_cluster)
    # Valid but for the reservation, which is not there: the decode worker's NOT_FOUND.
    target = prefill_pb2.KVTarget(
        worker_id=fuzz_cluster.worker_ids[common_pb2.WORKER_ROLE_DECODE],
        address=fuzz_cluster.address("decode-0"),
        reservation_id="none",
    )
    seed = prefill_pb2.PrefillRequest(
        request_id="fuzz-0", prompt_token_ids=PROMPTS[0], sampling=GREEDY, target=target
    )
    return {
        "calls": {m.name: calls(m, h, [seed] if m is PREFILL_METHOD else ()) for m in PREFILL},
        "edits": edits(prefill_pb2.PrefillRequest.DESCRIPTOR, h),
    }


def valid_request(cluster, prompt, request_id, reservation_id) -> prefill_pb2.PrefillRequest:
    """What the router would send to prefill into the reservation."""
    target = prefill_pb2.KVTarget(
        worker_id=cluster.worker_ids[common_pb2.WORKER_ROLE_DECODE],
        address=cluster.address("decode-0"),
        reservation_id=reservation_id,
        data_address=cluster.decode_data,
        data_transport=kvstore_pb2.DATA_TRANSPORT_TCP,
    )
    return prefill_pb2.PrefillRequest(
        request_id=request_id, prompt_token_ids=prompt, sampling=GREEDY, target=target
    )


@fuzz_settings("prefill")
@given(data=st.data())
def test_fuzz_every_prefill_rpc(fuzz_cluster, fuzzer, prefill_strategies, data):
    if data.draw(st.booleans(), label="generic"):
        method = data.draw(st.sampled_from(PREFILL), label="method")
        call = data.draw(prefill_strategies["calls"][method.name], label="call")
        fuzz_cluster.fuzz(fuzzer, "prefill-0", method, call)
        return
    prompt = data.draw(st.sampled_from(PROMPTS), label="prompt")
    request_id, reservation_id = fuzz_cluster.reserve(prompt)
    valid = valid_request(fuzz_cluster, prompt, request_id, reservation_id)
    frame = edited(valid, data.draw(prefill_strategies["edits"], label="edits"))
    timeout = data.draw(st.sampled_from(DEADLINES), label="deadline")
    cancel = data.draw(st.one_of(st.none(), st.integers(1, 2)), label="cancel after")
    call = Call((frame.SerializeToString(),), timeout, cancel)
    fuzz_cluster.fuzz(fuzzer, "prefill-0", PREFILL_METHOD, call)


def test_prefill_serves_and_holds_nothing_after_the_fuzz(fuzz_cluster):
    fuzz_cluster.assert_healthy()
    fuzz_cluster.release_all_and_assert_no_leaks()
