"""Structured logs (``--log-format json``, services/common/logs.py): one JSON object a line
with the trace and span of the request it concerns; bad ``--log-level``/``--log-format`` values
are usage errors, not tracebacks (session 45: ``--log-level foo`` was a ValueError traceback)."""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.logs import JsonFormatter, configure_logging
from services.rpc.gen.banaserve.v1.router_pb2 import AbortRequest
from services.rpc.gen.banaserve.v1.router_pb2_grpc import RouterServiceStub
from services.rpc.tracing import tracing_with_exporter

ROOT = Path(__file__).parents[2]
SERVICES = ("router", "prefill", "decode", "kvstore", "coordinator")


def json_lines(logger_name: str, emit) -> list[dict]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("banaserve-test"))
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_carries_time_level_service_logger_message_and_pid():
    [entry] = json_lines("t.plain", lambda log: log.warning("worker %s lost: %s", "d0", "Ünïcode"))
    assert entry["ts"].endswith("Z") and entry["ts"][10] == "T" and len(entry["ts"]) == 24
    assert {k: entry[k] for k in ("level", "service", "logger", "message", "pid")} == {
        "level": "WARNING",
        "service": "banaserve-test",
        "logger": "t.plain",
        "message": "worker d0 lost: Ünïcode",
        "pid": os.getpid(),
    }
    assert "trace_id" not in entry and "exc" not in entry


def test_an_exception_goes_in_exc_and_a_newline_stays_in_one_line():
    def emit(log):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed\nbadly")

    stream_lines = json_lines("t.exc", emit)
    [entry] = stream_lines
    assert entry["message"] == "failed\nbadly"
    assert "RuntimeError: boom" in entry["exc"] and "Traceback" in entry["exc"]


def test_a_line_logged_inside_a_recorded_span_names_its_trace_and_span():
    exporter = InMemorySpanExporter()
    tracer = tracing_with_exporter(exporter).provider.get_tracer("t")

    def emit(log):
        with tracer.start_as_current_span("request"):
            log.info("inside")
        log.info("outside")

    inside, outside = json_lines("t.span", emit)
    [span] = exporter.get_finished_spans()
    assert inside["trace_id"] == f"{span.context.trace_id:032x}"
    assert inside["span_id"] == f"{span.context.span_id:016x}"
    assert "trace_id" not in outside


@pytest.mark.parametrize("service", SERVICES)
def test_bad_log_flags_are_usage_errors_and_the_environment_gives_the_defaults(
    service, monkeypatch, capsys
):
    parse_args = importlib.import_module(f"services.{service}.__main__").parse_args
    for flags, message in (
        (["--log-level", "foo"], "--log-level: expected one of DEBUG, INFO"),
        (["--log-format", "xml"], "--log-format: expected one of text, json"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(flags)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    monkeypatch.setenv("BANASERVE_LOG_FORMAT", "json")
    monkeypatch.setenv("BANASERVE_LOG_LEVEL", "warning")
    args = parse_args([])
    assert (args.log_format, args.log_level) == ("json", "WARNING")
    monkeypatch.setenv("BANASERVE_LOG_FORMAT", "")  # set but empty: unset, not an error
    monkeypatch.setenv("BANASERVE_LOG_LEVEL", " ")
    args = parse_args([])
    assert (args.log_format, args.log_level) == ("text", "INFO")


def test_a_service_process_logs_json_lines_named_by_its_role(tmp_path):
    """A real router process: every stderr line is one JSON object named banaserve-router."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.router", "--port", "0", "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "BANASERVE_HOME": str(tmp_path)},
    )
    try:
        assert proc.stdout.readline().startswith("LISTENING ")
        time.sleep(0.5)  # its signal handlers go in just after that line
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    entries = [json.loads(line) for line in err.splitlines()]
    assert entries and {e["service"] for e in entries} == {"banaserve-router"}
    assert any("draining" in e["message"] for e in entries)  # the SIGTERM's line, in JSON too


def test_with_console_tracing_every_stderr_line_is_still_one_json_object(tmp_path):
    """Probe, session 45: ``--tracing console`` printed each span as ~35 lines of indented
    JSON on the same stderr as the JSON logs. A real router, one call (a health check makes a
    span): every line parses, log lines and span lines alike."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.router", "--port", "0", "--log-format", "json",
         "--tracing", "console"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "BANASERVE_HOME": str(tmp_path)},
    )  # fmt: skip
    try:
        address = proc.stdout.readline().split()[1]
        # an Abort of no request: one span
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError):
            RouterServiceStub(channel).Abort(AbortRequest(request_id="none"), timeout=10)
        time.sleep(0.5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    entries = [json.loads(line) for line in err.splitlines()]
    spans = [e for e in entries if "context" in e]
    assert spans and all(e["context"]["trace_id"].startswith("0x") for e in spans)
    assert any(e.get("service") == "banaserve-router" for e in entries)


def test_text_stays_the_default_format(capsys):
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        configure_logging("INFO")
        logging.getLogger("t.text").info("hello")
        assert capsys.readouterr().err.rstrip().endswith(" INFO t.text: hello")
    finally:
        root.handlers[:] = saved
