"""One log format for every service process (stderr; stdout is kept for the LISTENING line).

``--log-level`` (``BANASERVE_LOG_LEVEL``, INFO) and ``--log-format`` (``BANASERVE_LOG_FORMAT``):

- ``text`` (the default): ``2026-12-07 09:30:00,123 INFO services.rpc.server: message``;
- ``json``: one JSON object a line, for a log collector (DESIGN.md §7, "structured logs"):
  ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``service`` (``banaserve-<role>``, as
  its traces are named), ``logger``, ``message``, ``pid``, and, when the record was logged
  inside a recorded trace span (a request, a migration), its ``trace_id`` and ``span_id`` in
  the hex form trace viewers show, so a log line leads to its trace; ``exc`` with the
  traceback of a logged exception.

Both are read from the environment as defaults, so ``BANASERVE_LOG_FORMAT=json banaserve up``
reaches every service it starts (docs/deploy.md, "Logs").
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _level(value: str) -> str:
    level = value.strip().upper()
    if level not in LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LEVELS)}, got {value!r}")
    return level


def _log_format(value: str) -> str:
    fmt = value.strip().lower()
    if fmt not in FORMATS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(FORMATS)}, got {value!r}")
    return fmt


def add_logging_args(p: argparse.ArgumentParser) -> None:
    def env(name: str, default: str) -> str:  # set but empty (``VAR=``) is unset, as compose has it
        return os.environ.get(name, "").strip() or default

    p.add_argument(
        "--log-level",
        type=_level,
        default=env("BANASERVE_LOG_LEVEL", "INFO"),
        help=f"{', '.join(LEVELS)}, any case (default INFO, or $BANASERVE_LOG_LEVEL)",
    )
    p.add_argument(
        "--log-format",
        type=_log_format,
        default=env("BANASERVE_LOG_FORMAT", "text"),
        help="text, or json: one object a line with the trace and span ids of the request or "
        "migration it concerns (default text, or $BANASERVE_LOG_FORMAT)",
    )


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON (module docstring)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        entry.update(_trace_ids())
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def _trace_ids() -> dict[str, str]:
    """The current span's ids, if it is a recorded one (none: ``{}``). Logged on the thread
    and in the task that runs the span, as OpenTelemetry's context is."""
    try:
        from opentelemetry import trace
    except ImportError:  # a torch-only tool that logs: no tracing installed
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def configure_logging(level: str, log_format: str = "text", service: str = "banaserve") -> None:
    """Every record at ``level`` and above to stderr, as ``log_format`` says (module
    docstring); ``service``: the name a JSON line carries."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
