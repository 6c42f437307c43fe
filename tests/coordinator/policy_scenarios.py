"""Factories for the policy's scenario tests: load histories from phase tables, and a stand-in
for the coordinator that turns each decision into a migration record at once."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from services.common.load import LoadReport
from services.common.migration_states import MigrationState
from services.coordinator.migration import Migration, MigrationKind
from services.coordinator.policy import ActionKind, Decision, Policy, Sample, WorkerView

S = MigrationState
NUM_BLOCKS = 512
SAMPLE_EVERY_S = 0.5


def report(busy: float, used: int = 0, queued: int = 0, total: int = NUM_BLOCKS) -> LoadReport:
    return LoadReport(
        num_queued_prefill_tokens=queued,
        num_running_seqs=used // 4,
        num_waiting_seqs=0,
        num_blocks_used=used,
        num_blocks_free=total - used,
        step_time_s=0.01,
        busy_fraction=busy,
        window_s=1.0,
    )


# A phase table: (until second, {worker: (busy fraction, KV blocks used[, requests waiting
# for its room at the router])}), in order.
Phases = Sequence[tuple[float, Mapping[str, tuple[float, int] | tuple[float, int, int]]]]


def load_at(phases: Phases, t: float) -> Mapping[str, tuple]:
    return next(load for until, load in phases if t <= until)


@dataclass
class Run:
    """The policy driven every second over ``phases``; migrations happen as decided."""

    policy: Policy
    phases: Phases
    num_layers: int = 4
    can_donate: Callable[[str], bool] = lambda w: True
    migrations: list[Migration] = field(default_factory=list)
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    log: list[tuple[float, Decision]] = field(default_factory=list)

    def run(self, until: float) -> list[tuple[float, Decision]]:
        t = 0.0
        while t < until:
            t = round(t + SAMPLE_EVERY_S, 6)
            for worker, (busy, used, *waiting) in load_at(self.phases, t).items():
                sample = Sample(t, report(busy, used), *waiting)
                self.samples.setdefault(worker, []).append(sample)
            if t == int(t):
                self.tick(t)
        return self.log

    def views(self) -> list[WorkerView]:
        return [
            WorkerView(w, self.num_layers, tuple(s), can_donate=self.can_donate(w))
            for w, s in sorted(self.samples.items())
        ]

    def tick(self, t: float) -> None:
        outcome = self.policy.decide(t, self.views(), self.migrations)
        for d in outcome.decisions:
            self.log.append((t, d))
            self.execute(t, d)

    def execute(self, t: float, d: Decision) -> None:
        if d.kind is ActionKind.REVERT:
            m = next(m for m in self.migrations if m.migration_id == d.migration_id)
            m.enter(S.REVERTING, t)
            m.enter(S.DONE, t)
            return
        kind = MigrationKind.LAYERS if d.kind is ActionKind.LAYERS else MigrationKind.ATTENTION
        m = active(f"m-{len(self.migrations) + 1}", d.donor, d.helper, t, d.start_layer, kind)
        self.migrations.append(m)
        self.policy.started(d, m.migration_id)


def active(
    migration_id: str,
    donor: str,
    helper: str,
    t: float,
    start_layer: int = 2,
    kind: MigrationKind = MigrationKind.LAYERS,
    state: MigrationState = S.ACTIVE,
    copying_s: float = 0.0,
    switching_s: float = 0.0,
    num_kv_bytes: int = 0,
    automatic: bool = True,
) -> Migration:
    """A migration created at ``t`` and driven up to ``state``; ``automatic``: the policy's."""
    m = Migration(
        migration_id, kind, donor, helper, start_layer, 4, created_at=t, automatic=automatic
    )
    m.num_kv_bytes = num_kv_bytes
    times = {S.COPYING: t, S.SWITCHING: t + copying_s, S.ACTIVE: t + copying_s + switching_s}
    for s, at in times.items():
        m.enter(s, at)
        if s is state:
            break
    return m


def brief(log: Sequence[tuple[float, Decision]]) -> list[tuple[object, ...]]:
    """A decision log as table rows: (second, kind, donor, helper, what)."""
    rows: list[tuple[object, ...]] = []
    for t, d in log:
        what: object = {
            ActionKind.LAYERS: (d.start_layer, d.end_layer),
            ActionKind.ATTENTION: d.num_blocks,
            ActionKind.REVERT: d.migration_id,
        }[d.kind]
        rows.append((t, d.kind.value, d.donor, d.helper, what))
    return rows
