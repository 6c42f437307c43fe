"""Which faults the chaos suite injects: the short list of the default test run, and the full
matrix (``-m chaos``, ``make chaos``)."""

from __future__ import annotations

from tests.chaos.faults import Action, Fault, Phase
from tests.chaos.proxy import Mode

PROCESSES = ("prefill-0", "decode-0", "kvstore-0", "router")
# Every proxied link (tests/chaos/cluster.py says which calls each carries).
LINKS = (
    "client",
    "reports",
    "kvstore",
    "redis",
    "to-prefill",
    "to-decode",
    "handoff",
    "store-data",
)


def link_faults(link: str, phase: Phase = Phase.NONE, **kind: bool) -> list[Fault]:
    """``kind``: ``attention`` or ``prefill_donor`` (a migration case's kind)."""
    kw = {"phase": phase, **kind}
    return [
        Fault(Action.LINK, link, Mode.CUT, **kw),
        Fault(Action.LINK, link, Mode.DELAY, delay_s=0.3, **kw),
        Fault(Action.LINK, link, Mode.BLACKHOLE, **kw),
        Fault(Action.LINK, link, Mode.STRAND, **kw),
    ]


# A few representative faults, one per way of failing: a process killed (restarted and
# re-admitted), a process frozen, a link cut.
SHORT = [
    Fault(Action.KILL, "decode-0"),
    Fault(Action.STOP, "prefill-0", hold_s=2.0),
    Fault(Action.LINK, "kvstore", Mode.CUT, hold_s=2.0),
]

# Migrations first: the Redis cases empty the coordinator's store too.
FULL = [
    Fault(Action.KILL, "coordinator", phase=Phase.STARTED),
    Fault(Action.KILL, "coordinator", phase=Phase.COPYING),
    Fault(Action.KILL, "coordinator", phase=Phase.ACTIVE),
    Fault(Action.KILL, "coordinator", phase=Phase.REVERTING),
    Fault(Action.STOP, "coordinator", phase=Phase.ACTIVE),
    # Its rolling restart: the migration stays ACTIVE for the restarted coordinator.
    Fault(Action.TERM, "coordinator", phase=Phase.ACTIVE),
    Fault(Action.KILL, "prefill-0", phase=Phase.ACTIVE),
    Fault(Action.STOP, "prefill-0", phase=Phase.ACTIVE),
    # Stopped on purpose: the coordinator reverts the migration before the worker goes.
    Fault(Action.TERM, "prefill-0", phase=Phase.ACTIVE),
    Fault(Action.TERM, "decode-0", phase=Phase.ACTIVE),
    # The layer migration's data plane (every step's hidden states) while it is ACTIVE.
    *link_faults("migration-data", Phase.ACTIVE),
    # An attention migration's helper, coordinator and per-layer exchange while it is ACTIVE.
    Fault(Action.KILL, "prefill-0", phase=Phase.ACTIVE, attention=True),
    Fault(Action.STOP, "prefill-0", phase=Phase.ACTIVE, attention=True),
    Fault(Action.TERM, "prefill-0", phase=Phase.ACTIVE, attention=True),
    Fault(Action.KILL, "coordinator", phase=Phase.ACTIVE, attention=True),
    *link_faults("migration-data", Phase.ACTIVE, attention=True),
    # A prefill donor's layers on decode-0: its helper killed, and its data plane faulted.
    Fault(Action.KILL, "decode-0", phase=Phase.ACTIVE, prefill_donor=True),
    *link_faults("migration-data-decode", Phase.ACTIVE, prefill_donor=True),
    *[
        Fault(action, name)
        for name in PROCESSES
        for action in (Action.KILL, Action.STOP, Action.TERM)
    ],
    *[f for link in LINKS for f in link_faults(link)],
    Fault(Action.KILL, "redis"),
    Fault(Action.STOP, "redis"),
]
