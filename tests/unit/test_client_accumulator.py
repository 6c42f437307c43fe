"""The client library's view of one Generate stream (``Accumulator``): the request id it named
is known before the router answers, and the decode worker is the one the request ended on."""

from __future__ import annotations

from services.client.client import Accumulator
from services.rpc.gen.banaserve.v1 import router_pb2


def frames(finished_on: str) -> list[router_pb2.GenerateResponse]:
    started = router_pb2.GenerateStarted(
        request_id="req-1", prefill_worker_id="p0", decode_worker_id="d0"
    )
    return [
        router_pb2.GenerateResponse(started=started),
        router_pb2.GenerateResponse(finished=router_pb2.GenerateFinished(
            decode_worker_id=finished_on
        )),
    ]  # fmt: skip


def test_the_result_names_the_worker_the_request_ended_on():
    """Probe, session 42: a request resumed on decode-1 after decode-0 died read decode-0."""
    for finished_on, expected in (("d1", "d1"), ("", "d0")):  # "": a router before the field
        acc = Accumulator(request_id="req-1")
        assert acc.request_id == "req-1"
        for frame in frames(finished_on):
            acc.add(frame)
        assert acc.result is not None
        assert (acc.result.prefill_worker_id, acc.result.decode_worker_id) == ("p0", expected)
