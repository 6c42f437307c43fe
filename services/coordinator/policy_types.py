"""What the automatic policy (policy.py) reads and writes: its config, a worker's load as it
sees it, its decisions and the measurements that size a migration. Pure: no grpc, no clock.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from services.common.errors import ConfigError
from services.common.limits import MAX_MICRO_BATCHES
from services.common.load import LoadReport, utilisation_compute, utilisation_memory


@dataclass(frozen=True)
class PolicyConfig:
    """Every threshold of the automatic mode; the reason for each default: docs/coordinator.md."""

    interval_s: float = 1.0
    window_s: float = 2.0
    min_reports: int = 3
    stale_s: float = 2.0
    prefill_capacity_tokens: int = 4096
    full_step_s: float = 0.0
    gap_high: float = 0.5
    gap_low: float = 0.2
    sustain_s: float = 3.0
    revert_after_s: float = 5.0
    cooldown_s: float = 15.0
    min_gain: float = 0.05
    budget_s: float = 5.0
    attention: bool = False
    attention_refill: bool = False
    attention_helper_share: float = 0.5
    head_share: float = 0.15
    bandwidth_prior_bytes_per_s: float = 100e6
    sync_prior_s: float = 0.2
    kv_bytes_per_block_layer: float = 16384.0
    weight_bytes_per_layer: int = 0
    num_micro_batches: int = 2
    prefill_micro_batches: int = 8
    drop_weights: bool = False
    min_running_seqs: int = 16
    min_queued_prefill_tokens: int = 256

    def __post_init__(self) -> None:
        positive = (
            "interval_s", "window_s", "stale_s", "budget_s", "bandwidth_prior_bytes_per_s",
            "kv_bytes_per_block_layer",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be finite and > 0, got {value}")
        for name in (
            "sustain_s", "revert_after_s", "cooldown_s", "min_gain", "sync_prior_s", "full_step_s"
        ):  # fmt: skip
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be finite and >= 0, got {value}")
        if not 0 < self.gap_low < self.gap_high <= 1:
            raise ConfigError(
                f"need 0 < gap_low < gap_high <= 1, got {self.gap_low} and {self.gap_high}"
            )
        if not (
            math.isfinite(self.attention_helper_share) and 0 < self.attention_helper_share <= 1
        ):
            raise ConfigError(
                f"attention_helper_share must be in (0, 1], got {self.attention_helper_share}"
            )
        if not 0 <= self.head_share < 1:
            raise ConfigError(f"head_share must be in [0, 1), got {self.head_share}")
        if self.min_queued_prefill_tokens < 0:
            raise ConfigError(
                f"min_queued_prefill_tokens must be >= 0, got {self.min_queued_prefill_tokens}"
            )
        if self.min_running_seqs < 0:
            raise ConfigError(f"min_running_seqs must be >= 0, got {self.min_running_seqs}")
        if self.min_reports < 1 or self.prefill_capacity_tokens < 1:
            raise ConfigError("min_reports and prefill_capacity_tokens must be >= 1")
        if self.weight_bytes_per_layer < 0:
            raise ConfigError(f"weight_bytes_per_layer must be >= 0: {self.weight_bytes_per_layer}")
        if self.num_micro_batches not in (1, 2):
            raise ConfigError(f"num_micro_batches must be 1 or 2, got {self.num_micro_batches}")
        if not 1 <= self.prefill_micro_batches <= MAX_MICRO_BATCHES:
            raise ConfigError(
                f"prefill_micro_batches must be in [1, {MAX_MICRO_BATCHES}], "
                f"got {self.prefill_micro_batches}"
            )

    def micro_batches_for(self, prefill_donor: bool) -> int:
        """A decode donor's two micro-batches are two step streams; a prefill donor's stay
        inside its (hooked) step, where more of them overlap more of the helper's part."""
        return self.prefill_micro_batches if prefill_donor else self.num_micro_batches


class ActionKind(enum.Enum):
    LAYERS = "layers"
    ATTENTION = "attention"
    REVERT = "revert"


@dataclass(frozen=True)
class Sample:
    at: float  # the policy's clock, when the report was read
    report: LoadReport
    # requests the router held for want of room that this worker's pool could hold, as it
    # was read (router.proto ``Worker.num_waiting_for_room``): its memory is the bound
    waiting_for_room: int = 0


@dataclass(frozen=True)
class WorkerView:
    """One worker as the policy sees it: who it is, what it may do, its recent reports."""

    worker_id: str
    num_layers: int
    samples: tuple[Sample, ...]  # oldest first
    can_donate: bool = True  # its layers or KV may move away
    can_host: bool = True
    # a prefill worker: a split of its layers overlaps its prompts (its micro-batches); a decode
    # or mixed worker's two step streams overlap decode steps only
    is_prefill: bool = False

    @property
    def drained(self) -> bool:
        """Nothing running, waiting or queued at its last report."""
        r = self.samples[-1].report
        return not (r.num_running_seqs or r.num_waiting_seqs or r.num_queued_prefill_tokens)

    def has_backlog(self, u: Utilisation, min_running: int, min_queued: int) -> bool:
        """Whether moving work off it can help now: its KV is the bound (memory-bound over the
        window), or each of its last two reports shows one of: 90 % of its pool used, at least
        ``min_running`` sequences running, and on a prefill worker sequences waiting or at
        least ``min_queued`` prompt tokens queued. A worker stepping a few sequences reads busy
        ~1 at any batch, yet splitting its layers cannot pay there, nor for a short prompt it
        prefills in its next step; a prompt that waits for one step shows in one report only;
        and the prompts a decode worker prefills itself (the router's conditional
        disaggregation) are no backlog a split of its layers takes: its two step streams
        overlap decode steps only (docs/coordinator.md, ``min_running_seqs``,
        ``min_queued_prefill_tokens``)."""
        if u.memory_bound:
            return True
        min_queued = max(1, min_queued)  # 0 or 1: any queued token
        return all(
            _backlogged(s.report, min_running, min_queued, self.is_prefill)
            for s in self.samples[-2:]
        )

    def queued_prompt_tokens(self, min_queued: int) -> int:
        """Its prompt tokens queued at its last report if each of its last two reports shows
        at least ``min_queued`` (0 or 1: any), as a backlog counts in ``has_backlog``; else 0."""
        reports = [s.report for s in self.samples[-2:]]
        least = max(1, min_queued)
        if len(reports) < 2 or any(r.num_queued_prefill_tokens < least for r in reports):
            return 0
        return reports[-1].num_queued_prefill_tokens


def _backlogged(r: LoadReport, min_running: int, min_queued: int, prompts: bool) -> bool:
    """``prompts``: waiting sequences and queued prompt tokens count too."""
    return bool(
        (prompts and (r.num_waiting_seqs or r.num_queued_prefill_tokens >= min_queued))
        or r.num_blocks_used >= 0.9 * r.num_blocks
        or r.num_running_seqs >= min_running
    )


@dataclass(frozen=True)
class Utilisation:
    compute: float
    memory: float
    num_blocks_used: int
    num_blocks: int
    peak_compute: float | None = None  # the highest U_compute of one report in the window

    @property
    def value(self) -> float:
        return max(self.compute, self.memory)

    def as_host(self) -> Utilisation:
        """As a helper: its busiest report's compute. A donor's steps wait for the layers it
        hosts whenever it is busy, so a host must have room at its peaks, not on average."""
        if self.peak_compute is None:
            return self
        return replace(self, compute=max(self.compute, self.peak_compute))

    @property
    def memory_bound(self) -> bool:
        return self.memory >= self.compute


@dataclass(frozen=True)
class Rejected:
    alternative: str
    reason: str


@dataclass(frozen=True)
class Decision:
    kind: ActionKind
    donor: str  # layers: the donor; attention: the owner; revert: the migration's donor
    helper: str
    gap: float  # U_max - U_min the decision saw
    # max U of the two workers once done (the others' does not change: lowering the pair's
    # max lowers max_g U_g, or the next max when a busy worker holds the top)
    predicted_max: float
    utilisations: Mapping[str, Utilisation]
    rejected: tuple[Rejected, ...] = ()
    start_layer: int = 0  # LAYERS: k (layers [k, L) move)
    end_layer: int = 0
    num_blocks: int = 0  # ATTENTION: blocks to move
    migration_id: str = ""  # REVERT
    estimated_time_s: float = 0.0  # T = S / B + T_sync + STEP_WAITS x the donor's step
    reason: str = ""

    @property
    def num_moved(self) -> int:
        """Layers or blocks moved: fewer wins a tie."""
        return self.end_layer - self.start_layer + self.num_blocks

    def describe(self) -> str:
        if self.kind is ActionKind.REVERT:
            return f"revert {self.migration_id} ({self.donor} -> {self.helper})"
        if self.kind is ActionKind.LAYERS:
            what = f"[{self.start_layer}, {self.end_layer})"
        else:
            what = f"{self.num_blocks} blocks"
        return f"{self.kind.value} {self.donor} -> {self.helper} {what}"


@dataclass(frozen=True)
class Outcome:
    """One ``decide``: what it decided and what it looked at and left."""

    decisions: tuple[Decision, ...]
    utilisations: Mapping[str, Utilisation]
    rejected: tuple[Rejected, ...]  # considered, not decided (the decisions carry their own)


@dataclass(frozen=True)
class Measurements:
    """What sizes a migration: measured where this policy saw migrations, else the priors."""

    layer_share: float  # share of a worker's step one decoder layer takes
    bandwidth_bytes_per_s: float  # B
    sync_s: float  # T_sync: the SWITCHING state's length
    kv_bytes_per_block_layer: float

    def migration_time(self, num_bytes: float) -> float:
        return num_bytes / self.bandwidth_bytes_per_s + self.sync_s


def prior_measurements(config: PolicyConfig, num_layers: int) -> Measurements:
    """Before any migration: layers share ``1 - head_share`` of a step evenly."""
    return Measurements(
        (1 - config.head_share) / num_layers,
        config.bandwidth_prior_bytes_per_s,
        config.sync_prior_s,
        config.kv_bytes_per_block_layer,
    )


def utilisation_of(view: WorkerView, now: float, config: PolicyConfig) -> Utilisation | None:
    """Mean over the window's reports; None with fewer than ``min_reports`` or a stale last."""
    samples = [s for s in view.samples if now - config.window_s <= s.at <= now]
    if len(samples) < config.min_reports or now - view.samples[-1].at > config.stale_s:
        return None
    cap = config.prefill_capacity_tokens
    compute = [utilisation_compute(s.report, cap, config.full_step_s) for s in samples]
    memory = [utilisation_memory(s.report, s.waiting_for_room) for s in samples]
    return Utilisation(
        compute=sum(compute) / len(samples),
        memory=sum(memory) / len(samples),
        num_blocks_used=samples[-1].report.num_blocks_used,
        num_blocks=samples[-1].report.num_blocks,
        peak_compute=max(compute),
    )
