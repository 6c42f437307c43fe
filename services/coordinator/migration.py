"""A migration's record and the one table of the states it may pass through (DESIGN.md §5).

    PLANNED ──► COPYING ──► SWITCHING ──► ACTIVE ──► REVERTING ──► DONE
       │           │            │           │            │
       └───────────┴────────────┴───────────┴────────────┴──► ABORTED

Only the coordinator's core changes ``Migration.state``, and only through ``Migration.enter``,
which refuses any move the table does not list. Times are the coordinator's clock readings
(wall-clock seconds by default: the record outlives the process that wrote it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.common.errors import BanaServeError, InvalidRequestError
from services.common.limits import MAX_MICRO_BATCHES, check_id, check_request_ids
from services.common.migration_states import MigrationState


class MigrationKind(enum.Enum):
    LAYERS = "layers"
    ATTENTION = "attention"


S = MigrationState
TRANSITIONS: dict[MigrationState, frozenset[MigrationState]] = {
    S.PLANNED: frozenset({S.COPYING, S.ABORTED}),
    S.COPYING: frozenset({S.SWITCHING, S.ABORTED}),
    S.SWITCHING: frozenset({S.ACTIVE, S.ABORTED}),
    S.ACTIVE: frozenset({S.REVERTING, S.ABORTED}),
    S.REVERTING: frozenset({S.DONE, S.ABORTED}),
    S.DONE: frozenset(),
    S.ABORTED: frozenset(),
}


def id_number(migration_id: str) -> int:
    """N of the id ``m-N`` (the store numbers ids in the order it hands them out)."""
    return int(migration_id.rsplit("-", 1)[1])


class TransitionError(BanaServeError):
    """A state change the table does not allow: a bug in the core, never a caller's error."""


@dataclass
class StateTime:
    state: MigrationState
    entered_at: float
    left_at: float | None = None

    def duration(self, now: float) -> float:
        return (now if self.left_at is None else self.left_at) - self.entered_at


@dataclass
class Migration:
    """One migration: what moves where, how far it got, and what it cost."""

    migration_id: str
    kind: MigrationKind
    donor: str
    helper: str
    start_layer: int
    end_layer: int
    created_at: float
    state: MigrationState = MigrationState.PLANNED
    num_micro_batches: int = 2
    drop_weights: bool = False
    helper_data_address: str = ""
    num_weight_bytes: int = 0
    num_kv_bytes: int = 0  # copy + switch + reverse copy
    # The time split: weights shipped, staged KV copies before the switch, the switch.
    weights_s: float = 0.0
    num_copy_kv_bytes: int = 0
    kv_copy_s: float = 0.0
    num_switch_kv_bytes: int = 0
    weights_skipped: bool = False
    num_sequences: int = 0
    switch_pause_s: float = 0.0
    num_requeued: int = 0  # sequences a switch, revert or abort sent back to recompute
    num_requeued_at_end: int = 0  # of them, those the donor's abort did (as it answered)
    # Attention migrations (start 0, end L: every layer): which sequences, as asked, and the
    # KV blocks that moved to the helper.
    request_ids: tuple[str, ...] = ()
    max_sequences: int = 0
    max_blocks_per_sequence: int = 0
    refill: bool = False  # keep up to max_sequences located while ACTIVE
    num_blocks: int = 0
    # KV bytes a refilling attention donor moved while ACTIVE (in num_kv_bytes too), as its
    # lease renewals and its revert report them (MigrationDriver.follow).
    num_refill_kv_bytes: int = 0
    # Started by the automatic mode's policy, which reverts only these: one started by hand
    # keeps its workers out of the policy's decisions (docs/coordinator.md).
    automatic: bool = False
    reason: str = ""
    timings: list[StateTime] = field(default_factory=list)
    # The migration's trace (its root span), so a restarted coordinator continues the same
    # trace; 0: not traced.
    trace_id: int = 0
    root_span_id: int = 0

    def __post_init__(self) -> None:
        if not self.timings:
            self.timings.append(StateTime(self.state, self.created_at))

    @property
    def live(self) -> bool:
        return not self.state.terminal

    @property
    def layers(self) -> range:
        return range(self.start_layer, self.end_layer)

    @property
    def number(self) -> int:
        return id_number(self.migration_id)

    def enter(self, state: MigrationState, now: float) -> None:
        if state not in TRANSITIONS[self.state]:
            raise TransitionError(f"{self.migration_id}: {self.state.name} -> {state.name}")
        self.timings[-1].left_at = now
        self.timings.append(StateTime(state, now))
        self.state = state
        if state.terminal:
            self.timings[-1].left_at = now

    def involves(self, worker_id: str) -> bool:
        return worker_id in (self.donor, self.helper)


def check_attention_request(
    donor: str,
    helper: str,
    max_sequences: int,
    max_blocks_per_sequence: int,
    request_ids: tuple[str, ...] = (),
    refill: bool = False,
) -> None:
    """What an attention migration request must be before anything else is looked at."""
    if not donor or not helper:
        raise InvalidRequestError("an attention migration needs a donor and a helper")
    check_id(donor, "donor")
    check_id(helper, "helper")
    check_request_ids(request_ids)
    if donor == helper:
        raise InvalidRequestError(f"donor and helper are the same worker ({donor})")
    if max_sequences < 0 or max_blocks_per_sequence < 0:
        raise InvalidRequestError("max_sequences and max_blocks_per_sequence must be >= 0")
    if refill and request_ids:
        raise InvalidRequestError("refill moves the longest running sequences: no request_ids")


def check_layer_request(
    donor: str, helper: str, start_layer: int, end_layer: int | None, num_micro_batches: int
) -> None:
    """What a layer migration request must be before anything else is looked at."""
    if not donor or not helper:
        raise InvalidRequestError("a layer migration needs a donor and a helper")
    check_id(donor, "donor")
    check_id(helper, "helper")
    if donor == helper:
        raise InvalidRequestError(f"donor and helper are the same worker ({donor})")
    if start_layer < 1:
        raise InvalidRequestError(
            f"start layer must be >= 1 (the donor keeps layer 0), got {start_layer}"
        )
    if end_layer is not None and end_layer <= start_layer:
        raise InvalidRequestError(f"empty layer range [{start_layer}, {end_layer})")
    if not 1 <= num_micro_batches <= MAX_MICRO_BATCHES:
        raise InvalidRequestError(
            f"micro-batches must be in [1, {MAX_MICRO_BATCHES}], got {num_micro_batches}"
        )
