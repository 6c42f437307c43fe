"""Which spans are recorded (services/rpc/tracing.py, "Sampling"), the tracing flags every
service takes, and the one naming scheme of the services in traces (``banaserve-<role>``)."""

from __future__ import annotations

import argparse
import asyncio
import importlib

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from services.common.config import TracingConfig
from services.rpc.tracing import (
    PERIODIC_METHODS,
    add_tracing_args,
    tracing_config,
    tracing_with_exporter,
)

LIST_WORKERS = "/banaserve.v1.RouterService/ListWorkers"
ROLES = ("router", "prefill", "decode", "kvstore", "coordinator")


def recorded(tracer, name, parent=None) -> bool:
    context = None if parent is None else trace.set_span_in_context(parent)
    span = tracer.start_span(name, context=context)
    span.end()
    return span.is_recording() or span.get_span_context().trace_flags.sampled


def remote_parent(sampled: bool) -> NonRecordingSpan:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else 0)
    return NonRecordingSpan(SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=flags))


def test_periodic_calls_start_no_trace_but_join_a_sampled_one():
    tracer = tracing_with_exporter(InMemorySpanExporter()).provider.get_tracer("t")
    assert {
        "/banaserve.v1.RouterService/ListWorkers",
        "/banaserve.v1.MigrationWorkerService/List",
        "/banaserve.v1.MigrationWorkerService/RenewLease",
        "/banaserve.v1.CoordinatorService/ListMigrations",
        "/banaserve.v1.RouterService/ReportLoad",
    } == PERIODIC_METHODS
    for name in PERIODIC_METHODS:
        assert not recorded(tracer, name)
        assert recorded(tracer, name, remote_parent(sampled=True))
        assert not recorded(tracer, name, remote_parent(sampled=False))
    # A request's calls of the same name on another service are no periodic poll.
    assert recorded(tracer, "/banaserve.v1.DecodeService/RenewLease")
    assert recorded(tracer, "/banaserve.v1.RouterService/Generate")


def test_the_sample_ratio_decides_new_traces_and_never_a_callers():
    tracing = tracing_with_exporter(InMemorySpanExporter(), sample_ratio=0.0)
    tracer = tracing.provider.get_tracer("t")
    assert not recorded(tracer, "/banaserve.v1.RouterService/Generate")
    assert recorded(tracer, "/banaserve.v1.RouterService/Generate", remote_parent(sampled=True))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_tracing_args(p)
    return p.parse_args(argv)


def test_tracing_flags_set_the_exporter_endpoint_and_sample_ratio():
    args = parse(["--tracing", "otlp", "--otlp-endpoint", "127.0.0.1:4317",
                  "--trace-sample-ratio", "0.25"])  # fmt: skip
    assert tracing_config(args, "decode") == TracingConfig(
        "otlp", "127.0.0.1:4317", service_name="banaserve-decode", sample_ratio=0.25
    )
    assert parse([]).trace_sample_ratio == 1.0
    for bad in ("1.5", "-0.1", "nan", "x"):
        with pytest.raises(SystemExit):
            parse(["--trace-sample-ratio", bad])


class Built(Exception):
    pass


@pytest.mark.parametrize("role", ROLES)
def test_every_service_takes_the_flags_and_names_itself_banaserve_role(role, monkeypatch):
    main = importlib.import_module(f"services.{role}.__main__")
    built: list[TracingConfig] = []

    def setup_tracing(config, **kwargs):
        built.append(config)
        raise Built  # nothing more of the service is needed

    monkeypatch.setattr(main, "setup_tracing", setup_tracing)
    args = main.parse_args(["--port", "0", "--tracing", "console", "--trace-sample-ratio", "0.5"])
    with pytest.raises(Built):
        asyncio.run(main.serve(args))
    assert [(c.service_name, c.sample_ratio, c.exporter) for c in built] == [
        (f"banaserve-{role}", 0.5, "console")
    ]
