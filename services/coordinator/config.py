"""The coordinator's configuration (``__main__`` builds it from the flags)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.common.errors import ConfigError
from services.common.migration_states import SMALL_COPY_BYTES


@dataclass(frozen=True)
class CoordinatorConfig:
    # What a migration holds on a worker is undone by the worker this long after the last
    # renewal; the coordinator renews every renew_interval_s.
    lease_s: float = 10.0
    renew_interval_s: float = 2.0
    # One worker call (prepare, copy, switch...) at most; past it the migration aborts.
    step_timeout_s: float = 120.0
    # One worker's abort call at most (its lease undoes the rest).
    abort_timeout_s: float = 10.0
    # KV copies before the switch, at most: the first moves everything, each next one the
    # delta written meanwhile, so the switch's own delta (the pause) is small.
    copy_rounds: int = 2
    # A layer migration's copy round that moved at most this many bytes ends them early: the
    # switch copies once more before its pause anyway, and every round waits for the donor's
    # step in flight (2-3 s on a loaded prefill worker, whose sequences are handed off within a
    # step or two, so its rounds move little or nothing).
    copy_converged_bytes: int = SMALL_COPY_BYTES
    # Ended migrations kept (in the table ListMigrations answers from, and in Redis), the
    # newest: a record is ~1 KB (its reason at most 1 KiB), so 1,000 fill a quarter of a 4 MiB
    # reply; an automatic coordinator that moves every few minutes keeps a few days of history.
    keep_ended: int = 1000

    def __post_init__(self) -> None:
        for name in ("lease_s", "renew_interval_s", "step_timeout_s", "abort_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be finite and > 0, got {value}")
        if self.copy_converged_bytes < 0:
            raise ConfigError(f"copy_converged_bytes must be >= 0, got {self.copy_converged_bytes}")
        if self.keep_ended < 1:
            raise ConfigError(f"keep_ended must be >= 1, got {self.keep_ended}")
        if self.copy_rounds < 1:
            raise ConfigError(f"copy_rounds must be >= 1, got {self.copy_rounds}")
        if self.renew_interval_s >= self.lease_s:
            raise ConfigError(
                f"renew interval ({self.renew_interval_s} s) must be shorter than the lease "
                f"({self.lease_s} s)"
            )
