"""The states of one migration (DESIGN.md §5), one enum for the coordinator's record of it
(services/coordinator/migration.py, which holds the table of allowed moves) and for each
worker's own view of it (services/migration/records.py: the last step done on that worker).

    PLANNED ──► COPYING ──► SWITCHING ──► ACTIVE ──► REVERTING ──► DONE
       └───────────┴────────────┴───────────┴────────────┴──► ABORTED
"""

from __future__ import annotations

import enum


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
