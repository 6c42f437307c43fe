"""A worker's registration and load reports to the router (prefill, decode and mixed workers).

``LoadReporter.run`` holds one RouterService.ReportLoad call open: the first frame says who the
worker is, then a ``load`` frame every ``interval_s``. ``stop`` half-closes the call, which the
router reads as a clean deregistration; a call that breaks (router gone, registration refused)
is retried after ``retry_s`` until ``stop``.

A worker told to stop (SIGTERM/SIGINT) drains (``--drain-timeout``): its reports say
``draining`` from then on, so the router sends it nothing new while it finishes what it has.
A worker whose engine loop has died must not stay in the router: ``serve_while_alive`` serves
until a signal or until the loop dies. Then, in this order, the server's health turns
NOT_SERVING, the reporter deregisters, and the server drains and stops; the worker then exits
non-zero, for its supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from services.common.config import RpcConfig
from services.common.load import LoadReport
from services.rpc.channels import open_channel
from services.rpc.convert import duration, seconds
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.rpc.server import RunningServer, drain_while

log = logging.getLogger(__name__)

ROLES = {
    "prefill": common_pb2.WORKER_ROLE_PREFILL,
    "decode": common_pb2.WORKER_ROLE_DECODE,
    "mixed": common_pb2.WORKER_ROLE_MIXED,
}


def load_to_proto(load: LoadReport) -> router_pb2.LoadReport:
    return router_pb2.LoadReport(
        num_queued_prefill_tokens=load.num_queued_prefill_tokens,
        num_running_seqs=load.num_running_seqs,
        num_waiting_seqs=load.num_waiting_seqs,
        num_kv_blocks_used=load.num_blocks_used,
        num_kv_blocks_free=load.num_blocks_free,
        step_time=duration(load.step_time_s),
        busy_fraction=load.busy_fraction,
        window=duration(load.window_s),
        num_hosted_layers=load.num_hosted_layers,
        num_hosted_blocks=load.num_hosted_blocks,
        num_hosted_layer_blocks=load.num_hosted_layer_blocks,
        admitted_request_ids=load.admitted,
        draining=load.draining,
    )


def load_from_proto(message: router_pb2.LoadReport) -> LoadReport:
    """InvalidRequestError if a field is out of range (a negative time, a fraction over 1)."""
    return LoadReport(
        num_queued_prefill_tokens=message.num_queued_prefill_tokens,
        num_running_seqs=message.num_running_seqs,
        num_waiting_seqs=message.num_waiting_seqs,
        num_blocks_used=message.num_kv_blocks_used,
        num_blocks_free=message.num_kv_blocks_free,
        step_time_s=seconds(message.step_time),
        busy_fraction=message.busy_fraction,
        window_s=seconds(message.window),
        num_hosted_layers=message.num_hosted_layers,
        num_hosted_blocks=message.num_hosted_blocks,
        num_hosted_layer_blocks=message.num_hosted_layer_blocks,
        admitted=tuple(message.admitted_request_ids),
        draining=message.draining,
    )


class LoadReporter:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        info: router_pb2.WorkerInfo,
        load: Callable[[], Awaitable[LoadReport]],
        interval_s: float = 0.1,
        retry_s: float = 1.0,
    ) -> None:
        self._stub = router_pb2_grpc.RouterServiceStub(channel)
        self._info = info
        self._load = load
        self._interval_s = interval_s
        self._retry_s = retry_s
        self._stopped = asyncio.Event()
        self._draining = False
        self._failures = 0  # report streams failed in a row: the first logged, then the return
        self.last_error: grpc.aio.AioRpcError | None = None  # of the last failed stream

    def begin_drain(self) -> None:
        """The worker is stopping: every report from now on says ``draining``, so the router
        routes nothing new to it while it finishes what it has (it stays registered)."""
        self._draining = True

    async def frames(self) -> AsyncIterator[router_pb2.ReportLoadRequest]:
        yield router_pb2.ReportLoadRequest(worker=self._info)
        sent = 0
        while not self._stopped.is_set():
            load = await self._load()
            if self._draining:
                load = dataclasses.replace(load, draining=True)
            yield router_pb2.ReportLoadRequest(load=load_to_proto(load))
            sent += 1
            if sent == 2 and self._failures:
                # The call outlived a report interval: the router took the registration. (Said
                # once the registration merely went out, a worker the router refuses at once —
                # an id taken — logged "again" and a failure every second: session 45's probe.)
                log.info("load reports to the router again after %d failed tries", self._failures)
                self._failures = 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self._interval_s)

    async def run(self) -> None:
        while not self._stopped.is_set():
            try:
                await self._stub.ReportLoad(self.frames())
            except grpc.aio.AioRpcError as exc:
                # A router away (restarting, or stopped first by `up`) fails every retry: said
                # once, then again when it is back (``frames``).
                self._failures += 1
                self.last_error = exc
                level = logging.WARNING if self._failures == 1 else logging.DEBUG
                log.log(level, "load reports to the router failed: %s %s%s", exc.code(),
                        exc.details(), " (retrying; said again once it works)" if
                        self._failures == 1 else "")  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self._retry_s)

    def stop(self) -> None:
        self._stopped.set()


def worker_info(
    worker_id: str,
    address: str,
    role: str,
    model: str,
    fingerprint: str,
    block_size: int,
    num_kv_blocks: int,
    max_model_len: int,
    hosts_only: bool = False,
    max_num_seqs: int = 0,
) -> router_pb2.WorkerInfo:
    return router_pb2.WorkerInfo(
        worker_id=worker_id,
        address=address,
        role=ROLES[role],
        model=model,
        fingerprint=fingerprint,
        block_size=block_size,
        num_kv_blocks=num_kv_blocks,
        max_model_len=max_model_len,
        hosts_only=hosts_only,
        max_num_seqs=max_num_seqs,
    )


# The report stream's keepalive: a ping after 1 s without one, the connection dead when it is
# not answered within 2 s. The stream is the worker's place in routing, and the worker only
# writes on it, so pings are all that can find a connection that died without closing (the
# router drops a silent worker after its report timeout); the services' 10 s + 5 s kept a
# stranded worker out of routing 13 s in the chaos suite. Within what the router's server
# accepts (channels.server_options: a ping every 0.5 s).
REPORT_KEEPALIVE_S = 1.0
REPORT_KEEPALIVE_TIMEOUT_S = 2.0


def router_channel(router: str, rpc: RpcConfig, reconnect_s: float = 1.0) -> grpc.aio.Channel:
    """A channel that tries to reconnect every ``reconnect_s`` while the router is down, not
    on gRPC's default backoff (growing to 2 minutes), so a worker registers again with a
    restarted router within about ``reconnect_s`` of its return; and pings on the report
    keepalive above."""
    backoff_ms = int(reconnect_s * 1000)
    timeout_ms = int(REPORT_KEEPALIVE_TIMEOUT_S * 1000)
    options = [
        ("grpc.initial_reconnect_backoff_ms", backoff_ms),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ("grpc.keepalive_time_ms", int(REPORT_KEEPALIVE_S * 1000)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
    ]
    return open_channel(router, rpc, extra_options=options)


@contextlib.asynccontextmanager
async def reporting_to(
    router: str | None,
    info: router_pb2.WorkerInfo,
    load: Callable[[], Awaitable[LoadReport]],
    rpc: RpcConfig,
    interval_s: float = 0.1,
) -> AsyncIterator[LoadReporter | None]:
    """Registers with ``router`` and reports load while the block runs (nothing if no router).
    Yields the reporter (None without a router), whose ``stop`` deregisters early."""
    if not router:
        yield None
        return
    channel = router_channel(router, rpc)
    reporter = LoadReporter(channel, info, load, interval_s)
    task = asyncio.create_task(reporter.run())
    try:
        yield reporter
    finally:
        reporter.stop()
        await asyncio.wait({task}, timeout=2.0)
        task.cancel()
        await channel.close()


async def serve_while_alive(
    server: RunningServer,
    died: asyncio.Future[BaseException],
    reporter: LoadReporter | None,
    holds_work: Callable[[], bool] = lambda: False,
    poll_s: float = 0.05,
    begin_drain: Callable[[], None] | None = None,
) -> BaseException | None:
    """Serves until SIGTERM/SIGINT (drained then; returns None) or until ``died`` resolves:
    then health NOT_SERVING, deregistration and a drain (module docstring), and the loop's
    error is returned. The server has stopped either way.

    The drain on a signal: reports say ``draining``, and the server, still taking calls,
    waits (at most its grace) until ``holds_work()`` is false: no reservation, sequence or
    prompt left, so a request reserved here still gets its KV and its token stream; then the
    calls still open get what is left of the grace. ``begin_drain`` is told of the signal too
    (the migration agent: a migration here is ended by the coordinator before the worker
    goes, and ``holds_work`` waits for it)."""

    def on_signal() -> None:
        if reporter is not None:
            reporter.begin_drain()
        if begin_drain is not None:
            begin_drain()

    drain = drain_while(holds_work, poll_s)
    serving = asyncio.ensure_future(server.serve_until_signal(drain=drain, on_signal=on_signal))
    await asyncio.wait({serving, died}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        serving.result()
        return None
    error = died.result()
    log.critical("the engine loop died (%r): health NOT_SERVING, leaving the router", error)
    for name in ("", *server.service_names):
        await server.set_serving(name, False)
    if reporter is not None:
        reporter.stop()
    await server.stop()  # serve_until_signal returns once the server has terminated
    await serving
    return error
