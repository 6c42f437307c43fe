"""Futures chained across threads (``services.engine.ports.then``, ``settle_like``): a waiter
that gives up (cancels the future it holds) before the source settles is no error.

Session 46's soak probe: a KV transfer aborted while a helper's export of one of its layers was in
flight (a layer migration live) logged ``ERROR concurrent.futures: exception calling callback``
with an ``InvalidStateError`` traceback, four times in 20 minutes: the chained future had been
cancelled by its waiter, and the callback set its result anyway."""

from __future__ import annotations

import logging
from concurrent.futures import CancelledError, Future, InvalidStateError

import pytest

from services.engine.ports import settle_like, then


@pytest.fixture
def callback_errors(caplog):
    """What ``concurrent.futures`` logs when a done-callback raises."""
    caplog.set_level(logging.ERROR, logger="concurrent.futures")
    return lambda: [r for r in caplog.records if r.name == "concurrent.futures"]


def test_then_maps_a_result_and_passes_an_exception_through():
    source: Future[int] = Future()
    out = then(source, lambda x: x + 1)
    source.set_result(1)
    assert out.result(0) == 2

    source, error = Future(), ValueError("lost")
    out = then(source, lambda x: x)
    source.set_exception(error)
    assert out.exception(0) is error

    source = Future()
    out = then(source, lambda x: 1 // x)  # fn's own failure
    source.set_result(0)
    assert isinstance(out.exception(0), ZeroDivisionError)


def test_a_result_after_the_waiter_cancelled_is_dropped_without_an_error(callback_errors):
    source: Future[int] = Future()
    source.set_running_or_notify_cancel()  # running: it cannot be cancelled any more
    out = then(source, lambda x: x + 1)
    assert out.cancel()  # the waiter gives up (an aborted transfer)
    source.set_result(1)
    failing: Future[int] = Future()
    failing.set_running_or_notify_cancel()
    out2 = then(failing, lambda x: x)
    out2.cancel()
    failing.set_exception(ValueError("lost"))
    assert callback_errors() == []
    assert out.cancelled() and out2.cancelled()


def test_cancelling_the_chained_future_cancels_a_source_not_yet_running():
    source: Future[int] = Future()
    out = then(source, lambda x: x)
    out.cancel()
    assert source.cancelled()


def test_a_cancelled_source_cancels_the_chained_future(callback_errors):
    source: Future[int] = Future()
    out = then(source, lambda x: x)
    source.cancel()
    with pytest.raises(CancelledError):
        out.result(0)
    target: Future[int] = Future()
    settle_like(target, source)
    assert target.cancelled()
    assert callback_errors() == []


def test_settle_like_copies_an_outcome_and_keeps_a_waiters_cancellation(callback_errors):
    done: Future[int] = Future()
    done.set_result(7)
    target: Future[int] = Future()
    settle_like(target, done)
    assert target.result(0) == 7

    failed: Future[int] = Future()
    failed.set_exception(KeyError("k"))
    target = Future()
    settle_like(target, failed)
    assert isinstance(target.exception(0), KeyError)

    cancelled: Future[int] = Future()
    cancelled.cancel()
    source: Future[int] = Future()
    source.add_done_callback(lambda f: settle_like(cancelled, f))
    source.set_result(1)  # its callback finds the target cancelled: nothing to do
    assert callback_errors() == []


def test_a_target_settled_twice_is_still_an_error():
    """Only a waiter's cancellation is forgiven; setting an outcome twice is a defect."""
    done: Future[int] = Future()
    done.set_result(1)
    target: Future[int] = Future()
    target.set_result(0)
    with pytest.raises(InvalidStateError):
        settle_like(target, done)
