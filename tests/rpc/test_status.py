"""The domain-error -> status-code table, without a server (the wire is in test_server.py)."""

from __future__ import annotations

import inspect
import logging

import grpc
import pytest

from services.common import errors
from services.rpc.status import GRPC_CODES, STATUS_CODES, error_code, grpc_code, status_for

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
