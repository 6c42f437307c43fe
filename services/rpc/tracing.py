"""OpenTelemetry for BanaServe's gRPC calls.

A process calls ``setup_tracing`` once, from its ``__main__``, and hands the resulting
``Tracing`` to ``services.rpc.server.start_server`` and ``services.rpc.channels.open_channel``.
Those install OpenTelemetry's gRPC interceptors, which put the caller's trace context into the
call's metadata (W3C ``traceparent``) and open the server span under it, so one request is one
trace across router, prefill and decode. Inside a handler the server span is the current span,
so calls the handler makes to other services join the same trace without any plumbing.

With ``exporter="none"`` no provider exists and no interceptor is installed: tracing off costs
nothing per call. Only BanaServe's own services are traced (health checks and reflection would
drown the traces that matter).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
    filters,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from services.common.config import TracingConfig

TRACED_PREFIX = "banaserve."


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
        return [aio_server_interceptor(self.provider, filters.service_prefix(TRACED_PREFIX))]

    def client_interceptors(self) -> list[Any]:
        if self.provider is None:
            return []
        return aio_client_interceptors(self.provider, filters.service_prefix(TRACED_PREFIX))

    def shutdown(self) -> None:
        """Flushes buffered spans; call once when the process stops serving."""
        if self.provider is not None:
            self.provider.shutdown()


DISABLED = Tracing()


def _processor(config: TracingConfig) -> SpanProcessor:
    if config.exporter == "console":
        # Spans go to stderr: stdout belongs to the CLI's output contract. Unbatched, so a
        # span is visible as soon as it ends.
        return SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr))
    # Imported here: the OTLP exporter pulls in its own protobuf modules.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True))


def make_provider(
    processor: SpanProcessor, service_name: str, sample_ratio: float = 1.0
) -> TracerProvider:
    """A provider exporting through ``processor``; tests pass an in-memory exporter's."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        # A child follows its parent's decision, so a trace is never recorded by halves.
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
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


def tracing_with_exporter(exporter: SpanExporter, service_name: str = "banaserve") -> Tracing:
    return Tracing(make_provider(SimpleSpanProcessor(exporter), service_name))
