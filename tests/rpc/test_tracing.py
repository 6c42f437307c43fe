"""Tracing config, exporter setup, and trace context crossing a real gRPC call."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.common.config import TracingConfig
from services.common.errors import ConfigError
from services.rpc.gen.banaserve.v1 import decode_pb2, decode_pb2_grpc
from services.rpc.tracing import DISABLED, setup_tracing, tracing_with_exporter
from tests.rpc.helpers import serving


@pytest.mark.parametrize(
    "kwargs",
    [
        {"exporter": "jaeger"},
        {"exporter": "otlp"},  # no endpoint
        {"exporter": "console", "otlp_endpoint": "127.0.0.1:4317"},
        {"service_name": ""},
        {"sample_ratio": 1.5},
        # An endpoint that is not HOST:PORT: the service started and its spans failed unseen.
        {"exporter": "otlp", "otlp_endpoint": "not a url"},
        {"exporter": "otlp", "otlp_endpoint": "collector"},
        {"exporter": "otlp", "otlp_endpoint": "collector:0"},
        {"exporter": "otlp", "otlp_endpoint": "http://"},
        {"exporter": "otlp", "otlp_endpoint": "http://collector:99999"},
    ],
)
def test_tracing_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        TracingConfig(**kwargs)


@pytest.mark.parametrize(
    "endpoint",
    ["otel-collector:4317", "http://127.0.0.1:4317", "https://collector:4317/", "[::1]:4317"],
)
def test_an_otlp_endpoint_is_host_port_with_or_without_a_scheme(endpoint):
    assert TracingConfig(exporter="otlp", otlp_endpoint=endpoint).otlp_endpoint == endpoint


def test_none_installs_nothing():
    tracing = setup_tracing(TracingConfig(exporter="none"))
    assert tracing is DISABLED and not tracing.enabled
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
    tracing.shutdown()


@pytest.mark.parametrize(
    "config",
    [
        TracingConfig(exporter="console", service_name="decode"),
        # Nothing listens there: the exporter is built lazily and only fails (quietly) on export.
        TracingConfig(exporter="otlp", otlp_endpoint="127.0.0.1:1"),
    ],
)
def test_console_and_otlp_set_up(config):
    tracing = setup_tracing(config, set_global=False)
    assert tracing.enabled
    assert tracing.provider.resource.attributes["service.name"] == config.service_name
    assert len(tracing.server_interceptors()) == 1 and len(tracing.client_interceptors()) == 4
    tracing.shutdown()


def test_console_shuts_down_cleanly():
    setup_tracing(TracingConfig(exporter="console"), set_global=False).shutdown()


def test_trace_context_crosses_the_call():
    exporter = InMemorySpanExporter()
    tracing = tracing_with_exporter(exporter)
    tracer = tracing.provider.get_tracer("test")

    async def main():
        async with serving(tracing=tracing) as (_, channel, _):
            stub = decode_pb2_grpc.DecodeServiceStub(channel)
            with tracer.start_as_current_span("request") as root:
                await stub.Stats(decode_pb2.DecodeServiceStatsRequest())
            return root.get_span_context()

    root = asyncio.run(main())
    spans = {span.kind: span for span in exporter.get_finished_spans() if span.name != "request"}
    client, server = spans[SpanKind.CLIENT], spans[SpanKind.SERVER]
    assert {client.context.trace_id, server.context.trace_id} == {root.trace_id}
    assert client.parent.span_id == root.span_id
    assert server.parent.span_id == client.context.span_id
    assert server.name == "/banaserve.v1.DecodeService/Stats"
