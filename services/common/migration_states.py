"""The states of one migration (DESIGN.md §5), one enum for the coordinator's record of it
(services/coordinator/migration.py, which holds the table of allowed moves) and for each
worker's own view of it (services/migration/records.py: the last step done on that worker).

    PLANNED ──► COPYING ──► SWITCHING ──► ACTIVE ──► REVERTING ──► DONE
       └───────────┴────────────┴───────────┴────────────┴──► ABORTED
"""

from __future__ import annotations

import enum

# KV a copy before the switch may leave to the switch's pause: the coordinator's rounds end at
# the first that moved at most this much (``CoordinatorConfig.copy_converged_bytes``), a donor
# skips a copy stage it bounds below it (``AgentConfig.precopy_skip_bytes``). 16 MiB: 2-34 ms
# of pause at the data planes' bandwidths `sim calibrate` measured here on 2026-12-03
# (0.5-8.2 GB/s, tcp and ucx, at 11:34, 13:56 and 14:55).
SMALL_COPY_BYTES = 16 << 20


class MigrationState(enum.Enum):
    PLANNED = "planned"
    COPYING = "copying"
    SWITCHING = "switching"
    ACTIVE = "active"
    REVERTING = "reverting"
    DONE = "done"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        """DONE or ABORTED: nothing more happens to the migration."""
        return self in (MigrationState.DONE, MigrationState.ABORTED)
