"""What every service's ``/metrics`` says (the endpoint: services/common/metrics_endpoint.py).

Lifecycle:
1. ``__main__`` builds its service, then hands these collectors to ``start_metrics``, whose
   endpoint runs on the service's own event loop, so every collector reads the service's state
   on the thread that changes it, as the Stats RPCs do;
2. collectors read what the service already keeps (the engine's counters, the router's
   registry, the kvstore pool) at scrape time: nothing is copied or updated per step;
3. the router's request histograms are the exception: the driver tells ``RequestMetrics`` about
   every request that ends (``RequestDriver.observer``), since a finished request leaves no
   state behind to read.

Names follow Prometheus conventions (``banaserve_`` prefix, base units, ``_total`` counters);
docs/deploy.md lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.migration_states import MigrationState
from services.coordinator.migration import MigrationKind

# Seconds: TTFT/E2E from ~1 ms (tiny models on a CPU) to minutes; TPOT from 0.1 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class EngineCollector(Collector):
    """A prefill, decode or mixed worker: its engine's KV pool, queues and hosted work
    (``Engine.stats``, safe from any thread) and the worker's step meter, if it has one."""

    def __init__(self, role: str, model: str, engine: Any, worker: Any = None) -> None:
        self._labels = [role, model]
        self._engine, self._meter = engine, getattr(worker, "meter", None)
        self._worker = worker

    def collect(self) -> Iterable[Metric]:
        s = self._engine.stats()
        labels = ["role", "model"]
        blocks = _gauge("banaserve_worker_kv_blocks", "KV blocks by state", [*labels, "state"])
        blocks.add_metric([*self._labels, "used"], s["num_blocks"] - s["num_free_blocks"])
        blocks.add_metric([*self._labels, "free"], s["num_free_blocks"])
        blocks.add_metric([*self._labels, "cached"], s["num_cached_blocks"])
        yield blocks
        for key, name, doc in (
            ("num_running", "banaserve_worker_running_seqs", "sequences being computed"),
            ("num_waiting", "banaserve_worker_waiting_seqs", "sequences queued for a step"),
            ("num_importing", "banaserve_worker_importing_seqs", "sequences receiving KV"),
            ("num_hosted_seqs", "banaserve_worker_hosted_seqs", "sequences hosted for a peer"),
            ("num_hosted_blocks", "banaserve_worker_hosted_kv_blocks", "KV blocks hosted"),
            (
                "num_hosted_layer_blocks",
                "banaserve_worker_hosted_layer_kv_blocks",
                "KV blocks in use for layers hosted for a peer (their own pools)",
            ),
        ):
            if key in s:
                gauge = _gauge(name, doc, labels)
                gauge.add_metric(self._labels, s[key])
                yield gauge
        for key, name, doc in (
            ("num_preemptions", "banaserve_worker_preemptions",
             "sequences preempted (KV freed, recomputed)"),
            ("num_overlapped_steps", "banaserve_worker_overlapped_steps",
             "steps started while another was in flight (two step streams under a layer split)"),
        ):  # fmt: skip
            if key in s:
                counter = CounterMetricFamily(name, doc, labels=labels)
                counter.add_metric(self._labels, s[key])
                yield counter
        hosted = _gauge("banaserve_worker_hosted_layers", "decoder layers run for peers", labels)
        hosted.add_metric(self._labels, self._engine.snapshot.num_hosted_layers)
        yield hosted
        write_backs = getattr(self._worker, "write_back_stats", None)
        if write_backs is not None:  # a prefill worker with a store (write_backs.py)
            counter = CounterMetricFamily(
                "banaserve_prefill_store_write_backs", "store write-backs by outcome",
                labels=[*labels, "outcome"],
            )  # fmt: skip
            counter.add_metric([*self._labels, "done"], write_backs.num_done)
            counter.add_metric([*self._labels, "dropped"], write_backs.num_dropped)
            counter.add_metric([*self._labels, "evicted"], write_backs.num_evicted)
            counter.add_metric([*self._labels, "not_reused"], write_backs.num_not_reused)
            yield counter
            gauge = _gauge("banaserve_prefill_store_write_back_pending_bytes",
                           "KV waiting to be written back to the store", labels)  # fmt: skip
            gauge.add_metric(self._labels, write_backs.num_bytes_pending)
            yield gauge
        if self._meter is not None:
            step_s, busy = self._meter.snapshot()
            for name, doc, value in (
                ("banaserve_worker_step_seconds", "mean step time over the load window", step_s),
                ("banaserve_worker_busy_ratio", "share of the load window spent in steps", busy),
            ):
                gauge = _gauge(name, doc, labels)
                gauge.add_metric(self._labels, value)
                yield gauge


class RouterCollector(Collector):
    """The router's registry: workers by role and status, and each worker's load estimate."""

    def __init__(self, router: Any) -> None:
        self._router = router

    def collect(self) -> Iterable[Metric]:
        workers = self._router.workers()
        counts: dict[tuple[str, str], int] = {}
        for w in workers:
            key = (w.role.name.lower(), w.status.name.lower())
            counts[key] = counts.get(key, 0) + 1
        total = _gauge("banaserve_router_workers", "registered workers", ["role", "status"])
        for (role, status), n in sorted(counts.items()):
            total.add_metric([role, status], n)
        yield total
        inflight = _gauge(
            "banaserve_router_inflight_assignments",
            "requests sent to a worker that no report of its has counted yet",
        )
        inflight.add_metric([], self._router.num_inflight())
        yield inflight
        # Held for want of KV room (services/router/waiting.py): their TTFT runs meanwhile, and
        # no other metric showed them (probe, session 44: TTFTs up to 4.5 s, nothing queued).
        waiting = _gauge(
            "banaserve_router_requests_waiting_for_room",
            "requests held because no decode worker has room for them now",
        )
        waiting.add_metric([], self._router.num_waiting_for_room())
        yield waiting
        labels = ["worker_id", "role"]
        per_worker = {
            "banaserve_router_worker_queued_tokens": ("prefill tokens queued or assigned", []),
            "banaserve_router_worker_kv_blocks_free": ("free KV blocks (estimate)", []),
            "banaserve_router_worker_kv_blocks_used": ("used KV blocks (estimate)", []),
            "banaserve_router_worker_utilisation_ratio": ("max(compute, memory) share", []),
            "banaserve_router_worker_waiting_for_room": (
                "requests held that this worker could hold once its running ones end",
                [],
            ),
        }
        for w in workers:
            values = (w.num_queued_tokens, w.num_free_blocks, w.num_used_blocks, w.utilisation,
                      self._router.waiting_for_room(w.worker_id))  # fmt: skip
            for (_, samples), value in zip(per_worker.values(), values, strict=True):
                samples.append(([w.worker_id, w.role.name.lower()], value))
        for name, (doc, samples) in per_worker.items():
            gauge = _gauge(name, doc, labels)
            for label_values, value in samples:
                gauge.add_metric(label_values, value)
            yield gauge


# How a request ended (services/router/driver_types.py ``Outcome``): every value is exported
# from the start, at 0, as are the token kinds, so that ``rate()`` and alerts work before the
# first request of each kind.
REQUEST_OUTCOMES = ("stop", "length", "abort", "cancelled", "error", "refused")
TOKEN_KINDS = ("prompt", "completion", "cached")


class RequestMetrics:
    """The router's per-request figures, fed by the driver as each request ends
    (``RequestObserver``): one outcome per request, and what it did however it ended (the
    tokens it delivered, its TTFT if a first token reached its caller, KV moved)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "banaserve_router_requests", "requests ended, by outcome", ["outcome"], registry=r
        )
        self.ttft = Histogram(
            "banaserve_router_ttft_seconds",
            "time to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "banaserve_router_tpot_seconds",
            "time per output token after the first",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "banaserve_router_e2e_seconds",
            "arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_transfer = Histogram(
            "banaserve_router_kv_transfer_seconds",
            "prefill-to-decode KV transfer time per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_bytes = Counter(
            "banaserve_router_kv_transfer_bytes", "KV bytes moved prefill to decode", registry=r
        )
        self.tokens = Counter("banaserve_router_tokens", "tokens by kind", ["kind"], registry=r)
        self.resumes = Counter(
            "banaserve_router_resumes",
            "requests resumed on another worker after theirs was lost mid-stream",
            registry=r,
        )
        for outcome in REQUEST_OUTCOMES:
            self.requests.labels(outcome)
        for kind in TOKEN_KINDS:
            self.tokens.labels(kind)

    def ended(self, outcome: str, event: Any) -> None:
        """A request ended with ``outcome`` (one of ``REQUEST_OUTCOMES``); ``event``: the
        ``Finished`` of what it did (None: refused before any work). TTFT, E2E and TPOT are
        observed for a request whose first token reached its caller (``ttft_s`` > 0),
        whatever its outcome; TPOT is ``(e2e - ttft) / (completion tokens - 1)``."""
        self.requests.labels(str(outcome)).inc()
        if event is None:
            return
        t = event.timings
        n = event.num_completion_tokens
        self.tokens.labels("prompt").inc(event.num_prompt_tokens)
        self.tokens.labels("completion").inc(n)
        self.tokens.labels("cached").inc(event.num_cached_tokens)
        if n > 0 and t.ttft_s > 0:
            self.ttft.observe(t.ttft_s)
            self.e2e.observe(t.total_s)
            if n > 1:
                self.tpot.observe((t.total_s - t.ttft_s) / (n - 1))
        if t.kv_bytes:
            self.kv_bytes.inc(t.kv_bytes)
            self.kv_transfer.observe(t.kv_transfer_s)

    def resumed(self) -> None:
        self.resumes.inc()

    def superseded(self, num_completion_tokens: int) -> None:
        self.tokens.labels("completion").inc(num_completion_tokens)

    def collectors(self) -> list[Collector]:
        return [self.registry]  # a registry collects everything registered with it


class KVStoreCollector(Collector):
    """A kvstore node: its pool (host memory and disk tier) and its lookups' hits and misses.

    Hits and misses are counted by wrapping the node's ``lookup`` at wiring time: the node
    keeps no such counter, and a lookup leaves nothing behind to read.
    """

    def __init__(self, node: Any) -> None:
        self._node = node
        self.num_hit_blocks = 0
        self.num_missed_blocks = 0
        lookup: Callable[..., Any] = node.lookup

        async def counted(hashes: Sequence[Any]) -> Any:
            found = await lookup(hashes)  # a LookupResult (services/kvstore/core.py)
            self.num_hit_blocks += len(found.node_ids)
            self.num_missed_blocks += len(hashes) - len(found.node_ids)
            return found

        node.lookup = counted

    def collect(self) -> Iterable[Metric]:
        s = self._node.stats()
        for name, doc, value in (
            ("banaserve_kvstore_memory_used_bytes", "host memory held by blocks", s.num_bytes_used),
            ("banaserve_kvstore_blocks", "blocks held in memory", s.num_blocks),
            ("banaserve_kvstore_committed_blocks", "blocks readable", s.num_committed_blocks),
            ("banaserve_kvstore_pinned_blocks", "blocks pinned by readers", s.num_pinned_blocks),
            ("banaserve_kvstore_reservations", "writes in progress", s.num_reservations),
            ("banaserve_kvstore_disk_blocks", "blocks on the disk tier", s.num_disk_blocks),
            ("banaserve_kvstore_disk_used_bytes", "bytes on the disk tier", s.num_disk_bytes),
        ):
            gauge = _gauge(name, doc)
            gauge.add_metric([], value)
            yield gauge
        for name, doc, value in (
            ("banaserve_kvstore_evictions", "blocks evicted from memory", s.num_evicted),
            ("banaserve_kvstore_promotions", "blocks read back from disk", s.num_promoted),
            (
                "banaserve_kvstore_duplicates_dropped",
                "blocks dropped as another node holds them in the index",
                self._node.num_duplicates_dropped,
            ),
            ("banaserve_kvstore_lookup_hit_blocks", "looked-up blocks found", self.num_hit_blocks),
            (
                "banaserve_kvstore_lookup_miss_blocks",
                "looked-up blocks not found",
                self.num_missed_blocks,
            ),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], value)
            yield counter


class CoordinatorCollector(Collector):
    """The coordinator's migrations: how many by kind and state in its table
    (``Coordinator.list``, recovered ones included), and, over every migration it has known
    (``Coordinator.totals``: those its table forgot too), the bytes they moved and the seconds
    they spent in each state (a state still open counts up to now, on its clock)."""

    def __init__(self, coordinator: Any) -> None:
        self._coordinator = coordinator

    def collect(self) -> Iterable[Metric]:
        count = _gauge("banaserve_coordinator_migrations", "migrations", ["kind", "state"])
        moved = CounterMetricFamily(
            "banaserve_coordinator_migration_bytes",
            "bytes migrations moved",
            labels=["kind", "what"],
        )
        seconds = CounterMetricFamily(
            "banaserve_coordinator_migration_state_seconds",
            "seconds migrations spent in each state",
            labels=["kind", "state"],
        )
        # Every kind and state from 0, before the first migration (a dashboard or an alert on
        # these sees 0, not "no data"; session 45's probe), as the router's outcomes.
        kinds = [kind.value for kind in MigrationKind]
        states = [(kind, state.value) for kind in kinds for state in MigrationState]
        counts: dict[tuple[str, str], int] = dict.fromkeys(states, 0)
        for m in self._coordinator.list():
            kind = m.kind.value
            counts[kind, m.state.value] = counts.get((kind, m.state.value), 0) + 1
        # Counters: every migration it has known, the ones its bounded table forgot included.
        num_bytes, durations = self._coordinator.totals()
        whats = [(kind, what) for kind in kinds for what in ("weights", "kv")]
        num_bytes = {**dict.fromkeys(whats, 0), **num_bytes}
        durations = {**dict.fromkeys(states, 0.0), **durations}
        for family, values in ((count, counts), (moved, num_bytes), (seconds, durations)):
            for labels, value in sorted(values.items()):
                family.add_metric(list(labels), value)
            yield family


class AutoMigrationCollector(Collector):
    """The coordinator's automatic mode (services/coordinator/auto.py ``DecisionStats``): its
    decisions by kind and result, the alternatives it rejected, and the utilisations it saw
    at its last decision."""

    def __init__(self, stats: Any) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self._stats
        decisions = CounterMetricFamily(
            "banaserve_coordinator_decisions",
            "automatic decisions, by kind and whether the coordinator took them",
            labels=["kind", "result"],
        )
        for (kind, result), n in sorted(s.num_decisions.items()):
            decisions.add_metric([kind, result], n)
        yield decisions
        for name, doc, value, family in (
            ("banaserve_coordinator_rejected_alternatives", "alternatives rejected",
             s.num_rejected, CounterMetricFamily),
            ("banaserve_coordinator_decision_ticks", "decisions taken (every interval)",
             s.num_ticks, CounterMetricFamily),
            ("banaserve_coordinator_utilisation_gap_ratio", "max U - min U at the last tick",
             s.gap, GaugeMetricFamily),
            ("banaserve_coordinator_last_decision_timestamp_seconds",
             "coordinator clock at the last action (0: none)", s.last_decision_at,
             GaugeMetricFamily),
        ):  # fmt: skip
            metric = family(name, doc)
            metric.add_metric([], value)
            yield metric
        utilisation = _gauge(
            "banaserve_coordinator_worker_utilisation_ratio",
            "utilisation as the policy saw it at its last tick",
            ["worker_id", "part"],
        )
        for worker, u in sorted(s.utilisations.items()):
            for part, value in (("compute", u.compute), ("memory", u.memory), ("max", u.value)):
                utilisation.add_metric([worker, part], value)
        yield utilisation
