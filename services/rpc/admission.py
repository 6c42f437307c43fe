"""Admission control on gRPC servers: the interceptor, the caller's identity, the flags.

The rules (method classes, queue, fair share, what is never shed) are
``services/common/admission.py``'s; this module applies them to a server's calls
(``AdmissionInterceptor``, one per server, through ``start_server(interceptors=...)``) and
builds their config from a service's flags and capacity (``add_admission_args``,
``admission_config``). A shed call ends RESOURCE_EXHAUSTED at once, with ``retry-after``
(whole seconds) in its trailing metadata.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common.admission import (
    CLIENT_METADATA_KEY,
    MAX_CLIENT_NAME,
    AdmissionConfig,
    AdmissionController,
    ClassLimits,
    HoldQuota,
    MethodClass,
    OverloadedError,
    Ticket,
    fair_share,
)
from services.rpc.deadlines import time_left
from services.rpc.handlers import HANDLER_KINDS
from services.rpc.security import caller_identity

log = logging.getLogger(__name__)

__all__ = [
    "AdmissionInterceptor",
    "add_admission_args",
    "admission_config",
    "admission_interceptors",
    "client_identity",
    "reservation_quota",
]


# -- on a gRPC server ------------------------------------------------------------------------


def authenticated_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's identity as ``services/rpc/security.py`` establishes it, or None where it
    establishes none: the bearer token the caller showed (``token:`` and a digest; verified
    where the server requires tokens), else its certificate's role under mutual TLS
    (``role:router``). The hook for authentication (issue 16, item 4): per-client caps follow
    whatever identity that module gives."""
    return caller_identity(context) or None


def client_identity(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for per-client caps: the authenticated identity, else the caller's own
    ``x-banaserve-client`` metadata value, else its peer address (module docstring)."""
    authenticated = authenticated_identity(context)
    if authenticated is not None:
        return authenticated
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_METADATA_KEY and isinstance(value, str) and value:
            return "client:" + value[:MAX_CLIENT_NAME]
    return "peer:" + context.peer()


def retry_after_header(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


async def _admit_or_abort(
    controller: AdmissionController,
    method_class: MethodClass,
    context: grpc.aio.ServicerContext,
    identify: Callable[[grpc.aio.ServicerContext], str],
) -> Ticket:
    try:
        return await controller.admit(method_class, identify(context), time_left(context))
    except OverloadedError as exc:
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            str(exc),
            trailing_metadata=(("retry-after", retry_after_header(exc.retry_after_s)),),
        )
        raise  # not reached: abort raises


def _admitted(
    behavior: Callable[..., Any],
    controller: AdmissionController,
    method_class: MethodClass,
    identify: Callable[[grpc.aio.ServicerContext], str],
) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            ticket = await _admit_or_abort(controller, method_class, context, identify)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                ticket.release()

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        ticket = await _admit_or_abort(controller, method_class, context, identify)
        try:
            return await behavior(request, context)
        finally:
            ticket.release()

    return unary


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Applies ``controller`` to every WORK and STREAM method of a server (``start_server``'s
    ``interceptors``); EXEMPT methods pass untouched."""

    def __init__(
        self,
        controller: AdmissionController,
        identify: Callable[[grpc.aio.ServicerContext], str] = client_identity,
    ) -> None:
        self.controller = controller
        self._identify = identify

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method_class = self.controller.classify(handler_call_details.method)
        if handler is None or method_class is MethodClass.EXEMPT:
            return handler
        kinds = (handler.request_streaming, handler.response_streaming)
        attr, make = HANDLER_KINDS[kinds]
        behavior = _admitted(getattr(handler, attr), self.controller, method_class, self._identify)
        return make(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


# -- flags -----------------------------------------------------------------------------------


def add_admission_args(parser: argparse.ArgumentParser, reservations: bool = False) -> None:
    """Admission flags; defaults derive from the service's capacity (``admission_config``)."""
    g = parser.add_argument_group("admission (docs/reliability.md, Overload)")
    g.add_argument(
        "--no-admission",
        dest="admission",
        action="store_false",
        help="admit every call (no limits, no queue)",
    )
    g.add_argument(
        "--admission-max-in-flight",
        type=int,
        default=None,
        metavar="N",
        help="request-starting calls at once (default: the service's capacity)",
    )
    g.add_argument(
        "--admission-max-queued",
        type=int,
        default=None,
        metavar="N",
        help="calls waiting for a slot (default: as many as in flight)",
    )
    g.add_argument(
        "--admission-max-wait",
        type=float,
        default=1.0,
        metavar="S",
        help="longest a queued call waits before RESOURCE_EXHAUSTED",
    )
    g.add_argument(
        "--admission-max-per-client",
        type=int,
        default=None,
        metavar="N",
        help="slots one client may hold, in flight and queued (default: 3/4)",
    )
    g.add_argument("--admission-retry-after", type=float, default=1.0, metavar="S")
    g.add_argument(
        "--admission-trusted-client",
        action="append",
        default=[],
        metavar="IDENTITY",
        help="exempt from the per-client caps (repeatable), e.g. role:router under mTLS",
    )
    if reservations:
        g.add_argument(
            "--max-reservations-per-client",
            type=int,
            default=None,
            metavar="N",
            help="KV reservations one client may hold (default: 3/4 of --max-num-seqs)",
        )


def admission_config(args: argparse.Namespace, capacity: int) -> AdmissionConfig:
    """The config from ``add_admission_args``'s flags; ``capacity``: what the service can
    hold at once (a decode worker's ``max_num_seqs``; ``ROUTER_CAPACITY``...)."""
    in_flight = args.admission_max_in_flight or capacity
    queued = in_flight if args.admission_max_queued is None else args.admission_max_queued
    per_client = args.admission_max_per_client or fair_share(in_flight)
    work = ClassLimits(in_flight, queued, args.admission_max_wait, per_client)
    base = AdmissionConfig.for_capacity(in_flight)
    trusted = frozenset(args.admission_trusted_client)
    return AdmissionConfig(work, base.stream, args.admission_retry_after, args.admission, trusted)


async def follow_capacity(
    capacity: Callable[[], int],
    controller: AdmissionController,
    args: argparse.Namespace,
    floor: int,
    interval_s: float,
) -> None:
    """Until cancelled: every ``interval_s``, the limits ``admission_config`` gives for
    ``max(floor, capacity())`` (the router: its decode-capable workers' sequences), applied
    when they change. Nothing when ``--admission-max-in-flight`` fixes the capacity."""
    if args.admission_max_in_flight is not None or not args.admission:
        return
    applied = floor
    while True:
        await asyncio.sleep(interval_s)
        now = max(floor, capacity())
        if now != applied:
            controller.reconfigure(admission_config(args, now))
            log.info("admission: %d request-starting calls at once (was %d)", now, applied)
            applied = now


def admission_interceptors(
    args: argparse.Namespace, capacity: int
) -> tuple[AdmissionInterceptor, ...]:
    """What ``start_server(interceptors=...)`` gets: one line per service's ``__main__``."""
    return (AdmissionInterceptor(AdmissionController(admission_config(args, capacity))),)


def reservation_quota(args: argparse.Namespace, max_num_seqs: int) -> HoldQuota | None:
    if not args.admission:
        return None
    cap = args.max_reservations_per_client or fair_share(max_num_seqs)
    return HoldQuota(cap, args.admission_retry_after, frozenset(args.admission_trusted_client))


# What a router or a kvstore node can hold at once: no engine bounds them. The router's is at
# least one default decode worker's sequences (``--max-num-seqs`` 64: the local cluster's), and
# follows the sum of its registered decode and mixed workers' ``max_num_seqs`` above that
# (``follow_capacity``). The kvstore's: several prefill workers' calls at once.
ROUTER_CAPACITY = 64
KVSTORE_CAPACITY = 256
