"""The faults of the chaos matrix and how one case runs.

One case (``run_case``):
1. ``NUM_REQUESTS`` greedy requests start through the client proxy; the fault waits until they
   are in flight (a token came back; for a migration case, every request decodes on the donor
   and the migration is brought to the case's state; a prefill donor's case sends a second
   ``NUM_REQUESTS`` as the fault starts, whose prompts its split computes);
2. the fault: SIGKILL (the supervisor restarts the process), SIGSTOP then SIGCONT after
   ``hold_s``, or a link's proxy in CUT, DELAY or BLACKHOLE for ``hold_s``, then PASS again, or
   STRAND (its open connections stall for good; new ones pass);
3. a migration is then ended (seen aborted, or reverted if it is still ACTIVE);
4. every request's outcome, each within its deadline plus a grace;
5. recovery, probed from the fault's end on, beside the requests still in flight: every child
   serving, both workers admitted by the router, and a new request served with the clean run's
   tokens; the time from the fault's start to that is ``recover_s``;
6. leaks: everything every worker, node and the coordinator holds must drop to nothing.
"""

from __future__ import annotations

import enum
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from services.client.client import BanaServeClient, BanaServeClientError
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as cpb
from services.rpc.gen.banaserve.v1 import decode_pb2, decode_pb2_grpc
from tests.chaos.cluster import WORKERS, ChaosCluster
from tests.chaos.load import NUM_REQUESTS, OK, PROMPTS, InFlight, Load, Tally, one
from tests.chaos.migrations import Migrations, state_name
from tests.chaos.proxy import Mode

SHORT = Load(max_tokens=32, deadline_s=60.0, gap_s=0.3)
LONG = Load(max_tokens=300, deadline_s=120.0)  # outlives a migration's start
PROBE = Load(max_tokens=SHORT.max_tokens, deadline_s=20.0)
RECOVER_WITHIN_S = 120.0
IDLE_WITHIN_S = 45.0  # a decode reservation's lease is 30 s


class Action(enum.Enum):
    KILL = "SIGKILL"
    STOP = "SIGSTOP"
    TERM = "SIGTERM"  # a stop on purpose (a rolling restart): the child drains, then exits
    LINK = "link"


class Phase(enum.Enum):
    """Where a migration is when the fault comes (NONE: no migration)."""

    NONE = ""
    STARTED = "right after StartMigration"
    COPYING = "COPYING (helper frozen in Prepare)"
    ACTIVE = "ACTIVE"
    REVERTING = "REVERTING"


@dataclass(frozen=True)
class Fault:
    action: Action
    target: str  # a child's name, or a proxy's for LINK
    mode: Mode = Mode.PASS  # LINK only
    hold_s: float = 3.0  # SIGSTOP, or the link's fault, lasts this long
    delay_s: float = 0.0  # DELAY only
    phase: Phase = Phase.NONE
    attention: bool = False  # the migration is an attention migration (else a layer one)
    prefill_donor: bool = False  # a layer migration prefill-0 → decode-0 (else decode → prefill)

    @property
    def migration(self) -> str:
        """How the name calls the case's migration (empty: none)."""
        if self.phase is Phase.NONE:
            return ""
        kind = "attention " if self.attention else "prefill-donor " if self.prefill_donor else ""
        return f"{kind}migration {self.phase.value}"

    @property
    def name(self) -> str:
        if self.action is Action.LINK:
            what = f"{self.mode.value} {LINKS[self.target]}"
            if self.mode is Mode.STRAND:  # for good: only new connections pass after
                what += "'s open connections"
            else:
                if self.mode is Mode.DELAY:
                    what += f" (+{self.delay_s * 1e3:.0f} ms each way)"
                what += f" for {self.hold_s:g} s"
            return what + (f", {self.migration}" if self.migration else "")
        what = f"{self.action.value} {self.target}"
        if self.action is Action.STOP:
            what += f" for {self.hold_s:g} s"
        if self.migration:
            helper = "decode-0" if self.prefill_donor else "prefill-0"
            role = " (helper)" if self.target == helper else ""
            what += f"{role}, {self.migration}"
        return what


LINKS = {
    "client": "client → router",
    "reports": "workers → router",
    "kvstore": "prefill → kvstore",
    "redis": "kvstore → Redis",
    "to-prefill": "router, decode, coordinator → prefill",
    "to-decode": "router, prefill, coordinator → decode",
    "handoff": "prefill → decode KV data plane",
    "store-data": "prefill → kvstore data plane",
    "migration-data": "decode → prefill migration data plane",
    "migration-data-decode": "prefill → decode migration data plane",
}


@dataclass
class CaseResult:
    fault: str
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    hung: int = 0
    wrong: int = 0
    leaked: dict[str, Any] = field(default_factory=dict)
    recover_s: float | None = None  # None: the cluster did not serve again in time
    idle_s: float = 0.0
    restarts: int = 0
    note: str = ""
    supervisor: list[str] = field(default_factory=list)  # what it said during the case
    messages: dict[str, str] = field(default_factory=dict)  # status -> a failure's details

    @property
    def ok(self) -> bool:
        return not (self.hung or self.wrong or self.leaked) and self.recover_s is not None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def clean_run(cluster: ChaosCluster, load: Load) -> list[tuple[int, ...]]:
    outcomes = InFlight(cluster.proxies["client"].address, load).outcomes()
    assert all(o.status == OK for o in outcomes), outcomes
    return [o.token_ids for o in outcomes]


def run_case(cluster: ChaosCluster, fault: Fault, clean: dict[Load, list]) -> CaseResult:
    load = SHORT if fault.phase is Phase.NONE else LONG
    deadline = time.monotonic() + RECOVER_WITHIN_S
    while not cluster.running():  # a previous case's restart still under way
        assert time.monotonic() < deadline, "a service is still restarting"
        time.sleep(0.1)
    result = CaseResult(fault.name)
    restarts, lines = cluster.num_restarts(), len(cluster.console_lines())
    flight = InFlight(cluster.proxies["client"].address, load)
    migrations = Migrations(lambda: cluster.address("coordinator"))
    if not flight.wait_started():
        result.note = "every request ended before the fault; "
    mid = _before(cluster, fault, migrations)
    # A prefill donor's split runs only while prompts are computed, and the load's are done by
    # ACTIVE: a second load arrives through the fault.
    during = InFlight(cluster.proxies["client"].address, SHORT) if fault.prefill_donor else None
    started = time.monotonic()
    killed = _inject(cluster, fault)
    # Probed beside the requests still in flight: serving again need not wait for them.
    with ThreadPoolExecutor(1) as pool:
        recovered = pool.submit(_recover, cluster, clean[SHORT][0], started, killed)
        if mid:
            m = migrations.end(mid)
            result.note += f"{mid} {state_name(m.state)}" + (f": {m.reason}" if m.reason else "")
        outcomes, cleans = flight.outcomes(), clean[load]
        if during is not None:
            outcomes, cleans = outcomes + during.outcomes(), cleans + clean[SHORT]
        tally = Tally.of(outcomes, cleans)
        result.recover_s = recovered.result()
    result.completed, result.failed, result.hung, result.wrong, result.messages = (
        tally.completed,
        tally.failed,
        tally.hung,
        tally.wrong,
        tally.messages,
    )
    result.leaked, result.idle_s = cluster.wait_idle(IDLE_WITHIN_S)
    result.restarts = cluster.num_restarts() - restarts
    result.supervisor = cluster.console_lines()[lines:]
    return result


def _before(cluster: ChaosCluster, fault: Fault, migrations: Migrations) -> str:
    """Starts the migration and brings it to the fault's phase; its id ("" without one)."""
    if fault.phase is Phase.NONE:
        return ""
    _wait_decoding(cluster.address("decode-0"))
    with BanaServeClient(cluster.address("router")) as client:
        ids = {w.address: w.worker_id for w in client.list_workers()}
    donor, helper = ids[cluster.registered("decode-0")], ids[cluster.registered("prefill-0")]
    if fault.prefill_donor:
        donor, helper = helper, donor
    mid = migrations.start(donor, helper, attention=fault.attention)
    if fault.phase is Phase.COPYING:
        cluster.signal("prefill-0", signal.SIGSTOP)
        migrations.wait(mid, lambda m: m.state == cpb.MIGRATION_STATE_COPYING, 30)
    elif fault.phase in (Phase.ACTIVE, Phase.REVERTING):
        active = migrations.settled(mid)
        assert active.state == cpb.MIGRATION_STATE_ACTIVE, active.reason
        if fault.phase is Phase.REVERTING:
            migrations.revert(mid)
    return mid


def _wait_decoding(decode: str, within_s: float = 60.0) -> None:
    """Every request decodes on the donor and none is still arriving (a switch waits for
    imports to end)."""
    deadline = time.monotonic() + within_s
    with grpc.insecure_channel(decode) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        while True:
            s = stub.Stats(decode_pb2.DecodeServiceStatsRequest(), timeout=10)
            if s.num_running_seqs == NUM_REQUESTS and not s.reservations:
                return
            assert time.monotonic() < deadline, f"requests not all decoding: {s}"
            time.sleep(0.02)


def _inject(cluster: ChaosCluster, fault: Fault) -> int:
    """The fault, held for its length; the killed process's pid (0 if none was killed)."""
    killed = 0
    if fault.action is Action.KILL:
        killed = cluster.signal(fault.target, signal.SIGKILL)
    elif fault.action is Action.TERM:  # restarted once it has drained and exited
        killed = cluster.signal(fault.target, signal.SIGTERM)
    elif fault.action is Action.STOP:
        cluster.signal(fault.target, signal.SIGSTOP)
        time.sleep(fault.hold_s)  # the fault's length, not a wait for a state
        cluster.signal(fault.target, signal.SIGCONT)
    else:
        proxy = cluster.proxies[fault.target]
        proxy.set(fault.mode, fault.delay_s)
        time.sleep(fault.hold_s)
        proxy.set(Mode.PASS)
    if fault.phase is Phase.COPYING:
        cluster.signal("prefill-0", signal.SIGCONT)
    return killed


def _recover(
    cluster: ChaosCluster, want: tuple[int, ...], started: float, killed: int
) -> float | None:
    """Seconds from the fault until the cluster serves a new request correctly, the killed
    process replaced, every child running and both workers admitted; None if not within
    ``RECOVER_WITHIN_S``."""
    deadline = started + RECOVER_WITHIN_S
    router = cluster.address("router")
    while time.monotonic() < deadline:
        restarted = killed not in cluster.pids()
        if restarted and cluster.running() and _admitted(router) and _serves(cluster, want):
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def _admitted(router: str) -> bool:
    try:
        with BanaServeClient(router) as client:
            active = {w.worker_id.rsplit("-", 1)[0] for w in client.list_workers() if w.active}
    except BanaServeClientError:
        return False
    return active == {w.rsplit("-", 1)[0] for w in WORKERS}


def _serves(cluster: ChaosCluster, want: tuple[int, ...]) -> bool:
    with BanaServeClient(cluster.proxies["client"].address) as client:
        outcome = one(client, PROMPTS[0], PROBE, threading.Event())
    return outcome.status == OK and outcome.token_ids == want
