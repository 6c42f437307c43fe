"""One OpenTelemetry trace per migration (DESIGN.md §7).

Shape of a migration's trace:

    migration                      root: the whole life, from StartMigration to DONE/ABORTED
    ├── migration.copying          one span per state, opened when the state is entered and
    │   ├── migration.prepare        ended when it is left, with what the state moved
    │   │   └── (gRPC client span → the worker's server span and its own children)
    │   └── migration.copy
    ├── migration.switching
    ├── migration.active
    └── migration.aborted | migration.done   (zero length: the outcome)

The root starts a new trace (a migration outlives the StartMigration call) and links to the call
that asked for it; the ``migration.reverting`` and ``migration.aborted`` spans link to the call of
another trace that asked for them, if any (a Revert or Abort RPC, a policy decision). An ABORTED
migration's root (when this process opened it), the state span it was aborted in and its
``migration.aborted`` span are ERROR, with the reason as description; one that reverted (DONE)
stays UNSET. Worker calls run with their ``migration.<step>`` span current, so the gRPC
client interceptor (services/rpc/tracing.py) propagates it and the worker's spans join the
trace. The root's ids are kept in the migration's record: a restarted coordinator hangs the
spans of what it resumes under the same root, so the trace stays one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    Status,
    StatusCode,
    TraceFlags,
)

from services.coordinator.migration import Migration, MigrationState

OUTCOME = "migration.outcome"


def _identity(m: Migration) -> dict[str, Any]:
    return {
        "migration.id": m.migration_id,
        "migration.kind": m.kind.value,
        "migration.donor": m.donor,
        "migration.helper": m.helper,
        "migration.layers.start": m.start_layer,
        "migration.layers.end": m.end_layer,
        "migration.num_layers": len(m.layers),
    }


class MigrationSpans:
    """The open spans of the migrations this process runs."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._roots: dict[str, Span] = {}
        self._states: dict[str, Span] = {}

    def begin(self, m: Migration) -> None:
        """Opens the root span (a new trace) and the PLANNED span; records the root's ids."""
        caller = trace.get_current_span().get_span_context()
        links = [Link(caller)] if caller.is_valid else []
        root = self._tracer.start_span(
            "migration",
            context=otel_context.Context(),
            attributes=_identity(m),
            links=links,
            start_time=_ns(m.created_at),
        )
        self._roots[m.migration_id] = root
        ctx = root.get_span_context()
        if ctx.is_valid:
            m.trace_id, m.root_span_id = ctx.trace_id, ctx.span_id
        self._open_state(m, m.state, m.timings[-1].entered_at)

    def resume(self, m: Migration) -> None:
        """A migration found in the store: its current state gets a span again."""
        self._open_state(m, m.state, m.timings[-1].entered_at, resumed=True)

    def enter(self, m: Migration, left: MigrationState, now: float) -> None:
        """``m`` just moved from ``left`` to ``m.state`` at ``now``."""
        aborted = m.state is MigrationState.ABORTED
        if aborted:
            self._fail(self._states.get(m.migration_id), m)
        self._close_state(m, left, "aborted" if aborted else "ok", now)
        asked = m.state in (MigrationState.REVERTING, MigrationState.ABORTED)
        self._open_state(m, m.state, now, caller=self._caller(m) if asked else None)
        if m.state.terminal:
            if aborted:
                self._fail(self._states.get(m.migration_id), m)
                self._fail(self._roots.get(m.migration_id), m)
            self._close_state(m, m.state, m.state.value, now)
            self._close_root(m, now)

    def annotate(self, m: Migration, **attributes: Any) -> None:
        """Adds ``migration.<name>`` attributes to the current state's span."""
        span = self._states.get(m.migration_id)
        if span is not None:
            span.set_attributes({f"migration.{k}": v for k, v in attributes.items()})

    @contextmanager
    def call(self, m: Migration, step: str, worker: str, role: str) -> Iterator[Span]:
        """The span of one worker call, current while the call runs (so gRPC propagates it)."""
        parent = self._states.get(m.migration_id)
        ctx = trace.set_span_in_context(parent) if parent else self._root_context(m)
        attributes = {"migration.id": m.migration_id, "worker.id": worker, "worker.role": role}
        with self._tracer.start_as_current_span(
            f"migration.{step}", context=ctx, attributes=attributes
        ) as span:
            try:
                yield span
            except asyncio.CancelledError:  # an abort cut the call short: not an Exception
                span.set_status(Status(StatusCode.ERROR, "cancelled"))
                span.set_attribute(OUTCOME, "cancelled")
                raise

    def suspend(self, m: Migration, now: float) -> None:
        """The process stops serving while ``m`` lives: end (and so export) what is open."""
        self._close_state(m, m.state, "suspended", now)
        self._close_root(m, now, outcome="suspended")

    # -- internals ------------------------------------------------------------------------

    def _root_context(self, m: Migration) -> otel_context.Context:
        root = self._roots.get(m.migration_id)
        if root is not None:
            return trace.set_span_in_context(root)
        if not m.trace_id:
            return otel_context.Context()
        remote = SpanContext(
            m.trace_id, m.root_span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
        )
        return trace.set_span_in_context(NonRecordingSpan(remote))

    @staticmethod
    def _fail(span: Span | None, m: Migration) -> None:
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, m.reason or "aborted"))

    @staticmethod
    def _caller(m: Migration) -> SpanContext | None:
        """The span current where ``m`` changes state, if it is of another trace: the RPC or
        decision that asked for the change (its own worker calls are of the migration's)."""
        caller = trace.get_current_span().get_span_context()
        if caller.is_valid and caller.trace_id != m.trace_id:
            return caller
        return None

    def _open_state(
        self,
        m: Migration,
        state: MigrationState,
        now: float,
        resumed: bool = False,
        caller: SpanContext | None = None,
    ) -> None:
        attributes = {**_identity(m), "migration.state": state.value}
        if resumed:
            attributes["migration.resumed"] = True
        self._states[m.migration_id] = self._tracer.start_span(
            f"migration.{state.value}",
            context=self._root_context(m),
            attributes=attributes,
            links=[Link(caller)] if caller is not None else None,
            start_time=_ns(now),
        )

    def _close_state(self, m: Migration, state: MigrationState, outcome: str, now: float) -> None:
        span = self._states.pop(m.migration_id, None)
        if span is None:
            return
        entered = next(t for t in reversed(m.timings) if t.state is state).entered_at
        span.set_attributes({OUTCOME: outcome, "migration.duration_s": now - entered})
        span.end(end_time=_ns(now))

    def _close_root(self, m: Migration, now: float, outcome: str = "") -> None:
        root = self._roots.pop(m.migration_id, None)
        if root is None:
            return
        root.set_attributes(
            {
                OUTCOME: outcome or m.state.value,
                "migration.reason": m.reason,
                "migration.bytes.weights": m.num_weight_bytes,
                "migration.bytes.kv": m.num_kv_bytes,
                "migration.weights_s": m.weights_s,
                "migration.bytes.kv_copy": m.num_copy_kv_bytes,
                "migration.kv_copy_s": m.kv_copy_s,
                "migration.bytes.kv_switch": m.num_switch_kv_bytes,
                "migration.pause_s": m.switch_pause_s,
                "migration.num_sequences": m.num_sequences,
                "migration.weights_skipped": m.weights_skipped,
                "migration.duration_s": now - m.created_at,
            }
        )
        root.end(end_time=_ns(now))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
