"""Fencing tokens: a worker obeys the newest coordinator of its cluster, never an older one.

One coordinator owns a Redis key prefix at a time (services/coordinator/ownership.py), but
between the moment another takes the prefix over and the next renewal that tells the first one
(up to ``OWNER_INTERVAL_S``, or longer while Redis is away from the first), both could call the
same workers: two owners reverting, aborting or renewing one migration. So every claim of the
prefix gets an epoch, larger than any before it on that Redis — the claim script takes it from
Redis's clock in microseconds, or the last epoch + 1 if that is larger, so it grows across a
Redis restarted empty too, unless Redis's clock went back as well — and the coordinator sends
it with each call to a worker's MigrationWorkerService (metadata ``EPOCH_METADATA_KEY``). The
worker remembers the largest it has seen and refuses a call with a smaller one
(FAILED_PRECONDITION) before doing anything. Its writes to Redis are fenced by the claim
itself (services/coordinator/store.py).

A coordinator announces its epoch to every worker the router lists as soon as it holds the
claim and every ``ANNOUNCE_INTERVAL_S`` after (a ``List`` carrying it: reading is never fenced,
but a newer epoch on it is remembered), so a worker it has not called yet, or one that
restarted and has seen no epoch, refuses the older coordinator within that interval too.

A call without the key (a tool or test talking to a worker directly) is served as before.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.common.errors import InvalidRequestError, PreconditionError

EPOCH_METADATA_KEY = "banaserve-coordinator-epoch"
MAX_EPOCH = 2**63 - 1  # a Redis integer
# How often a coordinator tells every worker its epoch: the longest a worker it has not called
# (a new or restarted one) still obeys an older coordinator. A ``List`` per worker each time.
ANNOUNCE_INTERVAL_S = 2.0


def epoch_metadata(epoch: int) -> tuple[tuple[str, str], ...]:
    """The metadata a coordinator of ``epoch`` sends (none before it holds a claim)."""
    return ((EPOCH_METADATA_KEY, str(epoch)),) if epoch > 0 else ()


def epoch_from_metadata(metadata: Iterable[tuple[str, object]] | None) -> int | None:
    """The caller's epoch, or None when it sent none; a malformed one is INVALID_ARGUMENT."""
    values = [v for k, v in metadata or () if k == EPOCH_METADATA_KEY]
    if not values:
        return None
    text = values[-1]
    if len(values) > 1 or not isinstance(text, str) or not text.isascii() or not text.isdigit():
        raise InvalidRequestError(
            f"{EPOCH_METADATA_KEY} must be one decimal integer, got {values!r:.80}"
        )
    epoch = int(text)
    if not 0 < epoch <= MAX_EPOCH:
        raise InvalidRequestError(f"{EPOCH_METADATA_KEY} must be in [1, 2^63), got {text:.40}")
    return epoch


class CoordinatorFence:
    """A worker's memory of the newest coordinator that called it."""

    def __init__(self) -> None:
        self.highest = 0

    def admit(self, epoch: int | None) -> None:
        """Raises PreconditionError for a coordinator older than one already seen; else
        remembers ``epoch`` (None: a caller outside the coordinators' fencing, admitted)."""
        if epoch is not None and epoch < self.highest:
            raise PreconditionError(
                f"a newer coordinator (epoch {self.highest}) has called this worker: this one "
                f"(epoch {epoch}) lost its key prefix and may not act on its migrations"
            )
        self.observe(epoch)

    def observe(self, epoch: int | None) -> None:
        """Remembers a newer ``epoch`` without refusing an older one (a read: ``List``)."""
        if epoch is not None and epoch > self.highest:
            self.highest = epoch
