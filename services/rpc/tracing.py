"""OpenTelemetry for BanaServe's gRPC calls.

A process calls ``setup_tracing`` once, from its ``__main__`` (flags: ``add_tracing_args``,
``tracing_config``), and hands the resulting ``Tracing`` to ``services.rpc.server.start_server``
and ``services.rpc.channels.open_channel``. Those install OpenTelemetry's gRPC interceptors,
which put the caller's trace context into the call's metadata (W3C ``traceparent``) and open the
server span under it, so one request is one trace across router, prefill and decode. Inside a
handler the server span is the current span, so calls the handler makes to other services join
the same trace without any plumbing.

With ``exporter="none"`` no provider exists and no interceptor is installed: tracing off costs
nothing per call. Only BanaServe's own services are traced (health checks and reflection would
drown the traces that matter).

Every process names itself ``banaserve-<role>`` (``service_name``): ``banaserve-router``,
``banaserve-prefill``, ``banaserve-decode``, ``banaserve-kvstore``, ``banaserve-coordinator``.

Status. A call that ends with an error status marks its spans ERROR with
``rpc.grpc.status_code`` set to the status it ended with, on both sides, including the ends the
stock interceptors leave UNSET with code 0 (OK): a server handler cancelled because the
caller's deadline passed (DEADLINE_EXCEEDED) or because the caller cancelled (CANCELLED), a
handler that failed after its call had already ended so, and a client call its caller cancelled
(CANCELLED). Which server statuses are errors is OpenTelemetry's rule for gRPC server spans
(UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) plus CANCELLED;
the caller's own mistakes (INVALID_ARGUMENT, NOT_FOUND, ...) keep the status UNSET with their
code, and every non-OK code is an error on the client side.

Sampling. A new trace is recorded with probability ``sample_ratio`` (``--trace-sample-ratio``);
a span with a parent follows its parent's decision, so a trace is never recorded by halves and
a caller's sampled ``traceparent`` is always honoured. The periodic control-plane calls
(``PERIODIC_METHODS``: the coordinator's load feed and announcements, lease renewals, ``--watch``
polls, a worker's load report stream) never start a trace of their own: without a sampled
parent they are not recorded at all (they made over half of all spans, four root traces a
second); inside a sampled trace they are.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.grpc import filters
from opentelemetry.instrumentation.grpc._aio_client import (
    StreamStreamAioClientInterceptor,
    StreamUnaryAioClientInterceptor,
    UnaryStreamAioClientInterceptor,
    UnaryUnaryAioClientInterceptor,
)
from opentelemetry.instrumentation.grpc._aio_server import (
    OpenTelemetryAioServerInterceptor,
    _OpenTelemetryAioServicerContext,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.semconv._incubating.attributes.rpc_attributes import RPC_GRPC_STATUS_CODE
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from services.common.arg_types import non_negative
from services.common.config import TRACING_EXPORTERS, TracingConfig

TRACED_PREFIX = "banaserve."
SERVICE_NAME_PREFIX = "banaserve-"
# The instrumentation scope of the gRPC spans (as OpenTelemetry's own interceptors name it).
_SCOPE = "opentelemetry.instrumentation.grpc"
_SCHEMA = "https://opentelemetry.io/schemas/1.11.0"

# Calls a process makes on a timer, not for a request or a migration: each would be a trace of
# its own (module docstring). Full gRPC method names, as the gRPC spans are named.
PERIODIC_METHODS = frozenset(
    {
        # the coordinator's load feed (every 0.25 s) and announcements; ``workers`` listings
        "/banaserve.v1.RouterService/ListWorkers",
        # the coordinator's epoch announcements (every few seconds) and recovery
        "/banaserve.v1.MigrationWorkerService/List",
        # the coordinator's lease renewals (every --renew-interval)
        "/banaserve.v1.MigrationWorkerService/RenewLease",
        # ``migrations --watch``
        "/banaserve.v1.CoordinatorService/ListMigrations",
        # a worker's load report stream to the router: one call open for the worker's life
        # (each a span of hours, ended by the worker's stop; session 44's probe)
        "/banaserve.v1.RouterService/ReportLoad",
    }
)

# A server span of a call that ended so is ERROR: OpenTelemetry's rule for gRPC server spans,
# and CANCELLED (module docstring).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.CANCELLED,
    }
)
# Slack between gRPC core's deadline and ``time_remaining``'s wall clock.
_DEADLINE_SLACK_S = 0.05


def add_tracing_args(p: argparse.ArgumentParser) -> None:
    """Every service's tracing flags."""
    p.add_argument(
        "--tracing",
        choices=TRACING_EXPORTERS,
        default="none",
        help="where spans go: nowhere (default), stderr as JSON, or an OTLP/gRPC collector",
    )
    p.add_argument("--otlp-endpoint", default="", help="HOST:PORT of the collector (otlp)")
    p.add_argument(
        "--trace-sample-ratio",
        type=non_negative(float, at_most=1.0),
        default=1.0,
        metavar="R",
        help="share of new traces recorded, 0..1 (default 1: all); a call with a parent "
        "follows its parent's decision, so a client's sampled traceparent is always honoured",
    )


def tracing_config(args: argparse.Namespace, role: str) -> TracingConfig:
    """The config ``add_tracing_args``'s flags give the service ``role`` (named
    ``banaserve-<role>`` in its spans)."""
    return TracingConfig(
        exporter=args.tracing,
        otlp_endpoint=args.otlp_endpoint,
        service_name=SERVICE_NAME_PREFIX + role,
        sample_ratio=args.trace_sample_ratio,
    )


@dataclass(frozen=True)
class Tracing:
    """A tracer provider, or none when tracing is off."""

    provider: TracerProvider | None = None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def server_interceptors(self) -> list[Any]:
        if self.provider is None:
            return []
        return [ServerInterceptor(self._tracer(), filter_=filters.service_prefix(TRACED_PREFIX))]

    def client_interceptors(self) -> list[Any]:
        if self.provider is None:
            return []
        tracer, only = self._tracer(), filters.service_prefix(TRACED_PREFIX)
        return [kind(tracer, filter_=only) for kind in _CLIENT_INTERCEPTORS]

    def _tracer(self) -> trace.Tracer:
        return trace.get_tracer(_SCOPE, tracer_provider=self.provider, schema_url=_SCHEMA)

    def shutdown(self) -> None:
        """Flushes buffered spans; call once when the process stops serving."""
        if self.provider is not None:
            self.provider.shutdown()


DISABLED = Tracing()


# -- status of calls that end without the stock interceptors noticing ------------------------


def _mark(span: Span, code: grpc.StatusCode, details: str, error: bool = True) -> None:
    span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
    if error:
        span.set_status(Status(StatusCode.ERROR, f"{code}:{details}"))


def _ended_by_caller(context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str]:
    """Why a call ended before its handler did: its deadline passed, else its caller (or the
    server's stop) cancelled it."""
    left = context.time_remaining()
    if left is not None and left <= _DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed"
    return grpc.StatusCode.CANCELLED, "the call was cancelled"


class _Settle:
    """The end of one server call: the status its span gets."""

    def __init__(self, span: Span, raw: grpc.aio.ServicerContext) -> None:
        self.span = span
        self.raw = raw
        self.context = _OpenTelemetryAioServicerContext(raw, span)

    def __call__(self, exc: BaseException | None) -> None:
        code = self.context._self_code  # what the handler aborted with or set, OK if nothing
        details = self.context._self_details or code.value[1]
        if isinstance(exc, asyncio.CancelledError) or (
            code is grpc.StatusCode.OK and _done(self.raw)
        ):
            # Cancelled at the deadline or by the caller; or the handler went on after that and
            # ended without a status of its own (``status.abort_with`` aborts no ended call).
            code, details = _ended_by_caller(self.raw)
        elif code is grpc.StatusCode.OK and exc is not None and not _is_abort(exc):
            code, details = grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"
        if code is not grpc.StatusCode.OK:
            _mark(self.span, code, details, error=code in SERVER_ERRORS)


def _done(context: grpc.aio.ServicerContext) -> bool:
    try:
        return bool(context.done())
    except Exception:  # a context of another make
        return False


def _is_abort(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AbortError) or type(exc) is Exception


class ServerInterceptor(OpenTelemetryAioServerInterceptor):
    """OpenTelemetry's aio server interceptor, with the status of every way a call ends
    (module docstring)."""

    def _intercept_aio_server_unary(self, behavior: Any, handler_call_details: Any) -> Any:
        async def unary(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            # (the caller's context current before the span starts: its parent)
            with (
                self._set_remote_context(context),
                self._start_span(handler_call_details, context) as span,
            ):
                settle = _Settle(span, context)
                try:
                    result = await behavior(request_or_iterator, settle.context)
                except BaseException as exc:  # recorded as the span's event on its way out
                    settle(exc)
                    raise
                settle(None)
                return result

        return unary

    def _intercept_aio_server_stream(self, behavior: Any, handler_call_details: Any) -> Any:
        async def stream(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            with (
                self._set_remote_context(context),
                self._start_span(handler_call_details, context) as span,
            ):
                settle = _Settle(span, context)
                try:
                    async for response in behavior(request_or_iterator, settle.context):
                        yield response
                except GeneratorExit:  # abandoned at a yield: grpc ended the call
                    settle(asyncio.CancelledError())
                    raise
                except BaseException as exc:  # recorded as the span's event on its way out
                    settle(exc)
                    raise
                settle(None)

        return stream


class _ClientStatus:
    """The stock aio client interceptors' span handling, plus the calls their caller cancels
    (a CancelledError is no Exception: the span ended UNSET, or a unary one never ended)."""

    async def _wrap_unary_response(self, continuation: Any, span: Span) -> Any:
        try:
            return await super()._wrap_unary_response(continuation, span)  # type: ignore[misc]
        except asyncio.CancelledError:
            # Before the done callback that ends the span was added: end it here.
            _mark(span, grpc.StatusCode.CANCELLED, "cancelled by the caller")
            span.end()
            raise

    async def _wrap_stream_response(self, span: Span, call: Any) -> Any:
        try:
            async for response in call:
                if self._response_hook:  # type: ignore[attr-defined]
                    self._call_response_hook(span, response)  # type: ignore[attr-defined]
                yield response
        except asyncio.CancelledError:
            _mark(span, grpc.StatusCode.CANCELLED, "cancelled by the caller")
            raise
        except GeneratorExit:  # the caller stopped reading before the stream ended
            if not call.done():
                _mark(span, grpc.StatusCode.CANCELLED, "abandoned by the caller")
            raise
        except Exception as exc:
            self.add_error_details_to_span(span, exc)  # type: ignore[attr-defined]
            raise
        finally:
            span.end()


class _UnaryUnary(_ClientStatus, UnaryUnaryAioClientInterceptor):
    pass


class _UnaryStream(_ClientStatus, UnaryStreamAioClientInterceptor):
    pass


class _StreamUnary(_ClientStatus, StreamUnaryAioClientInterceptor):
    pass


class _StreamStream(_ClientStatus, StreamStreamAioClientInterceptor):
    pass


_CLIENT_INTERCEPTORS = (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)


# -- sampling -------------------------------------------------------------------------------


class PeriodicCallsStartNoTrace(Sampler):
    """The root sampler: a span without a parent named one of ``PERIODIC_METHODS`` is dropped;
    any other goes to ``root`` (``ParentBased`` decides every span that has a parent)."""

    def __init__(self, root: Sampler, periodic: frozenset[str] = PERIODIC_METHODS) -> None:
        self._root = root
        self._periodic = periodic

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if name in self._periodic:
            return SamplingResult(Decision.DROP, None, trace_state)
        return self._root.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"PeriodicCallsStartNoTrace{{{self._root.get_description()}}}"


def sampler(sample_ratio: float = 1.0) -> Sampler:
    """A child follows its parent's decision, so a trace is never recorded by halves; a new
    trace is recorded with probability ``sample_ratio``, never for a periodic call."""
    return ParentBased(PeriodicCallsStartNoTrace(TraceIdRatioBased(sample_ratio)))


def _processor(config: TracingConfig) -> SpanProcessor:
    if config.exporter == "console":
        # Spans go to stderr: stdout belongs to the CLI's output contract. Unbatched, so a
        # span is visible as soon as it ends.
        # One span a line, compact JSON: the SDK's default is a pretty-printed object of ~35
        # lines, which broke ``--log-format json``'s one object a line (session 45's probe).
        return SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr, formatter=_span_line))
    # Imported here: the OTLP exporter pulls in its own protobuf modules.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True))


def _span_line(span: ReadableSpan) -> str:
    return span.to_json(indent=None) + "\n"


def make_provider(
    processor: SpanProcessor, service_name: str, sample_ratio: float = 1.0
) -> TracerProvider:
    """A provider exporting through ``processor``; tests pass an in-memory exporter's."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=sampler(sample_ratio),
    )
    provider.add_span_processor(processor)
    return provider


def setup_tracing(config: TracingConfig, *, set_global: bool = True) -> Tracing:
    """Builds the process's tracing from config; ``set_global`` also makes it the API default
    (so ``trace.get_tracer`` in the cores records into it). OpenTelemetry accepts a global
    provider once per process."""
    if config.exporter == "none":
        return DISABLED
    provider = make_provider(_processor(config), config.service_name, config.sample_ratio)
    if set_global:
        trace.set_tracer_provider(provider)
    return Tracing(provider)


def tracing_with_exporter(
    exporter: SpanExporter, service_name: str = "banaserve", sample_ratio: float = 1.0
) -> Tracing:
    return Tracing(make_provider(SimpleSpanProcessor(exporter), service_name, sample_ratio))
