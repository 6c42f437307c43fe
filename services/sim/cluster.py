"""A simulated cluster: the router, the workers and the coordinator's policy, in simulated time.

What is real (imported, not copied): the router (``services.router.core.Router``: registry,
load estimates, routing policy), each worker's ``Scheduler`` and ``BlockManager``
(``worker.py``), the load report type and its meter, the coordinator's ``Policy``, its
``LoadHistory`` and the ``Migration`` record with its state table, and the modes' cluster
shapes (``services.launcher.mode_spec``). What is modelled: step times, KV and activation
transfers, the phases of a migration (``profile.py``), and in ``banaserve`` the global KV
store's contents and fetch times (``store.py``).

A request's life (as services/router/attempt.py):

1. at its arrival it is routed (``Router.route``); no room now: tried again every ``retry_s``;
   it reaches its worker's queue the profile's ``serving.route_s`` later (the real router's
   median time per route, reservation included);
2. PD: the decode worker reserves the prompt's blocks (refused: ``mark_full``, try again),
   the prefill worker queues it; colocated: the mixed worker queues it;
3. its first token is its TTFT (the prefill worker streams it at once); on a PD pair the
   prompt's KV then travels (``latency + bytes / bandwidth``) and the sequence joins the
   decode worker's batch;
4. it ends at ``max_tokens`` (or the context); a request still running at the deadline fails.

Every ``report_interval_s`` each worker reports its load to the router; in ``banaserve`` mode
the coordinator reads the router every ``poll_interval_s`` into a ``LoadHistory`` and decides
every ``PolicyConfig.interval_s`` (``migrations.py`` plays the decisions out).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import ConfigError, ResourceExhaustedError
from services.coordinator.loadfeed import LoadHistory
from services.coordinator.policy import Policy, PolicyConfig, WorkerView
from services.launcher import Mode, mode_spec
from services.prefill.write_backs import WritePolicy
from services.router.core import NoRoomNowError, Router, RouterConfig, RouteRequest
from services.router.driver_types import DriverConfig
from services.router.registry import WorkerCapacity, WorkerRole
from services.sim.events import EventLoop
from services.sim.migrations import MigrationPlayer
from services.sim.profile import Profile
from services.sim.requests import SimRequest
from services.sim.routing import CachedRegistry, sim_router
from services.sim.store import DEFAULT_CAPACITY_BYTES, SimStore
from services.sim.worker import FINGERPRINT, SimWorker


@dataclass(frozen=True)
class SimSpec:
    mode: Mode
    num_workers: int
    num_prefill: int | None = None  # PD modes; default: half
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    layer_share: float | None = None  # None: the profile's measured share
    prefill_donors: bool = True
    transport: str | None = None  # a profile transport; None: the cluster's, else ucx, tcp
    num_kv_blocks: int | None = None  # per worker (``up --num-kv-blocks``); None: the profile's
    max_model_len: int = 2048
    deadline_s: float = math.inf  # requests unfinished then fail (bench compare: window + drain)
    report_interval_s: float = 0.1  # the workers' cadence
    poll_interval_s: float = 0.25  # the coordinator's ListWorkers cadence
    retry_s: float = 0.05  # a request without room waits this long before trying again
    sample_interval_s: float = 0.0  # > 0: keep utilisation samples (plots)
    store_capacity_bytes: int = DEFAULT_CAPACITY_BYTES  # banaserve's KV store (store.py)
    store_write_policy: WritePolicy = WritePolicy.REUSED  # as the prefill workers' default
    # The router's --local-prefill-max-tokens: D prefills a prompt its cache holds all but at
    # most this many tokens of (0: never)
    local_prefill_max_tokens: int = 0
    local_prefill_queue_tokens: int = 0  # --local-prefill-queue-tokens
    # Decode workers reuse the prompt blocks their prefix cache holds (--no-reuse-cached-prefix)
    reuse_cached_prefix: bool = True
    # The decode module's workers' (decode and mixed) --max-num-batched-tokens: the chunk of a
    # prompt they prefill in a step; None: the profile's
    decode_max_num_batched_tokens: int | None = None
    # and their --max-prefill-tokens-while-decoding (0: none)
    decode_max_prefill_tokens_while_decoding: int = 0


# Every simulated worker holds its KV pool as the engine's own BlockManager (~270 bytes a
# block): 128 workers of the shipped profile are 186,368 blocks; this bound (about 1 GiB) keeps
# a mistyped --workers or --num-kv-blocks from filling the machine's memory.
MAX_CLUSTER_BLOCKS = 1 << 22


def check_cluster_size(num_workers: int, num_kv_blocks: int) -> None:
    """Refuses a cluster whose workers' KV blocks, all together, are past ``MAX_CLUSTER_BLOCKS``."""
    if num_workers * num_kv_blocks > MAX_CLUSTER_BLOCKS:
        raise ConfigError(
            f"{num_workers:,} workers of {num_kv_blocks:,} KV blocks each are "
            f"{num_workers * num_kv_blocks:,} blocks; the simulator holds at most "
            f"{MAX_CLUSTER_BLOCKS:,} (fewer workers or a smaller --num-kv-blocks)"
        )


ROLE_NAMES = ((WorkerRole.PREFILL, "prefill"), (WorkerRole.DECODE, "decode"),
              (WorkerRole.MIXED, "mixed"))  # fmt: skip


class SimCluster:
    def __init__(self, spec: SimSpec, profile: Profile) -> None:
        self.spec, self.profile = spec, profile
        check_cluster_size(spec.num_workers, spec.num_kv_blocks or profile.num_kv_blocks)
        self.loop = EventLoop()
        # (a colocated cluster has no prefill workers to count: its spec's split is unused)
        split = None if spec.mode is Mode.COLOCATED else spec.num_prefill
        shape = mode_spec(spec.mode, spec.num_workers, split)
        config = RouterConfig(policy=shape.policy)
        router = Router(config, clock=self.loop.clock)
        self.router = sim_router(router, sweep_s=config.report_timeout_s / 2)
        self.registry: CachedRegistry = self.router._registry  # type: ignore[assignment]
        self._driver = DriverConfig(
            local_prefill_max_tokens=spec.local_prefill_max_tokens,
            local_prefill_queue_tokens=spec.local_prefill_queue_tokens,
        )  # where a PD request's prefill runs, as the router's driver decides it
        # The cluster's own KV transport (ucx by default) where the profile measured it.
        measured = shape.kv_transport if shape.kv_transport in profile.transports else None
        self.transport = profile.transport(spec.transport or measured)
        self.workers: dict[str, SimWorker] = {}
        counts = {WorkerRole.PREFILL: shape.num_prefill, WorkerRole.DECODE: shape.num_decode,
                  WorkerRole.MIXED: shape.num_mixed}  # fmt: skip
        for role, name in ROLE_NAMES:
            for i in range(counts[role]):
                self._add_worker(f"{name}-{i:03d}", role)
        # banaserve's global KV store, shared by its prefill workers (store.py).
        self.store: SimStore | None = None
        if shape.num_kvstore > 0:
            block_bytes = profile.kv_bytes_per_block_layer * profile.num_layers
            self.store = SimStore(max(1, spec.store_capacity_bytes // block_bytes))
            for w in self.workers.values():
                if w.role is not WorkerRole.MIXED:  # banaserve's PD workers' own costs
                    w.costs = profile.serving.costs(mixed=False, store=True)
                if w.role is WorkerRole.PREFILL:
                    w.store = self.store
                    w.store_transport = self.transport
                    w.write_policy = spec.store_write_policy
        self.requests: dict[str, SimRequest] = {}
        # Per prefill worker: the hand-offs of the prompts its step in flight completed.
        self._handoffs: dict[str, list[tuple[str, int, float]]] = {}
        self._unfinished: set[str] = set()  # of the current ``run``
        self.num_local_prefills = 0  # PD requests a decode worker prefilled (conditional)
        self._deadline = spec.deadline_s
        self._started = False
        self.samples: list[dict] = []
        self.migrations: MigrationPlayer | None = None
        if shape.coordinator:
            layer_share = spec.layer_share or profile.layer_share
            self.policy = Policy(spec.policy, layer_share)
            self.history = LoadHistory(keep_s=10.0)
            self.migrations = MigrationPlayer(self.loop, self.workers, profile, self.transport,
                                              self.policy)  # fmt: skip

    def _add_worker(self, worker_id: str, role: WorkerRole) -> None:
        prefill = role is WorkerRole.PREFILL
        chunk = None if prefill else self.spec.decode_max_num_batched_tokens
        cap = 0 if prefill else self.spec.decode_max_prefill_tokens_while_decoding
        w = SimWorker(worker_id, role, self.profile, self.loop, self.spec.max_model_len,
                      self.spec.num_kv_blocks, chunk, cap)  # fmt: skip
        w.on_token = self._on_token
        w.on_prefilled = lambda seq, w=w: self._on_prefilled(w, seq)
        w.on_finished = self._on_finished
        if role is WorkerRole.PREFILL:
            w.on_step = self._handing_off
        self.workers[worker_id] = w
        capacity = WorkerCapacity(
            w.block_manager.num_blocks, self.profile.block_size, FINGERPRINT,
            self.spec.max_model_len,
        )  # fmt: skip
        self.router.register(worker_id, f"127.0.0.1:{10000 + len(self.workers)}", role, capacity)

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """The periodic events, once: load reports (staggered, as independent processes), the
        coordinator's polls and decisions, utilisation samples."""
        if self._started:
            return
        self._started = True
        now, n = self.loop.now, len(self.workers)
        for i, worker_id in enumerate(self.workers):
            offset = self.spec.report_interval_s * i / n
            self.loop.at(now + offset, lambda w=worker_id: self._report(w))
        if self.migrations is not None:
            self.loop.at(now, self._poll)
            self.loop.at(now, self._decide)
        if self.spec.sample_interval_s > 0:
            self.loop.at(now, self._sample)

    def run(self, requests: list[SimRequest], start_s: float = 0.0) -> list[SimRequest]:
        """Simulate ``requests`` (``at_s``: simulated send times, from ``start_s`` on) until all
        end or ``start_s + deadline_s``, when those still running are cancelled (as the
        benchmark's client cancels them: their workers abort them) and fail. The cluster keeps
        its state for the next ``run`` (``bench compare`` runs a mode's workloads on one)."""
        self.start()
        self.loop.run(start_s)  # the clock to the workload's start (no-op if already there)
        self._deadline = start_s + self.spec.deadline_s
        self._unfinished = {r.request_id for r in requests}
        for r in requests:
            if r.request_id in self.requests:
                raise ValueError(f"request id {r.request_id!r} was simulated already")
            self.requests[r.request_id] = r
            self.loop.at(r.at_s, lambda r=r: self._route(r))
        self.loop.run(self._deadline, stop=lambda: not self._unfinished)
        for r in requests:
            if r.request_id in self._unfinished:
                self._cancel(r)
        return requests

    def settle(self, timeout_s: float, every_s: float = 0.25) -> float:
        """Wait (bounded) until no worker has work and no migration is live, as ``bench
        compare`` waits between workloads (``Watcher.settle``); the simulated seconds waited."""
        start = self.loop.now
        while self.loop.now - start < timeout_s and not self.quiet():
            self.loop.run(self.loop.now + every_s)
        return self.loop.now - start

    @property
    def num_store_hit_tokens(self) -> int:
        """Prompt tokens the prefill workers fetched from the KV store (0 without one)."""
        return sum(w.num_store_hit_tokens for w in self.workers.values())

    def quiet(self) -> bool:
        live = self.migrations is not None and self.migrations.num_live() > 0
        return not live and all(w.idle for w in self.workers.values())

    def _cancel(self, r: SimRequest) -> None:
        for w in self.workers.values():
            w.abort(r.request_id)
        self._unfinished.discard(r.request_id)
        self.router.settle(r.request_id)
        r.status, r.done_s = "DEADLINE_EXCEEDED", None
        r.message = "unfinished at the run's deadline (its arrival window + drain)"

    def _route(self, r: SimRequest) -> None:
        if r.status != "NOT_SENT" or self.loop.now > self._deadline:
            return
        try:
            a = self.router.route(RouteRequest(r.request_id, r.prompt, r.max_tokens))
        except NoRoomNowError:
            self.loop.after(self.spec.retry_s, lambda: self._route(r))
            return
        except ResourceExhaustedError as exc:
            self._fail(r, "RESOURCE_EXHAUSTED", str(exc))
            return
        worker = self.workers[a.prefill.worker_id]
        if not a.colocated:
            decode = self.workers[a.decode.worker_id]
            limit = self._driver.local_prefill_limit(
                a.prefill.num_queued_tokens, a.decode.num_queued_tokens
            )  # the router's own rule (services/router/driver_types.py)
            if limit and decode.num_uncached_tokens(list(r.prompt)) <= limit:
                worker = decode  # conditional disaggregation: D prefills it in its own batch
                self.num_local_prefills += 1
                self.router.settle(r.request_id, a.prefill.worker_id)  # as attempt.py
            elif not decode.reserve(
                r.request_id, list(r.prompt), r.max_tokens, self.spec.reuse_cached_prefix
            ):
                self.router.mark_full(decode.worker_id)
                self.loop.after(self.spec.retry_s, lambda: self._route(r))
                return
            r.decode_worker = decode.worker_id
        route_s = self.profile.serving.route_s
        if route_s <= 0:
            worker.add(r.request_id, list(r.prompt), r.max_tokens)
            return

        def arrive() -> None:  # the routing's time passed; not if cancelled meanwhile
            if r.request_id in self._unfinished:
                worker.add(r.request_id, list(r.prompt), r.max_tokens)

        self.loop.after(route_s, arrive)

    def _on_token(self, seq) -> None:
        r = self.requests[seq.request_id]
        if r.first_token_s is None:
            r.first_token_s = self.loop.now
        r.num_output_tokens = max(r.num_output_tokens, seq.num_output_tokens)

    def _handing_off(self, batch) -> Callable[[], None]:
        """A prefill step starts: the decode workers its prompts' KV streams to (layer by
        layer, as the step computes) are receiving until it ends (``receiving_scale``)."""
        to = {r.decode_worker for q in batch.seqs
              if (r := self.requests.get(q.request_id)) is not None and r.decode_worker}  # fmt: skip
        receivers = [self.workers[w] for w in to if w in self.workers]
        for w in receivers:
            w.receiving += 1

        def ended() -> None:
            for w in receivers:
                w.receiving -= 1

        return ended

    def _on_prefilled(self, prefill: SimWorker, seq) -> None:
        """A prompt's KV streamed to its decode worker layer by layer while the step computed
        (services/prefill/engine_side.py): what is left at the step's end is the part the link
        could not carry meanwhile, at least its last layer. The prompts one step completes join
        their decode worker together (``_hand_off``)."""
        r = self.requests[seq.request_id]
        decode = self.workers[r.decode_worker]
        num_bytes = self.profile.kv_bytes(decode.handoff_tokens(r.request_id))
        overlapped = max(
            0.0, num_bytes - prefill.last_step_s * self.transport.bandwidth_bytes_per_s
        )
        left = self.transport.time(max(overlapped, num_bytes / self.profile.num_layers))
        pending = self._handoffs.setdefault(prefill.worker_id, [])
        if not pending:  # the first of this step: hand them all off once it has committed
            prefill.between_steps(lambda: self._hand_off(prefill.worker_id))
        pending.append((r.request_id, seq.token_ids[-1], left))

    def _hand_off(self, prefill_id: str) -> None:
        """The end frames of one prefill step's prompts reach each decode worker within a
        moment, and its engine thread takes them in one batch of commands before its next step
        (services/engine/loop.py): each decode worker's prompts join at once, when the last of
        them has arrived, not one step apart."""
        by_decode: dict[str, list[tuple[str, int, float]]] = {}
        for request_id, token, left in self._handoffs.pop(prefill_id, []):
            r = self.requests.get(request_id)
            if r is not None and r.decode_worker in self.workers:
                by_decode.setdefault(r.decode_worker, []).append((request_id, token, left))
        for worker_id, joins in by_decode.items():
            arrived = [(request_id, token) for request_id, token, _ in joins]
            join = functools.partial(self.workers[worker_id].join_all, arrived)
            self.loop.after(max(left for *_, left in joins), join)

    def _on_finished(self, seq) -> None:
        r = self.requests[seq.request_id]
        r.num_output_tokens = seq.num_output_tokens
        r.done_s = self.loop.now
        r.status = "OK"
        self._unfinished.discard(r.request_id)
        self.router.settle(r.request_id)

    def _fail(self, r: SimRequest, status: str, message: str) -> None:
        r.status, r.message, r.done_s = status, message, self.loop.now
        self._unfinished.discard(r.request_id)
        self.router.settle(r.request_id)

    # -- load, the coordinator ---------------------------------------------------------------

    def _report(self, worker_id: str) -> None:
        w = self.workers[worker_id]
        self.router.report(worker_id, w.load(), self.loop.now)
        self.loop.after(self.spec.report_interval_s, lambda: self._report(worker_id))

    def _poll(self) -> None:
        """The coordinator's feed (services/coordinator/loadfeed.py): the router's last report
        of each worker, dated by its age."""
        for worker_id, seen_at, report in self.registry.last_reports():
            self.history.add(worker_id, seen_at, report, self.router.waiting_for_room(worker_id))
        self.loop.after(self.spec.poll_interval_s, self._poll)

    def views(self) -> list[WorkerView]:
        donors = (WorkerRole.DECODE, WorkerRole.MIXED)
        return [
            WorkerView(
                w,
                self.profile.num_layers,
                self.history.samples(w),
                can_donate=self.spec.prefill_donors or self.workers[w].role in donors,
                is_prefill=self.workers[w].role is WorkerRole.PREFILL,
            )
            for w in self.history.workers()
        ]

    def _decide(self) -> None:
        assert self.migrations is not None
        outcome = self.policy.decide(self.loop.now, self.views(), self.migrations.records())
        for decision in outcome.decisions:
            self.migrations.play(decision)
        self.loop.after(self.spec.policy.interval_s, self._decide)

    def _sample(self) -> None:
        self.samples.append(
            {
                "t": self.loop.now,
                "workers": {
                    i.worker_id: {"role": i.role.value, "utilisation": i.utilisation}
                    for i in self.router.workers()
                },
            }
        )
        self.loop.after(self.spec.sample_interval_s, self._sample)
