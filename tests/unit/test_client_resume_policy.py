"""When a broken Generate call goes on (services/client/resume.py): pure policy, no server."""

from __future__ import annotations

import grpc
import pytest

from services.client.client import Accumulator
from services.client.resume import Reached, Resume
from services.rpc.gen.banaserve.v1 import router_pb2
from services.rpc.status import ROUTER_UNAVAILABLE


class Failed(grpc.RpcError):
    def __init__(self, details: str, code=grpc.StatusCode.UNAVAILABLE, trailing=()) -> None:
        self._details, self._code, self._trailing = details, code, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def resume(max_resumes: int = 2) -> Resume:
    return Resume(router_pb2.GenerateRequest(), None, max_resumes, 30.0, Reached(once=True))


BROKEN = "Socket closed"
UNANSWERED = [
    "failed to connect to all addresses; last error: UNKNOWN: Connection refused",
    "Stream removed (sendmsg: Broken pipe (32))",  # session 40's flaky e2e run
    "Socket closed",
]


@pytest.mark.parametrize("details", UNANSWERED)
def test_resends_that_had_no_answer_stay_in_the_resume_they_belong_to(details):
    r, acc = resume(), Accumulator()
    assert r.allows(Failed(BROKEN), acc) and r.used == 1
    r.next_message(acc)  # the resend, not yet answered
    for i in range(1, 6):  # however the router's restart makes them fail
        assert r.allows(Failed(details), acc)
        assert (r.used, r.retries) == (1, i)
    # ... bounded by the wait for the router, not by the number of tries
    r.back_by = 0.0
    assert not r.allows(Failed(details), acc)


def test_each_stream_broken_after_an_answer_is_a_resume_up_to_the_limit():
    r, acc = resume(max_resumes=2), Accumulator()
    for used in (1, 2):
        assert r.allows(Failed(BROKEN), acc) and r.used == used
        r.next_message(acc)
        r.answered = True  # the resend had frames, then broke again
    assert not r.allows(Failed(BROKEN), acc)


def test_the_routers_own_unavailable_and_other_codes_are_not_resumed():
    r, acc = resume(), Accumulator()
    assert not r.allows(Failed("no worker", trailing=(ROUTER_UNAVAILABLE,)), acc)
    assert not r.allows(Failed("bad", code=grpc.StatusCode.INVALID_ARGUMENT), acc)
    assert r.used == 0
