"""Automatic migration decisions (DESIGN.md §5): load histories in, decisions out.

Pure code: no grpc, no asyncio, no clock of its own (every call passes ``now``, on the clock the
migrations' records use), so the cluster simulator runs this very code. One ``Policy.decide``
per decision period (``PolicyConfig.interval_s``):

1. each worker's utilisation ``U = max(U_compute, U_memory)`` is the mean, over the reports of
   the last ``window_s``, of ``services.common.load``'s functions; a worker with too few or too
   old reports takes no part; an ACTIVE layer migration's share of its donor's compute counts
   on its helper, which runs those layers (``_attributed``);
2. every ACTIVE migration is considered for a revert: when its pair's gap stayed under
   ``gap_low`` for ``revert_after_s`` and undoing it would not open a gap of ``gap_high`` again,
   or when the helper became the hotter one by ``gap_high`` for ``revert_after_s`` (this one
   even while its workers cool down: the move made the pair worse), at once if the helper's
   last two reports show prompts of its own queued (``min_queued_prefill_tokens``);
3. then one start: the hottest worker that may donate against the coolest that may host, once
   the donor's gap held for ``sustain_s`` (to the coolest free host of each period, whichever
   that is: with many workers the extremes change while the imbalance stays), the helper's compute
   taken at its busiest report of the window (``Utilisation.as_host``): a **layer** migration
   for a gap of ``gap_high`` or more, ``k`` chosen so that the predicted ``max U`` is lowest
   within the time budget ``T = S / B + T_sync + STEP_WAITS × the donor's step <= budget_s``;
   an **attention** migration (only with ``attention=True``) for a memory-bound hot worker,
   the gap at least ``gap_low``;
   never from a worker whose last report shows no work (its window still holds the load it
   just finished);
4. no worker takes part in two actions: a worker in a live migration, or one that acted less
   than ``cooldown_s`` ago (a decision, or the end of a migration), is left alone (but for the
   revert in 2 of a move that made its helper the hotter one).

Each decision carries the utilisations it saw and every alternative it rejected with the reason.
``B`` and ``T_sync`` are measured from the migrations this policy started (``Measurements``);
the per-layer share of step time is an input (``Measurements.layer_share``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from services.common.migration_states import MigrationState
from services.coordinator.migration import Migration, MigrationKind
from services.coordinator.policy_types import (
    ActionKind,
    Decision,
    Measurements,
    Outcome,
    PolicyConfig,
    Rejected,
    Sample,
    Utilisation,
    WorkerView,
    prior_measurements,
    utilisation_of,
)

__all__ = [
    "ActionKind", "Decision", "Measurements", "Outcome", "Policy", "PolicyConfig", "Rejected",
    "Sample", "Utilisation", "WorkerView", "prior_measurements", "utilisation_of",
]  # fmt: skip

S = MigrationState

# A migration's waits for the donor's step in progress (its last report's step time:
# ``LoadMeter``), added to T_sync: its copy's first round and its switch each run between two
# steps. On 2026-12-05 a prefill worker in 2,048-token chunk steps (~10 s each on the AMD VM)
# took 9.4 and 12.3 s for two copy rounds and 15.8 s to switch, one step each, where
# S / B + T_sync predicted under the 5 s budget (docs/coordinator.md).
STEP_WAITS = 2


def _ended_at(m: Migration) -> float | None:
    return m.timings[-1].entered_at if m.state.terminal else None


def _fmt(u: float) -> str:
    return f"{u:.2f}"


@dataclass
class _Held:
    """A condition that must hold for a while before it acts (hysteresis)."""

    key: tuple[object, ...]
    since: float


@dataclass
class _State:
    acted_at: dict[str, float] = field(default_factory=dict)  # worker -> last decision
    # worker -> since when it has been a donor with a gap to start on (to the coolest free
    # host, whichever that is): with many workers the hottest and the coolest change between
    # periods while the imbalance persists, so the hold is the donor's, not the pair's.
    hot_since: dict[str, float] = field(default_factory=dict)
    revert: dict[str, _Held] = field(default_factory=dict)  # migration id -> its condition
    started: dict[str, Decision] = field(default_factory=dict)  # migration id -> decision
    learned: set[str] = field(default_factory=set)


class Policy:
    def __init__(self, config: PolicyConfig, layer_share: float | None = None) -> None:
        """``layer_share``: a measured share of step time per decoder layer; None: the prior
        ``(1 - head_share) / L`` of each worker's model."""
        self.config = config
        self._layer_share = layer_share
        self._state = _State()
        self._bandwidth: float | None = None
        self._sync: float | None = None
        self._kv_per_block_layer: float | None = None

    # -- the caller's reports -------------------------------------------------------------

    def started(self, decision: Decision, migration_id: str) -> None:
        """The caller started ``decision`` as ``migration_id`` (its cost is learned from it)."""
        self._state.started[migration_id] = decision

    def measurements(self, num_layers: int) -> Measurements:
        prior = prior_measurements(self.config, num_layers)
        return Measurements(
            self._layer_share if self._layer_share is not None else prior.layer_share,
            self._bandwidth or prior.bandwidth_bytes_per_s,
            self._sync if self._sync is not None else prior.sync_s,
            self._kv_per_block_layer or prior.kv_bytes_per_block_layer,
        )

    # -- the decision ---------------------------------------------------------------------

    def decide(
        self, now: float, workers: Sequence[WorkerView], migrations: Sequence[Migration]
    ) -> Outcome:
        self._learn(migrations)
        views = {w.worker_id: w for w in workers}
        measured = {
            w.worker_id: u
            for w in workers
            if (u := utilisation_of(w, now, self.config)) is not None
        }
        utils = self._attributed(measured, migrations)
        busy = {w: m for m in migrations if m.live for w in (m.donor, m.helper)}
        cooling = self._cooling(now, migrations)
        rejected: list[Rejected] = []
        decisions = [
            d
            for m in migrations
            if (d := self._consider_revert(now, m, views, utils, cooling, rejected)) is not None
        ]
        start = self._consider_start(now, views, utils, busy, cooling, rejected)
        if start is not None:
            decisions.append(start)
        for d in decisions:
            self._state.acted_at[d.donor] = self._state.acted_at[d.helper] = now
        return Outcome(tuple(decisions), utils, tuple(rejected))

    def _attributed(
        self, measured: Mapping[str, Utilisation], migrations: Iterable[Migration]
    ) -> dict[str, Utilisation]:
        """Each ACTIVE layer migration's moved layers counted on the worker that runs them.

        A donor's busy fraction still holds them (its step waits for the helper's results) and
        the helper's does not (it runs them on threads beside its own steps), so as measured a
        move changes neither. The policy's model (a move shifts ``U_compute(donor) · m ·
        layer_share`` to the helper; a revert shifts it back) is about where the work runs:
        that share of the donor's measured compute is the helper's."""
        utils = dict(measured)
        for m in migrations:
            d, h = utils.get(m.donor), utils.get(m.helper)
            if m.kind is not MigrationKind.LAYERS or m.state is not S.ACTIVE or not (d and h):
                continue
            moved = d.compute * self._moved_share(m)
            utils[m.donor] = replace(d, compute=d.compute - moved)
            utils[m.helper] = replace(h, compute=h.compute + moved)
        return utils

    def _moved_share(self, m: Migration) -> float:
        return min(0.99, len(m.layers) * self.measurements(m.end_layer).layer_share)

    def _cooling(self, now: float, migrations: Iterable[Migration]) -> dict[str, float]:
        """Worker -> seconds of cool-down left, for those still cooling."""
        last = dict(self._state.acted_at)
        for m in migrations:
            ended = _ended_at(m)
            for w in (m.donor, m.helper):
                if ended is not None and ended > last.get(w, -math.inf):
                    last[w] = ended
        left = {w: t + self.config.cooldown_s - now for w, t in last.items()}
        return {w: s for w, s in left.items() if s > 0}

    def _held(self, held: _Held | None, key: tuple[object, ...], now: float) -> _Held:
        return held if held is not None and held.key == key else _Held(key, now)

    # -- reverts --------------------------------------------------------------------------

    def _consider_revert(
        self,
        now: float,
        m: Migration,
        views: Mapping[str, WorkerView],
        utils: Mapping[str, Utilisation],
        cooling: Mapping[str, float],
        rejected: list[Rejected],
    ) -> Decision | None:
        d, h = utils.get(m.donor), utils.get(m.helper)
        # one started by hand is the operator's to revert (session 40's probe: reverted ~5 s
        # after its start, as the gap between two idle workers was small)
        if m.state is not S.ACTIVE or not m.automatic or d is None or h is None:
            self._state.revert.pop(m.migration_id, None)
            return None
        cfg = self.config
        gap = abs(d.value - h.value)
        after_d, after_h = self._after_revert(m, d, h)
        queued = 0  # the helper's own prompt tokens queued, where they make the revert urgent
        if m.kind is MigrationKind.ATTENTION and (view := views.get(m.helper)) is not None:
            # Reverted, the located blocks come back to the donor's pool: where they do not
            # fit, its sequences are recomputed (session 41: a revert 35 s into
            # bench.attention_cluster's load, the helper busy with the prompts the lent room
            # let in, recomputed 5 sequences and left their requests 24-68 s without a
            # token), so no balanced gap undoes it.
            hosted = view.samples[-1].report.num_hosted_blocks
            if d.num_blocks_used + hosted > d.num_blocks:
                self._state.revert.pop(m.migration_id, None)
                why = f"{m.donor}'s pool cannot take its {hosted} located blocks back now"
                rejected.append(Rejected(f"revert {m.migration_id}", why))
                return None
        if gap < cfg.gap_low and abs(after_d - after_h) < cfg.gap_high:
            why = f"gap {_fmt(gap)} < {cfg.gap_low}, {_fmt(abs(after_d - after_h))} once reverted"
        elif h.value - d.value >= cfg.gap_high:
            why = f"helper hotter by {_fmt(h.value - d.value)}"
            if m.kind is MigrationKind.LAYERS and (view := views.get(m.helper)) is not None:
                queued = view.queued_prompt_tokens(cfg.min_queued_prefill_tokens)
            if queued:
                why += f", {queued} prompt tokens of its own queued"
        else:
            self._state.revert.pop(m.migration_id, None)
            return None
        key = (why.split()[0],)  # "gap" or "helper": a change of reason starts the wait again
        held = self._held(self._state.revert.get(m.migration_id), key, now)
        self._state.revert[m.migration_id] = held
        # A helper hotter with prompts of its own queued in its last two reports is undone at
        # once: each of its prefill steps holds the donor's hosted layers (and so every donor
        # step) back, and the queue will not drain while it hosts them (docs/coordinator.md).
        if now - held.since < (0.0 if queued else cfg.revert_after_s):
            return None
        # A helper hotter for revert_after_s is a move that made the pair worse: undone past
        # the cool-down, which is there so a decision is not undone before its effect shows.
        for w in () if key == ("helper",) else (m.donor, m.helper):
            if w in cooling:
                rejected.append(
                    Rejected(f"revert {m.migration_id}", f"{w} cools down {cooling[w]:.1f} s more")
                )
                return None
        del self._state.revert[m.migration_id]
        return Decision(
            ActionKind.REVERT, m.donor, m.helper, gap, max(after_d, after_h), dict(utils),
            migration_id=m.migration_id, reason=f"{why} for {now - held.since:.1f} s",
        )  # fmt: skip

    def _after_revert(self, m: Migration, d: Utilisation, h: Utilisation) -> tuple[float, float]:
        """(U donor, U helper) once reverted: the moved layers' compute back on the donor.
        The donor now runs ``1 - moved * share`` of its steps, so its own compute was
        ``compute / (1 - moved * share)``; the helper gives that difference back."""
        if m.kind is not MigrationKind.LAYERS:
            return d.value, h.value
        share = self._moved_share(m)
        back = min(h.compute, d.compute * share / (1 - share))
        return max(d.compute + back, d.memory), max(h.compute - back, h.memory)

    # -- starts ---------------------------------------------------------------------------

    def _pair(
        self,
        views: Mapping[str, WorkerView],
        utils: Mapping[str, Utilisation],
        busy: Mapping[str, Migration],
        cooling: Mapping[str, float],
        rejected: list[Rejected],
    ) -> tuple[list[str], str] | None:
        """The workers free to donate, hottest first, and the coolest free to host (not the
        hottest donor, nor one whose own prompts queue); why others are not."""

        def free(w: str) -> bool:
            if w in busy:
                rejected.append(Rejected(w, f"in {busy[w].migration_id} ({busy[w].state.name})"))
            elif w in cooling:
                rejected.append(Rejected(w, f"cools down {cooling[w]:.1f} s more"))
            return w not in busy and w not in cooling

        order = sorted(utils, key=lambda w: (-utils[w].value, w))
        free_workers = [w for w in order if free(w)]
        donors = [w for w in free_workers if views[w].can_donate]
        if not donors:
            return None
        min_queued = self.config.min_queued_prefill_tokens

        def unqueued(w: str) -> bool:
            # A host whose last two reports show its own prompts queued would hold every donor
            # step behind its prefill steps, and the revert rule would undo the move at once
            # (_consider_revert); session 30: a move that a previous workload's gap had held
            # started just as mooncake's prompts queued on the prefill worker.
            queued = views[w].queued_prompt_tokens(min_queued)
            if queued:
                rejected.append(Rejected(w, f"{queued} prompt tokens of its own queued"))
            return not queued

        hosts = [
            w
            for w in reversed(free_workers)
            if w != donors[0] and views[w].can_host and unqueued(w)
        ]
        if not hosts:
            rejected.append(Rejected(donors[0], "no free worker to help it"))
            return None
        return donors, hosts[0]

    def _consider_start(
        self,
        now: float,
        views: Mapping[str, WorkerView],
        utils: Mapping[str, Utilisation],
        busy: Mapping[str, Migration],
        cooling: Mapping[str, float],
        rejected: list[Rejected],
    ) -> Decision | None:
        cfg = self.config
        values = [u.value for u in utils.values()]
        if len(values) < 2 or max(values) - min(values) < cfg.gap_low:
            self._state.hot_since.clear()
            return None
        pair = self._pair(views, utils, busy, cooling, rejected)
        if pair is None:
            return None
        donors, cold = pair
        hot = donors[0]
        utils = {**utils, cold: utils[cold].as_host()}  # room at its peaks (as_host)

        def gaps(w: str) -> tuple[float, bool, bool]:
            u, gap = utils[w], utils[w].value - utils[cold].value
            return gap, gap >= cfg.gap_high, cfg.attention and u.memory_bound and gap >= cfg.gap_low

        since = self._state.hot_since
        self._state.hot_since = {
            w: since.get(w, now) for w in donors if w != cold and any(gaps(w)[1:])
        }
        u_hot = utils[hot]
        gap, layers_ok, attention_ok = gaps(hot)
        if not (layers_ok or attention_ok):
            bound = "memory" if u_hot.memory_bound else "compute"
            why = f"gap {_fmt(gap)} < {cfg.gap_high}, {hot} {bound}-bound"
            rejected.append(Rejected(f"{hot} -> {cold}", why))
            return None
        held_s = now - self._state.hot_since[hot]
        if held_s < cfg.sustain_s:
            return None
        if views[hot].drained:
            # Its window still holds the load it just finished (a phase's or a run's tail):
            # there is nothing on it to move now. The gap keeps its hold; the window catches up.
            rejected.append(Rejected(f"{hot} -> {cold}", f"{hot} has no work at its last report"))
            return None
        if not views[hot].has_backlog(u_hot, cfg.min_running_seqs, cfg.min_queued_prefill_tokens):
            r = views[hot].samples[-1].report
            if views[hot].is_prefill:
                prompts = (
                    f"{r.num_waiting_seqs} waiting, {r.num_queued_prefill_tokens} prompt "
                    f"tokens queued (< {cfg.min_queued_prefill_tokens})"
                )
            else:  # its own prompts count for nothing (has_backlog)
                prompts = (
                    f"{r.num_waiting_seqs} waiting and {r.num_queued_prefill_tokens} "
                    "prompt tokens queued of its own, which a split does not take"
                )
            why = (f"{hot} has no backlog in its last two reports (the last: "
                   f"{r.num_running_seqs} running (< {cfg.min_running_seqs}), {prompts})")  # fmt: skip
            rejected.append(Rejected(f"{hot} -> {cold}", why))
            return None
        alternatives: list[Rejected] = []
        options = self._options(hot, cold, views, utils, layers_ok, attention_ok, alternatives)
        best = min(options, key=lambda d: (d.predicted_max, d.num_moved), default=None)
        for d in options:
            if best is not None and d is not best:
                why = f"predicted max U {_fmt(d.predicted_max)} vs {_fmt(best.predicted_max)}"
                alternatives.append(Rejected(d.describe(), why))
        if best is None or best.predicted_max > u_hot.value - cfg.min_gain:
            if best is not None:
                why = f"predicted max U {_fmt(best.predicted_max)}: gains < {cfg.min_gain}"
                alternatives.append(Rejected(best.describe(), why))
            rejected.extend(alternatives)
            return None
        for w in (hot, cold):
            self._state.hot_since.pop(w, None)
        why = f"gap {_fmt(gap)} for {held_s:.1f} s"
        return replace(best, gap=gap, rejected=tuple(alternatives), reason=why)

    def _options(
        self,
        hot: str,
        cold: str,
        views: Mapping[str, WorkerView],
        utils: Mapping[str, Utilisation],
        layers_ok: bool,
        attention_ok: bool,
        rejected: list[Rejected],
    ) -> list[Decision]:
        num_layers = views[hot].num_layers
        measured = self.measurements(num_layers)
        # The copy (one round at least) and the switch each run between two of the donor's
        # steps: a donor in a long step holds each that long, past any B or T_sync.
        step_s = views[hot].samples[-1].report.step_time_s
        measured = replace(measured, sync_s=measured.sync_s + STEP_WAITS * step_s)
        options = []
        if layers_ok:
            options += self._layer_options(hot, cold, num_layers, utils, measured, rejected)
        if attention_ok:
            options += self._attention_options(hot, cold, num_layers, utils, measured, rejected)
        elif self.config.attention:
            rejected.append(Rejected(f"attention {hot} -> {cold}", f"{hot} compute-bound"))
        return options

    def _layer_options(
        self,
        hot: str,
        cold: str,
        num_layers: int,
        utils: Mapping[str, Utilisation],
        measured: Measurements,
        rejected: list[Rejected],
    ) -> list[Decision]:
        """One option per number of layers moved (``[k, L)``, 1 <= k < L) within the budget."""
        d, h = utils[hot], utils[cold]
        options = []
        for k in range(num_layers - 1, 0, -1):
            moved = num_layers - k
            shift = d.compute * moved * measured.layer_share
            hosted_kv = d.num_blocks_used * moved / num_layers / max(1, h.num_blocks)
            after_hot = max(d.compute - shift, d.memory)
            after_cold = max(h.compute + shift, h.memory + hosted_kv)
            num_bytes = moved * (
                self.config.weight_bytes_per_layer
                + d.num_blocks_used * measured.kv_bytes_per_block_layer
            )
            t = measured.migration_time(num_bytes)
            option = Decision(
                ActionKind.LAYERS, hot, cold, 0.0, max(after_hot, after_cold),
                dict(utils), start_layer=k, end_layer=num_layers, estimated_time_s=t,
            )  # fmt: skip
            if t > self.config.budget_s:
                rejected.append(
                    Rejected(option.describe(), f"T {t:.2f} s > budget {self.config.budget_s} s")
                )
                continue
            options.append(option)
        return options

    def _attention_options(
        self,
        hot: str,
        cold: str,
        num_layers: int,
        utils: Mapping[str, Utilisation],
        measured: Measurements,
        rejected: list[Rejected],
    ) -> list[Decision]:
        """The blocks that even out the two pools' use, as many as the budget allows; refilled,
        ``attention_helper_share`` of the helper's free blocks instead: the donor fills the
        room lent at once with the requests waiting for it, so the pools never even out, and
        the first located sequence costs a step the most (an exchange per layer;
        docs/migration.md), so a sequence or two lent lose throughput where more gain."""
        cfg = self.config
        d, h = utils[hot], utils[cold]
        n_d, n_h = max(1, d.num_blocks), max(1, h.num_blocks)
        if cfg.attention_refill:
            target = int((n_h - h.num_blocks_used) * cfg.attention_helper_share)
            nothing = "no free block on the helper to lend"
        else:
            target = (d.num_blocks_used * n_h - h.num_blocks_used * n_d) // (n_d + n_h)
            nothing = "nothing to even out"
        per_block = measured.kv_bytes_per_block_layer * num_layers
        room = (cfg.budget_s - measured.sync_s) * measured.bandwidth_bytes_per_s
        blocks = min(target, max(0, int(room // per_block)))
        what = f"attention {hot} -> {cold}"
        if blocks < 1:
            reason = nothing if target < 1 else "budget too small for one block"
            rejected.append(Rejected(what, reason))
            return []
        # The owner's busy fraction is left out: a decode worker steps whenever it holds a
        # sequence, so it reads ~1 at any batch (``utilisation_compute``) and no move lowers
        # it, while the blocks lent are room for the requests that wait for it.
        after_hot = (d.num_blocks_used - blocks) / n_d
        after_cold = max(h.compute, (h.num_blocks_used + blocks) / n_h)
        t = measured.migration_time(blocks * per_block)
        return [
            Decision(
                ActionKind.ATTENTION,
                hot,
                cold,
                0.0,
                max(after_hot, after_cold),
                dict(utils),
                num_blocks=blocks,
                estimated_time_s=t,
            )  # fmt: skip
        ]

    # -- measurements ---------------------------------------------------------------------

    def _learn(self, migrations: Iterable[Migration]) -> None:
        """B, T_sync and KV bytes per block and layer from each migration this policy started,
        once it has switched (a running mean of what was seen)."""
        for m in migrations:
            decision = self._state.started.get(m.migration_id)
            if decision is None or m.migration_id in self._state.learned:
                continue
            times = {t.state: t for t in m.timings if t.left_at is not None}
            if S.COPYING not in times or S.SWITCHING not in times:
                continue
            self._state.learned.add(m.migration_id)
            copying = times[S.COPYING].left_at - times[S.COPYING].entered_at  # type: ignore[operator]
            switching = times[S.SWITCHING].left_at - times[S.SWITCHING].entered_at  # type: ignore[operator]
            if m.num_kv_bytes and copying + switching > 0:
                self._bandwidth = _mean(self._bandwidth, m.num_kv_bytes / (copying + switching))
            self._sync = _mean(self._sync, switching)
            blocks = decision.utilisations[m.donor].num_blocks_used * len(m.layers)
            if m.kind is MigrationKind.LAYERS and m.num_kv_bytes and blocks:
                self._kv_per_block_layer = _mean(self._kv_per_block_layer, m.num_kv_bytes / blocks)


def _mean(old: float | None, new: float) -> float:
    return new if old is None else (old + new) / 2
