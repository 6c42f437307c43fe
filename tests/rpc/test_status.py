"""The domain-error -> status-code table, without a server (the wire is in test_server.py)."""

from __future__ import annotations

import asyncio
import inspect
import logging

import grpc
import pytest

from services.common import errors
from services.rpc.status import (
    GRPC_CODES,
    STATUS_CODES,
    abort_with,
    error_code,
    grpc_code,
    status_for,
)

C = grpc.StatusCode


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidRequestError("top_p must be in (0, 1], got 2"), C.INVALID_ARGUMENT),
        (errors.OutOfRangeError("prompt has 9000 tokens, limit 8192"), C.OUT_OF_RANGE),
        (errors.ModelNotFoundError("no model 'gpt-9'"), C.NOT_FOUND),
        (errors.RequestNotFoundError("no request 'r1'"), C.NOT_FOUND),
        (errors.ResourceExhaustedError("need 9 blocks, 4 free"), C.RESOURCE_EXHAUSTED),
        (errors.ConfigError("block_size 16 != 32"), C.FAILED_PRECONDITION),
        (errors.ModelFormatError("architecture 'Mamba' unsupported"), C.FAILED_PRECONDITION),
        (TimeoutError("no KV within 2.0 s"), C.DEADLINE_EXCEEDED),
        (errors.DependencyUnavailableError("redis at :6379 is down"), C.UNAVAILABLE),
    ],
)
def test_each_domain_error_maps_to_its_code_with_its_message(exc, code):
    assert status_for(exc) == (code, str(exc))


def test_subclass_without_an_entry_takes_its_parents_code():
    class PromptTooLong(errors.OutOfRangeError):
        pass

    assert status_for(PromptTooLong("too long")) == (C.OUT_OF_RANGE, "too long")


def test_empty_message_falls_back_to_the_class_name():
    assert status_for(errors.RequestNotFoundError()) == (C.NOT_FOUND, "RequestNotFoundError")


@pytest.mark.parametrize(
    "exc", [RuntimeError("bug at /secret/path"), errors.BanaServeError("/secret/path"), KeyError(1)]
)
def test_anything_else_is_internal_and_hides_details(exc, caplog):
    with caplog.at_level(logging.ERROR, logger="services.rpc.status"):
        code, message = status_for(exc)
    assert code == C.INTERNAL
    assert "secret" not in message and "Traceback" not in message
    # The reference in the message finds the full error in the server's log.
    ref = message.split("ref ")[1].split()[0]
    assert len(ref) == 12
    [record] = caplog.records
    assert ref in record.getMessage() and record.exc_info[1] is exc


def test_every_domain_error_class_has_a_decided_code():
    domain = {
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.BanaServeError) and cls is not errors.BanaServeError
    }
    assert domain <= set(STATUS_CODES)


def test_every_failure_status_has_one_error_code_and_back():
    failures = [c for c in grpc.StatusCode if c is not C.OK]
    assert sorted(GRPC_CODES.values(), key=str) == sorted(failures, key=str)
    assert [c.name for c in errors.ErrorCode] == [GRPC_CODES[c].name for c in errors.ErrorCode]
    for code in errors.ErrorCode:
        status = grpc_code(code)
        assert error_code(status) is code
        assert error_code(status.value[0]) is code  # the number the data plane sends


def test_ok_or_an_unknown_number_is_no_failure_code():
    assert error_code(C.OK) is errors.ErrorCode.UNKNOWN
    assert error_code(0) is errors.ErrorCode.UNKNOWN
    assert error_code(99) is errors.ErrorCode.UNKNOWN


class _EndedCall:
    """The parts of a grpc.aio.ServicerContext that ``abort_with`` reads, for a call gRPC ends
    under it: its deadline passed (``time_remaining`` 0), or it ends while the status is sent
    (``abort`` marks the status sent, as gRPC's does, then fails to send it)."""

    def __init__(self, remaining: float | None, send_fails: bool) -> None:
        self.remaining, self.send_fails = remaining, send_fails
        self.status_sent = False
        self.aborted: list[tuple[grpc.StatusCode, str]] = []

    def done(self) -> bool:
        return self.status_sent

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted.append((code, details))
        self.status_sent = True
        if self.send_fails:
            raise RuntimeError('Failed "execute_batch"')  # gRPC's ExecuteBatchError
        raise grpc.aio.AbortError("Locally aborted.")


def test_a_handler_failing_past_its_deadline_sends_no_status():
    """Session 46's soak probe: such a status found the call ended, and gRPC logged
    ``ExecuteBatchError raised in core by servicer method`` with a traceback at ERROR."""
    call = _EndedCall(remaining=0, send_fails=True)
    with pytest.raises(asyncio.CancelledError, match="past its deadline: TimeoutError"):
        asyncio.run(abort_with(call, TimeoutError("the deadline passed while reserving")))
    assert call.aborted == []


def test_a_status_that_finds_the_call_ended_is_no_error():
    call = _EndedCall(remaining=3.0, send_fails=True)
    asyncio.run(abort_with(call, errors.RequestNotFoundError("gone")))  # returns quietly
    assert call.aborted == [(grpc.StatusCode.NOT_FOUND, "gone")]


def test_a_live_call_is_aborted_with_its_status():
    for remaining in (None, 3.0):  # no deadline, or one ahead
        call = _EndedCall(remaining=remaining, send_fails=False)
        with pytest.raises(grpc.aio.AbortError):
            asyncio.run(abort_with(call, errors.RequestNotFoundError("gone")))
        assert call.aborted == [(grpc.StatusCode.NOT_FOUND, "gone")]
