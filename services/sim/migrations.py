"""The coordinator's decisions played out as modelled migrations.

A decision of the real ``Policy`` becomes a real ``Migration`` record moved through its real
state table (``Migration.enter``) at modelled times, so the policy reads back what it would from
the coordinator (its learning of bandwidth and sync time included):

1. LAYERS: PLANNED -> COPYING for the weights (``weights_s_per_layer`` each; 0 when helpers
   hold every layer, as they do by default), the donor's KV of the moved layers at the
   transport's bandwidth and the protocol's own ``copy_s`` -> SWITCHING until the donor's step
   in flight ends (the real switch runs between two steps: in ``bench compare`` a prefill
   donor's SWITCHING took 2.8-3.5 s, one prefill step of the Mooncake workload), then the
   measured pause (the donor steps nothing) -> ACTIVE: the donor's steps are stretched by
   ``worker.Offload`` and the helper pays the moved layers' share of them;
2. REVERT: ACTIVE -> REVERTING (the moved layers' KV copied back, then ``revert_s``) -> DONE:
   the donor runs every layer again.

Attention migrations are not modelled yet: such a decision is counted as refused, as the
coordinator counts an action a worker refused (the policy's default leaves them off).
"""

from __future__ import annotations

from services.common.migration_states import MigrationState
from services.coordinator.migration import Migration, MigrationKind
from services.coordinator.policy import ActionKind, Decision, Policy
from services.router.registry import WorkerRole
from services.sim.events import EventLoop
from services.sim.profile import Profile, TransportModel
from services.sim.worker import Offload, SimWorker

S = MigrationState
LIVE = (S.PLANNED, S.COPYING, S.SWITCHING, S.ACTIVE, S.REVERTING)


class MigrationPlayer:
    def __init__(
        self,
        loop: EventLoop,
        workers: dict[str, SimWorker],
        profile: Profile,
        transport: TransportModel,
        policy: Policy,
    ) -> None:
        self.loop, self.workers, self.profile = loop, workers, profile
        self.transport, self.policy = transport, policy
        self._records: dict[str, Migration] = {}
        self.num_refused = 0

    def records(self) -> list[Migration]:
        return list(self._records.values())

    def play(self, d: Decision) -> None:
        if d.kind is ActionKind.REVERT:
            self._revert(self._records[d.migration_id])
        elif d.kind is ActionKind.LAYERS:
            m = self._start_layers(d)
            self.policy.started(d, m.migration_id)
        else:
            self.num_refused += 1

    def _start_layers(self, d: Decision) -> Migration:
        now, cfg = self.loop.now, self.policy.config
        micro = cfg.micro_batches_for(self.workers[d.donor].role is WorkerRole.PREFILL)
        m = Migration(
            f"sim-{len(self._records) + 1}", MigrationKind.LAYERS, d.donor, d.helper,
            d.start_layer, d.end_layer, now, num_micro_batches=micro, reason=d.reason,
        )  # fmt: skip
        self._records[m.migration_id] = m
        donor, helper = self.workers[d.donor], self.workers[d.helper]
        moved = len(m.layers)
        kv = self._kv_bytes(donor, moved)
        mig = self.profile.migration
        m.weights_s = mig.weights_s_per_layer * moved
        m.weights_skipped = m.weights_s == 0
        m.kv_copy_s = self.transport.time(kv)
        m.num_copy_kv_bytes = m.num_kv_bytes = kv
        m.switch_pause_s = mig.switch_pause_s
        m.num_sequences = len(donor.scheduler.running)
        m.enter(S.COPYING, now)

        def switch() -> None:
            m.enter(S.SWITCHING, self.loop.now)
            donor.between_steps(engage)

        def engage() -> None:  # between two of the donor's steps, as the real switch
            share = min(0.99, moved * self.profile.layer_share)
            hop = self.transport.latency_s if mig.hop_s is None else mig.hop_s
            # a decode donor's two micro-batches are two step streams (pipeline.py); a prefill
            # donor's steps export KV layer by layer and keep its micro-batches inside one step
            pipelined = donor.role is WorkerRole.DECODE
            donor.offload = Offload(helper, share, hop, m.num_micro_batches, pipelined)
            helper.num_hosted_layers += moved
            donor.hosted_debt_s += mig.switch_pause_s  # the donor's next step waits it out
            self.loop.after(mig.switch_pause_s, lambda: m.enter(S.ACTIVE, self.loop.now))

        self.loop.after(m.weights_s + m.kv_copy_s + mig.copy_s, switch)
        return m

    def _revert(self, m: Migration) -> None:
        m.enter(S.REVERTING, self.loop.now)
        donor, helper = self.workers[m.donor], self.workers[m.helper]
        moved = len(m.layers)
        back = self._kv_bytes(donor, moved)
        m.num_kv_bytes += back

        def done() -> None:
            donor.offload = None
            helper.num_hosted_layers -= moved
            m.enter(S.DONE, self.loop.now)

        self.loop.after(self.transport.time(back) + self.profile.migration.revert_s, done)

    def _kv_bytes(self, donor: SimWorker, num_layers: int) -> int:
        used = donor.block_manager.num_blocks - donor.block_manager.num_free_blocks
        return used * num_layers * self.profile.kv_bytes_per_block_layer

    def num_live(self) -> int:
        return sum(m.state in LIVE for m in self._records.values())

    def count(self, since_s: float = 0.0) -> dict[str, int]:
        """Migrations started from ``since_s`` on (``bench compare`` counts per workload)."""
        records = [m for m in self._records.values() if m.created_at >= since_s]
        states = [m.state for m in records]
        reached = [[t.state for t in m.timings] for m in records]
        return {
            "num_started": len(states),
            "num_activated": sum(S.ACTIVE in r for r in reached),
            "num_reverted": sum(s is S.DONE for s in states),
            "num_aborted": sum(s is S.ABORTED for s in states),
            "num_refused": self.num_refused,
        }
