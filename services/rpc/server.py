"""gRPC server bootstrap shared by every BanaServe service.

Lifecycle of a server:
  1. ``start_server`` binds loopback (port 0: the OS picks, ``RunningServer.port`` says which;
     mutual TLS and the authorization interceptor when ``config.security`` says so,
     services/rpc/security.py), installs the tracing and error interceptors, the standard health service and server
     reflection, starts, and marks every service and the server as a whole (``""``) SERVING;
  2. ``set_serving`` flips one service's health while it runs (a worker that stops accepting);
  3. ``stop`` (or SIGTERM/SIGINT under ``serve_until_signal``) drains: health turns NOT_SERVING
     everywhere first, so health-checking peers stop sending, then new calls are refused and
     calls in flight get ``grace_s`` (``--drain-timeout``, ``add_drain_args``) to finish before
     they are cancelled. A server whose calls are not all work, or whose work needs calls to it
     while it finishes (the router's: the workers' load report streams, open for as long as
     each worker lives, and their KV target checks; a worker's: a reserved request's KV and
     token stream, calls still to come), passes ``drain``: it refuses new work (or has its
     router send none) and waits for the work it has, bounded by the grace, while the server
     still takes calls; the calls left then get what grace it returns. A second SIGTERM/SIGINT
     during the drain stops at once: the server's ``on_force`` ends its drain on its own terms
     (the router fails what is left with its reason) within ``FORCE_S``, else the drain is
     cancelled; then every call left is cancelled.

Interceptor order matters: tracing is outermost so its span records the status the error
interceptor produced from a domain exception (services/rpc/status.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.arg_types import non_negative
from services.common.config import DRAIN_TIMEOUT_S, RpcConfig
from services.common.errors import ConfigError, ModelFormatError, ModelNotFoundError
from services.common.logs import configure_logging
from services.common.metrics_endpoint import check_metrics_args
from services.common.parent import watch_parent
from services.rpc.channels import server_options
from services.rpc.security import AuthInterceptor, server_credentials
from services.rpc.status import ErrorInterceptor
from services.rpc.tracing import DISABLED, Tracing

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A second signal: how long the server's ``on_force`` may take to end its drain (the router
# fails its requests left and lets their calls send that: ~1 s) before it is cancelled.
FORCE_S = 3.0

# A stop that outlasts its grace by this much says where it waits, before its launcher's kill
# (``STOP_TIMEOUT_S``, 15 s after the grace): each pending task's stack and, from a watchdog
# thread, each thread's (an event loop blocked in a call runs no task).
STUCK_REPORT_S = 5.0

# A server's own drain: given the grace, it returns once its work is done (or the grace is
# up) with the grace the calls still open get (None: none, cancelled at once).
Drain = Callable[[float], Awaitable[float | None]]


def add_drain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--drain-timeout",
        type=non_negative(float),
        default=DRAIN_TIMEOUT_S,
        metavar="S",
        help="on SIGTERM/SIGINT: no new work is taken and the work in flight gets S seconds "
        f"to finish before it is cancelled (default {DRAIN_TIMEOUT_S:g}; 0: cancel at once). "
        "An idle service stops at once (docs/services.md, 'Stopping')",
    )


@dataclass(frozen=True)
class Service:
    """One servicer and how to add it: ``name`` is the proto's full service name."""

    name: str
    add: Callable[[grpc.aio.Server], None]

    @classmethod
    def bind(
        cls,
        servicer: Any,
        add_to_server: Callable[[Any, grpc.aio.Server], None],
        descriptor: ServiceDescriptor,
    ) -> Service:
        """E.g. ``Service.bind(impl, decode_pb2_grpc.add_DecodeServiceServicer_to_server,
        decode_pb2.DESCRIPTOR.services_by_name["DecodeService"])``."""
        return cls(descriptor.full_name, lambda server: add_to_server(servicer, server))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RunningServer:
    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        config: RpcConfig,
        port: int,
        names: Sequence[str],
    ) -> None:
        self._server = server
        self._health = health_servicer
        self._config = config
        self.port = port
        self.service_names = tuple(names)
        self._forced = False  # a second signal came (``serve_until_signal``)

    @property
    def address(self) -> str:
        return _address(self._config.host, self.port)

    async def set_serving(self, name: str, serving: bool) -> None:
        await self._health.set(name, SERVING if serving else NOT_SERVING)

    async def stop(self, grace_s: float | None = None, drain: Drain | None = None) -> None:
        """Drains and stops; returns once every call has ended (at most ``grace_s`` later).
        ``drain(grace)``: the server's own wait for its work (module docstring); the calls
        still open once it returns are cancelled."""
        grace = self._config.grace_s if grace_s is None else grace_s
        await self._health.enter_graceful_shutdown()
        if drain is not None:
            # The server still takes calls while the drain runs: its own code refuses new
            # work, and the work it finishes may need calls to it (the router's workers check
            # a KV target with it; a decode worker's reserved request still gets its KV and
            # its token stream opened).
            grace = await drain(grace)
        await self._server.stop(0.0 if self._forced else grace)
        _started.discard(self)
        log.info("stopped %s", self.address)

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def serve_until_signal(
        self,
        signals: Iterable[signal.Signals] = DRAIN_SIGNALS,
        drain: Drain | None = None,
        on_signal: Callable[[], None] | None = None,
        on_force: Callable[[], None] | None = None,
    ) -> signal.Signals | None:
        """Serves until one of ``signals`` arrives, then drains (``stop``'s ``drain``; called
        first: ``on_signal``, a worker's reports saying it drains); returns the signal, or None
        if the server stopped for another reason. A second signal during the drain stops at
        once (module docstring: ``on_force``)."""
        loop = asyncio.get_running_loop()
        received: asyncio.Future[signal.Signals] = loop.create_future()
        again: asyncio.Future[signal.Signals] = loop.create_future()
        terminated = asyncio.ensure_future(self.wait())
        report: asyncio.TimerHandle | None = None
        signals = tuple(signals)
        for signum in signals:
            loop.add_signal_handler(signum, _resolve_once, received, signum)
        try:
            await asyncio.wait({received, terminated}, return_when=asyncio.FIRST_COMPLETED)
            if not received.done():
                return None
            sig = received.result()
            for signum in signals:
                loop.add_signal_handler(signum, _resolve_once, again, signum)
            log.info(
                "%s: %s, draining for up to %.1fs (again to stop at once)",
                self.address, sig.name, self._config.grace_s,
            )  # fmt: skip
            report = _arm_stuck_report(self.address, self._config.grace_s + STUCK_REPORT_S)
            if on_signal is not None:
                on_signal()
            stopping = asyncio.ensure_future(self.stop(drain=drain))
            await asyncio.wait({stopping, again}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                stopping.result()
            else:
                await self._force(stopping, again.result(), on_force)
            return sig
        finally:
            terminated.cancel()
            for signum in signals:
                loop.remove_signal_handler(signum)
            if report is not None and not _dump_threads_when_stuck:
                report.cancel()  # served in-process (a test): its stop has ended here

    async def _force(
        self,
        stopping: asyncio.Future[None],
        sig: signal.Signals,
        on_force: Callable[[], None] | None,
    ) -> None:
        log.warning("%s: %s again: stopping at once", self.address, sig.name)
        self._forced = True  # the calls left once the drain ends get no grace
        if on_force is not None:
            on_force()
            await asyncio.wait({stopping}, timeout=FORCE_S)
            if stopping.done():
                stopping.result()
                return
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping
        if self in _started:  # the stop was cancelled before it ended (else it said so)
            await self._server.stop(0)  # a smaller grace than a stop in flight: at once
            _started.discard(self)
            log.info("stopped %s", self.address)


# Set by ``run_service``: this process is a service of its own, so a stuck stop may also dump
# every thread's stack to stderr (not in a test process that serves in-process).
_dump_threads_when_stuck = False


def _arm_stuck_report(address: str, after_s: float) -> asyncio.TimerHandle:
    """Once ``after_s`` have passed and the service still runs, logs where each pending task
    of this loop waits; a second later, if the process still runs, every thread's stack goes to
    stderr (``faulthandler``, from a thread of its own: it fires even if the loop is blocked).
    ``run_service`` disarms them once the service's ``serve`` has returned and once the process
    is about to exit; returns the first."""
    report = asyncio.get_running_loop().call_later(after_s, _log_pending_tasks, address, after_s)
    if _dump_threads_when_stuck:
        with contextlib.suppress(ValueError, OSError, AttributeError):  # a stderr with no fd
            faulthandler.dump_traceback_later(after_s + 1.0, exit=False)
        _stuck_reports.append(report)
    return report


_stuck_reports: list[asyncio.TimerHandle] = []


def _log_pending_tasks(address: str, after_s: float) -> None:
    chains = [_awaits(task.get_coro()) for task in asyncio.all_tasks() if not task.done()]
    # gRPC's own tasks (compiled code: no line numbers) wait for calls; they say nothing
    ours = [chain for chain in chains if ".py:" in chain]
    log.warning(
        "%s: still stopping %.1fs after the signal; %d tasks wait (and %d of gRPC's own):\n%s",
        address, after_s, len(ours), len(chains) - len(ours), "\n".join(f"  {c}" for c in ours),
    )  # fmt: skip


def _awaits(coro: Any, depth: int = 24) -> str:
    """Where a suspended coroutine waits: the chain of coroutines it awaits, outermost first."""
    chain = []
    while coro is not None and len(chain) < depth:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:  # a future, or a coroutine of compiled code: its repr says what
            chain.append(type(coro).__name__)
            break
        code = frame.f_code
        chain.append(f"{code.co_qualname} ({Path(code.co_filename).name}:{frame.f_lineno})")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " -> ".join(chain)


def drain_while(
    holds_work: Callable[[], bool], poll_s: float = 0.05, at_least_s: float = 0.0
) -> Callable[[float], Awaitable[float]]:
    """A ``Drain`` that waits (at least ``at_least_s``, at most its grace) until
    ``holds_work()`` is false; the calls still open then get what is left of the grace."""

    async def drain(grace_s: float) -> float:
        start = time.monotonic()
        deadline = start + grace_s
        while time.monotonic() < deadline and (
            holds_work() or time.monotonic() < start + at_least_s
        ):
            await asyncio.sleep(poll_s)
        return max(0.0, deadline - time.monotonic())

    return drain


def _resolve_once(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


async def start_server(
    services: Sequence[Service],
    config: RpcConfig,
    *,
    tracing: Tracing = DISABLED,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    port_hold: PortHold | None = None,
) -> RunningServer:
    # Authorization before any other interceptor counts or admits the call.
    auth = [AuthInterceptor(config.security)] if config.security is not None else []
    server = grpc.aio.server(
        interceptors=[*tracing.server_interceptors(), ErrorInterceptor(), *auth, *interceptors],
        options=server_options(config),
    )
    for service in services:
        service.add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [service.name for service in services]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    if port_hold is not None:
        port_hold.release()
    port = _add_port(server, config)
    await server.start()
    for name in ("", *names):  # "": the server as a whole, as the health protocol defines
        await health_servicer.set(name, SERVING)
    running = RunningServer(server, health_servicer, config, port, names)
    _started.add(running)
    log.info("serving %s on %s", ", ".join(names) or "(health only)", running.address)
    return running


# The servers this process started and has not stopped: ``run_service`` stops them when its
# service fails after starting one (a metrics port in use), so the process exits with its one
# error line: gRPC core aborted the process (SIGABRT) at exit with a server left running.
_started: set[RunningServer] = set()


class PortHold:
    """Holds a service's fixed gRPC port (bound, not listening: a client's connect is refused
    as if nothing were there) from its start until its server binds it (``start_server(port_hold=...)``): what the service binds to port
    0 meanwhile (its data planes) and its outgoing connections cannot be given that port. A
    worker restarted on its old port found it taken by its own data plane once in ~40
    restarts (session 24's probe) and exited "Address already in use". Best effort: nothing is
    held for port 0, or when the port cannot be bound now (the server's bind then says why)."""

    def __init__(self, host: str, port: int) -> None:
        self._socket: socket.socket | None = None
        if not port:
            return
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
            sock.bind(address)
        except OSError:
            sock.close()
            return
        self._socket = sock

    @property
    def held(self) -> bool:
        return self._socket is not None

    def release(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _add_port(server: grpc.aio.Server, config: RpcConfig) -> int:
    """Binds the server's port; one that is taken (or an address not this host's) is a
    ``ConfigError`` naming it (``run_service``: one ``error:`` line, exit 2), not gRPC's
    RuntimeError traceback (session 45's probe)."""
    address = _address(config.host, config.port)
    tls = config.security.tls if config.security is not None else None
    try:
        if tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, server_credentials(tls))
    except RuntimeError as exc:
        if "Failed to bind" not in str(exc):
            raise
        raise ConfigError(
            f"--port {config.port}: cannot listen on {address} (in use, or not this host's)"
        ) from None


async def _serve_and_clean_up(serve: Callable[[Any], Any], args: Any) -> None:
    try:
        await serve(args)
    finally:
        for running in list(_started):  # left running by a failure: stopped, at once
            with contextlib.suppress(Exception):
                await running.stop(0)
        for report in _stuck_reports:  # its stop has ended (``_arm_stuck_report``)
            report.cancel()


def _service_name(parse_args: Callable[..., Any]) -> str:
    """``banaserve-<role>`` of a ``services.<role>.__main__``'s parser: the name its traces
    carry too (a decode worker's is ``banaserve-decode``, whatever its ``--role``)."""
    module = getattr(parse_args, "__module__", "")
    if module == "__main__":  # python -m services.<role>: its spec has the name
        module = getattr(sys.modules["__main__"].__spec__, "name", "")
    parts = module.split(".")
    return f"banaserve-{parts[1]}" if len(parts) == 3 and parts[0] == "services" else "banaserve"


def run_service(
    parse_args: Callable[[list[str] | None], Any],
    serve: Callable[[Any], Any],
    argv: list[str] | None = None,
) -> int:
    """Every service's ``main``: flags, logging, then ``serve(args)`` until it returns. A
    configuration its flags make that the service refuses (``ConfigError``: a KV pool of -3
    blocks; ``ModelNotFoundError``: a model that is not there; ``ModelFormatError``: one whose
    files are damaged or disagree) is one ``error:`` line and exit status 2, as a bad flag is,
    not a traceback."""
    global _dump_threads_when_stuck
    args = parse_args(argv)
    configure_logging(
        args.log_level, getattr(args, "log_format", "text"), _service_name(parse_args)
    )
    watch_parent()  # started by a launcher: stop once it is gone
    with contextlib.suppress(ValueError, OSError, AttributeError):  # a stderr with no fd
        # A crash in compiled code (gRPC's core, torch) says where each thread was, on stderr,
        # before the process dies of its signal: otherwise it dies without a word.
        faulthandler.enable()
    _dump_threads_when_stuck = True
    try:
        check_metrics_args(args)
        asyncio.run(_serve_and_clean_up(serve, args))
    except (ConfigError, ModelNotFoundError, ModelFormatError) as exc:
        log.error("error: %s", exc)
        return 2
    finally:
        faulthandler.cancel_dump_traceback_later()
        _dump_threads_when_stuck = False  # a caller that goes on (a test) serves in-process
        _stuck_reports.clear()
    return 0
