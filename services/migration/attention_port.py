"""``AttentionPort`` over the data plane: the donor's located sequences attend on a helper process.

It keeps the contract of ``services/engine/ports.py`` exactly as ``LocalAttentionPort`` does (the
in-process reference the tests hold it against):

1. ``submit(layer, queries)`` — the donor's stepping thread, once per layer of a step with
   located sequences on this port, all of them in one message. It encodes the queries on that
   thread (services/migration/attention_wire.py) and returns a future at once: the engine
   computes the local part of those sequences meanwhile, then waits on it. With a ``channel``
   (tcp: a ``BlockingTcpChannel`` of the port's own) the stepping thread writes the message
   itself and the future's first ``result`` reads the reply on that thread; without one the
   exchange goes to the event loop that owns the data-plane client. The future gives one ``PartialAttention`` per
   query; it raises ``PortError`` naming the sequences the helper refused, or every sequence of
   the call when the helper could not be reached or did not answer in time (``on_failure``, the
   agent's, hears of the latter).
2. ``release(request_ids)`` — the engine thread (a sequence finished, aborted, preempted or
   recalled). Fire and forget; never blocks, never raises (a helper that cannot be reached frees
   them when the migration's lease ends).
3. ``close()`` — the agent, once no sequence is located on the port.

``counters`` says how much of the round trip the step hid: each call's round trip (submit to
answer) and how long the stepping thread then waited for it; the rest overlapped the owner's
own work (its local part).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from services.engine.attention import PartialAttention
from services.engine.ports import AttentionPort, AttentionQuery, PortError, settle_like
from services.migration import attention_wire, wire
from services.migration.ports import helper_lost
from services.rpc.dataplane import DataClient, DataPlaneError, ErrorKind
from services.rpc.dataplane.blocking_tcp import BlockingTcpChannel

log = logging.getLogger(__name__)
Parts = list[PartialAttention]


@dataclass(frozen=True)
class OverlapReport:
    num_calls: int
    num_queries: int
    num_bytes: int  # both ways
    round_trip_s: float  # summed over calls
    waited_s: float  # of it, time the stepping thread blocked

    @property
    def hidden_s(self) -> float:
        return max(0.0, self.round_trip_s - self.waited_s)

    @property
    def hidden_fraction(self) -> float:
        return self.hidden_s / self.round_trip_s if self.round_trip_s > 0 else 0.0


class OverlapCounters:
    """Thread-safe sums behind ``OverlapReport``."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._calls = self._queries = self._bytes = 0
        self._round_trip = self._waited = 0.0

    def answered(self, num_queries: int, num_bytes: int, round_trip_s: float) -> None:
        with self._lock:
            self._calls += 1
            self._queries += num_queries
            self._bytes += num_bytes
            self._round_trip += round_trip_s

    def waited(self, seconds: float) -> None:
        with self._lock:
            self._waited += seconds

    def report(self) -> OverlapReport:
        with self._lock:
            return OverlapReport(
                self._calls, self._queries, self._bytes, self._round_trip, self._waited
            )


class _TimedFuture(Future):  # type: ignore[type-arg]
    """A future that adds the time its consumer blocks in ``result`` to the counters."""

    def __init__(self, counters: OverlapCounters) -> None:
        super().__init__()
        self._counters = counters

    def result(self, timeout: float | None = None) -> Parts:
        t0 = self._counters.clock()
        try:
            return super().result(timeout)
        finally:
            self._counters.waited(self._counters.clock() - t0)


class _ChannelFuture(_TimedFuture):
    """A layer's exchange on the port's blocking channel: sent by ``submit``, read by the first
    ``result`` (the stepping thread, after its local part), with no event loop in between."""

    def __init__(
        self, port: DataAttentionPort, queries: Sequence[AttentionQuery], rid: int, sent: int,
        started: float,
    ) -> None:  # fmt: skip
        super().__init__(port.counters)
        self._port, self._queries, self._rid = port, queries, rid
        self._sent, self._started = sent, started

    def result(self, timeout: float | None = None) -> Parts:
        if not self.done():
            t0 = self._counters.clock()
            self._read(self._port.timeout_s if timeout is None else timeout)
            self._counters.waited(self._counters.clock() - t0)
        return Future.result(self, 0)

    def _read(self, timeout_s: float) -> None:
        port, ids = self._port, [q.request_id for q in self._queries]
        try:
            header, out = port.channel.receive(self._rid, timeout_s)
            parts = attention_wire.decode_attention_result(header, memoryview(out), self._queries)
        except DataPlaneError as e:
            if e.kind is not ErrorKind.REMOTE:  # the channel is broken: the helper is lost
                port.failed(helper_lost(e))
            self.set_exception(PortError(ids, helper_lost(e)))
        except Exception as e:  # noqa: BLE001 - a refusal (PortError) or a bad answer
            self.set_exception(e)
        else:
            took = self._counters.clock() - self._started
            self._counters.answered(len(ids), self._sent + memoryview(out).nbytes, took)
            self.set_result(parts)


class DataAttentionPort(AttentionPort):
    """``channel``: the blocking connection the stepping thread's exchanges take (tcp data
    plane); without one they go through ``client`` on the agent's loop."""

    def __init__(
        self,
        client: DataClient,
        migration_id: str,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float,
        on_failure: Callable[[str], None] | None = None,
        counters: OverlapCounters | None = None,
        channel: BlockingTcpChannel | None = None,
    ) -> None:
        self.client = client
        self.migration_id = migration_id
        self.loop = loop
        self.timeout_s = timeout_s
        self.on_failure = on_failure or (lambda reason: None)
        self.counters = counters or OverlapCounters()
        self.channel = channel
        self.closed = False
        self._releases: set[Future[None]] = set()  # sent, not yet answered

    def failed(self, reason: str) -> None:
        """From the stepping thread: tell the agent (on its loop) the helper is lost."""
        with contextlib.suppress(RuntimeError):  # a closed loop: the lease ends it
            self.loop.call_soon_threadsafe(self.on_failure, reason)

    def submit(self, layer: int, queries: Sequence[AttentionQuery]) -> Future[Parts]:
        future = _TimedFuture(self.counters)
        try:
            if self.closed:
                raise PortError([q.request_id for q in queries], "the port is closed")
            header, payload = attention_wire.encode_attention_run(self.migration_id, layer, queries)
            started = self.counters.clock()
            if self.channel is not None:
                return self._send(queries, header, payload, started)
            inner = asyncio.run_coroutine_threadsafe(
                self._run(queries, header, payload, started), self.loop
            )
            inner.add_done_callback(lambda done: settle_like(future, done))
        except Exception as e:  # noqa: BLE001 - the future carries it to the step
            future.set_exception(e)
        return future

    def _send(
        self, queries: Sequence[AttentionQuery], header: bytes, payload: object, started: float
    ) -> Future[Parts]:
        assert self.channel is not None
        try:
            rid = self.channel.send(header, payload)
        except DataPlaneError as e:
            reason = helper_lost(e)
            self.failed(reason)
            raise PortError([q.request_id for q in queries], reason) from e
        return _ChannelFuture(self, queries, rid, memoryview(payload).nbytes, started)

    async def _run(
        self, queries: Sequence[AttentionQuery], header: bytes, payload: object, started: float
    ) -> Parts:
        try:
            out_header, out = await self.client.request(header, payload, self.timeout_s)
        except DataPlaneError as e:
            reason = helper_lost(e)
            self.on_failure(reason)
            raise PortError([q.request_id for q in queries], reason) from e
        parts = attention_wire.decode_attention_result(out_header, memoryview(out), queries)
        size = memoryview(payload).nbytes + memoryview(out).nbytes
        self.counters.answered(len(queries), size, self.counters.clock() - started)
        return parts

    def release(self, request_ids: Sequence[str]) -> None:
        if not request_ids or self.closed:
            return
        header = wire.encode_release(self.migration_id, list(request_ids))
        # A closed loop (RuntimeError): the helper frees them with the migration or its lease.
        with contextlib.suppress(RuntimeError):
            sent = asyncio.run_coroutine_threadsafe(self._release(header), self.loop)
            self._releases.add(sent)
            sent.add_done_callback(self._releases.discard)

    def wait_released(self, timeout_s: float = 10.0) -> None:
        """Until every release sent so far is answered (never from the loop's thread)."""
        for sent in list(self._releases):
            sent.result(timeout_s)

    async def _release(self, header: bytes) -> None:
        try:
            await self.client.request(header, b"", self.timeout_s)
        except DataPlaneError as e:
            log.debug("migration %s: release lost: %r", self.migration_id, e)

    def close(self) -> None:
        self.closed = True
        if self.channel is not None:
            self.channel.close()
