"""How a stream broken by a lost router goes on (the client module's docstring): when a
broken or failed call is sent again, how many times, and how long the client waits for the
router to be back."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from services.rpc.gen.banaserve.v1 import router_pb2
from services.rpc.status import ROUTER_UNAVAILABLE

if TYPE_CHECKING:
    from services.client.client import Accumulator

MAX_RESUMES = 2  # a stream broken by a lost router is resumed at most this many times
RECONNECT_TIMEOUT_S = 30.0  # waiting for the router to be back, at most (and the deadline)
RETRY_PAUSE_S = 0.05  # before a resend that never connected goes again (doubling, 1 s at most)


@dataclass
class Reached:
    """Whether a client has had an answer from its router: a connection that fails later
    is a router away, not a wrong address."""

    once: bool = False


@dataclass
class Resume:
    """When and how a stream broken by a lost router goes on (services/client/client.py)."""

    message: router_pb2.GenerateRequest
    deadline: float | None  # time.monotonic()
    max_resumes: int
    reconnect_timeout_s: float
    reached: Reached
    used: int = 0  # resumes
    back_by: float = 0.0  # time.monotonic(): the end of the current resume's wait
    answered: bool = True  # the current call has had a frame
    retries: int = 0  # resends in the current resume's wait that never connected
    # The wait for the router to be back, while one runs: ``cancel`` ends it at once.
    waiting: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        self._cancelled.set()
        self._stop_waiting()

    def paused(self) -> bool:
        """Sleeps ``pause_s()``: False if ``cancel`` came meanwhile (the sync client)."""
        return not self._cancelled.wait(self.pause_s())

    @contextlib.contextmanager
    def waiting_on(self, ready: Any) -> Iterator[None]:
        """``ready`` (a future of the channel being ready) is the wait while the block runs;
        ``cancel`` (or the block's end) cancels it if it is not done."""
        self.waiting = ready
        if self._cancelled.is_set():  # cancelled before it began
            self._stop_waiting()
        try:
            yield
        finally:
            self._stop_waiting()
            self.waiting = None

    def _stop_waiting(self) -> None:
        with self._lock:  # (grpc's ready future fails a second cancel: once, from any thread)
            waiting = self.waiting
            if waiting is not None and not waiting.done():
                waiting.cancel()

    def allows(self, exc: grpc.RpcError, acc: Accumulator) -> bool:
        """Whether the broken (or failed) call goes on; a resume that does is counted here,
        and its wait for the router begins."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            return False
        if any(tuple(item) == ROUTER_UNAVAILABLE for item in exc.trailing_metadata() or ()):
            return False  # the router answered: its workers are lost, it is not
        never_connected = "failed to connect" in (exc.details() or "")
        if self.used and not self.answered:
            # A resend that had no answer: gRPC may say a channel is ready for the connection
            # that has just died, and the resend then fails at once ("failed to connect", or
            # "Stream removed (sendmsg: Broken pipe)": session 40's flaky e2e run spent both
            # resumes so). The same wait goes on; it is not another resume.
            self.retries += 1
            return self.wait_s() > 0
        if self.used >= self.max_resumes:
            return False
        if never_connected and acc.started is None and not self.reached.once:
            return False  # a wrong address, a router not running: at once, as before
        self.used += 1
        self.retries = 0
        self.back_by = time.monotonic() + self.reconnect_timeout_s
        return self.wait_s() > 0

    def wait_s(self) -> float:
        """What is left of the wait for the router to be back."""
        left = self.back_by - time.monotonic()
        return left if self.deadline is None else min(left, self.deadline - time.monotonic())

    def pause_s(self) -> float:
        """Before a resend that never connected is sent again: 0.05 s, doubling, at most 1 s."""
        return 0.0 if not self.retries else min(RETRY_PAUSE_S * 2 ** (self.retries - 1), 1.0)

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def timeout_s(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def next_message(self, acc: Accumulator) -> router_pb2.GenerateRequest:
        """The request again, under the id the router gave it, with every token the caller
        has (those this request was sent with included)."""
        self.answered = False
        message = router_pb2.GenerateRequest()
        message.CopyFrom(self.message)
        message.request_id = acc.request_id or message.request_id
        message.resume = True  # the router may still run it: this call takes it over
        del message.resume_output_token_ids[:]
        message.resume_output_token_ids.extend(
            [*self.message.resume_output_token_ids, *acc.token_ids]
        )
        return message


def resume_for(
    message: router_pb2.GenerateRequest,
    timeout_s: float | None,
    max_resumes: int,
    reconnect_timeout_s: float,
    reached: Reached,
) -> Resume:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    return Resume(message, deadline, max_resumes, reconnect_timeout_s, reached)


async def ready_after(pause_s: float, channel: grpc.aio.Channel) -> None:
    await asyncio.sleep(pause_s)
    await channel.channel_ready()
