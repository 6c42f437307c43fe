"""The clusters ``banaserve bench compare`` runs against, and what it watches while they serve.

A mode is a ``banaserve up`` command line: ``up_argv(mode, ...)`` is the one place that maps a
mode to ``up`` flags (``MODE_UP_ARGS``). Lifecycle of one cluster (``UpCluster``):

1. ``python -m services.cli up ARGS`` starts in a process group of its own; its stdout lines
   ``NAME HOST:PORT`` name the services until ``cluster ready`` (bounded by ``start_timeout_s``);
   the rest of its output goes to the log file;
2. the benchmark sends its workloads to ``router`` while a ``Watcher`` samples the router's
   ``ListWorkers`` (every worker's last load report, as the coordinator's policy sees it) and,
   when there is one, the coordinator's ``ListMigrations``;
3. ``stop`` sends SIGTERM (``up`` stops its services in order) and waits, bounded; an ``up``
   that does not exit in time is killed with its process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from services.common.errors import DependencyUnavailableError
from services.common.load import utilisation, utilisation_compute, utilisation_memory
from services.launcher import MODE_FIELDS, Mode, mode_spec
from services.router.core import RouterConfig
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from services.rpc.load_reports import load_from_proto

MODES = tuple(m.value for m in Mode)

# ``banaserve up`` flags per mode: ``up --mode`` decides the workers (two: ``--workers`` 2),
# routing, store and coordinator (``services.launcher.mode_spec``). Before ``--mode`` existed:
# colocated ``--prefill 0 --decode 0 --mixed 2 --policy colocated --kvstore 0``, static-pd
# ``--prefill 1 --decode 1 --policy load --kvstore 0``, banaserve the same with ``--kvstore 1
# --coordinator``.
MODE_UP_ARGS: dict[Mode, tuple[str, ...]] = {m: ("--mode", m.value) for m in Mode}


def mode_cluster(mode: Mode) -> dict:
    """What ``up --mode`` builds for two workers: the fields the mode decides (the report
    records them; the simulator replays them)."""
    spec = mode_spec(mode, 2)
    fields = {f: getattr(spec, f) for f in sorted(MODE_FIELDS)}
    return fields | {"service_args": {k: list(v) for k, v in spec.service_args.items()}}


def up_argv(mode: Mode, model: str, threads: int, pin: bool, extra: tuple[str, ...] = ()) -> list:
    """The whole ``up`` command line of ``mode`` (same model, threads and pinning for all)."""
    argv = [sys.executable, "-m", "services.cli", "up", "--model", model]
    argv += ["--threads", str(threads), *(["--pin"] if pin else []), *MODE_UP_ARGS[mode]]
    return argv + list(extra)


class UpCluster:
    """One ``banaserve up`` process; ``addresses`` maps service name to HOST:PORT once started."""

    def __init__(self, argv: list[str], log_path: Path, start_timeout_s: float = 180.0) -> None:
        self.argv = argv
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.addresses: dict[str, str] = {}
        self.ready = False  # ``cluster ready`` was printed
        self._proc: subprocess.Popen | None = None
        self._pump: threading.Thread | None = None

    @property
    def router(self) -> str:
        return self.addresses["router"]

    @property
    def coordinator(self) -> str | None:
        return self.addresses.get("coordinator")

    def start(self) -> None:
        log = open(self.log_path, "w")  # noqa: SIM115 (the pump thread owns and closes it)
        log.write("$ " + " ".join(self.argv) + "\n")
        log.flush()
        # A process group of its own (``stop`` kills it whole), but this process's session:
        # with the kernel's autogroup scheduling (sched_autogroup_enabled, on by default on this
        # machine) a session is a scheduling group, and a cluster in a session of its own, its
        # workers pinned to every core, starved this client for 1-3 s at a time (runnable,
        # not run), which showed as token gaps in every stream and delayed sends.
        self._proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=log, text=True, process_group=0
        )
        ready = threading.Event()
        self._pump = threading.Thread(target=self._read, args=(log, ready), daemon=True)
        self._pump.start()
        ready.wait(self.start_timeout_s)
        if not self.ready or "router" not in self.addresses or self._proc.poll() is not None:
            self.stop()
            raise DependencyUnavailableError(f"banaserve up did not get ready; see {self.log_path}")

    def _read(self, log: IO[str], ready: threading.Event) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with log:
            for line in self._proc.stdout:
                log.write(line)
                log.flush()
                name, _, address = line.strip().partition(" ")
                if line.startswith("cluster ready"):
                    self.ready = True
                    ready.set()
                elif not ready.is_set() and address.count(":") == 1 and " " not in address:
                    self.addresses[name] = address
        ready.set()  # ended (before ready: start() sees it)

    def stop(self, timeout_s: float = 90.0) -> int | None:
        """SIGTERM, wait; kill the group if ``up`` hangs. Its exit code (None: killed)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        if self._pump is not None:
            self._pump.join(5.0)
        return code

    def __enter__(self) -> UpCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- watching ---------------------------------------------------------------------------

_ROLES = {
    common_pb2.WORKER_ROLE_PREFILL: "prefill",
    common_pb2.WORKER_ROLE_DECODE: "decode",
    common_pb2.WORKER_ROLE_MIXED: "mixed",
}
# A migration in one of these still holds something on its workers.
LIVE_STATES = ("PLANNED", "COPYING", "SWITCHING", "ACTIVE", "REVERTING")


def worker_sample(w: router_pb2.Worker, prefill_capacity_tokens: int) -> dict:
    load, waiting = load_from_proto(w.last_load), w.num_waiting_for_room
    return {
        "role": _ROLES.get(w.info.role, "unspecified"),
        "utilisation": utilisation(load, prefill_capacity_tokens, waiting),
        "u_compute": utilisation_compute(load, prefill_capacity_tokens),
        "u_memory": utilisation_memory(load, waiting),
        "num_waiting_for_room": waiting,
        "busy_fraction": load.busy_fraction,
        "num_queued_prefill_tokens": load.num_queued_prefill_tokens,
        "num_running_seqs": load.num_running_seqs,
        "num_waiting_seqs": load.num_waiting_seqs,
        "num_hosted_layers": load.num_hosted_layers,
        "num_hosted_blocks": load.num_hosted_blocks,
    }


def migration_sample(m: coordinator_pb2.Migration) -> dict:
    return {
        "id": m.migration_id,
        "kind": coordinator_pb2.MigrationKind.Name(m.kind).removeprefix("MIGRATION_KIND_"),
        "state": coordinator_pb2.MigrationState.Name(m.state).removeprefix("MIGRATION_STATE_"),
        "donor": m.donor,
        "helper": m.helper,
        "layers": [m.start_layer, m.end_layer],
        "reason": m.reason,
        # What the coordinator measured of it so far: seconds in each state left, the weights
        # shipped and the KV copied (bytes, seconds), the switch's pause.
        "state_s": {
            coordinator_pb2.MigrationState.Name(t.state).removeprefix(
                "MIGRATION_STATE_"
            ): t.duration.ToTimedelta().total_seconds()
            for t in m.timings
        },
        "weights_bytes": m.num_weight_bytes,
        "weights_s": m.weights_duration.ToTimedelta().total_seconds(),
        "kv_copy_bytes": m.num_copy_kv_bytes,
        "kv_copy_s": m.kv_copy_duration.ToTimedelta().total_seconds(),
        "switch_pause_s": m.switch_pause.ToTimedelta().total_seconds(),
    }


@dataclass
class Watch:
    """What a ``Watcher`` saw: ``samples`` of ``{"t": s, "workers": {id: worker_sample}}``, and
    one event per migration state first seen (``{"t", "id", "state", ...}``). ``t`` is seconds
    since ``t0`` (``time.perf_counter``)."""

    t0: float
    samples: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    migrations: dict[str, dict] = field(default_factory=dict)  # last seen, by id
    num_missed: int = 0


class Watcher:
    """Samples the router (and the coordinator) every ``every_s`` until cancelled."""

    def __init__(self, router: str, coordinator: str | None, every_s: float = 0.25) -> None:
        self._router_channel = grpc.aio.insecure_channel(router)
        self._router = router_pb2_grpc.RouterServiceStub(self._router_channel)
        self._coord_channel = grpc.aio.insecure_channel(coordinator) if coordinator else None
        self._coord = (
            coordinator_pb2_grpc.CoordinatorServiceStub(self._coord_channel)
            if self._coord_channel
            else None
        )
        self.every_s = every_s
        self.capacity = RouterConfig().prefill_capacity_tokens

    async def workers(self) -> dict[str, dict]:
        reply = await self._router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=2.0)
        return {w.info.worker_id: worker_sample(w, self.capacity) for w in reply.workers}

    async def migrations(self) -> list[dict]:
        """Every migration the coordinator keeps (none without one); raises AioRpcError."""
        if self._coord is None:
            return []
        reply = await self._coord.ListMigrations(
            coordinator_pb2.ListMigrationsRequest(), timeout=2.0
        )
        return [migration_sample(m) for m in reply.migrations]

    async def sample(self, watch: Watch) -> None:
        t = time.perf_counter() - watch.t0
        try:
            workers, migrations = await asyncio.gather(self.workers(), self.migrations())
        except grpc.aio.AioRpcError:
            watch.num_missed += 1  # a sample missed is not a failed run
            return
        watch.samples.append({"t": t, "workers": workers})
        for m in migrations:
            if watch.migrations.get(m["id"], {}).get("state") != m["state"]:
                watch.events.append({"t": t, **m})
            watch.migrations[m["id"]] = m

    async def run(self, watch: Watch) -> None:
        while True:
            await self.sample(watch)
            await asyncio.sleep(self.every_s)

    async def settle(self, timeout_s: float, watch: Watch | None = None) -> float:
        """Waits (bounded) until no worker has work and no migration is live (the coordinator
        reverts an idle cluster's migrations on its own); returns the seconds waited. What is
        still live then carries over into the next workload. Migration events seen meanwhile
        go to ``watch`` (the run that just ended); its samples do not."""
        start = time.perf_counter()
        probe = Watch(watch.t0 if watch else start)
        if watch is not None:
            probe.migrations = watch.migrations  # shared: one record of each state seen
        while time.perf_counter() - start < timeout_s:
            await self.sample(probe)
            last = probe.samples[-1]["workers"] if probe.samples else {}
            busy = any(
                w["num_running_seqs"] or w["num_waiting_seqs"] or w["num_queued_prefill_tokens"]
                for w in last.values()
            )
            live = any(m["state"] in LIVE_STATES for m in probe.migrations.values())
            if last and not busy and not live:
                break
            await asyncio.sleep(self.every_s)
        if watch is not None:
            watch.events += probe.events
        return time.perf_counter() - start

    async def close(self) -> None:
        await self._router_channel.close()
        if self._coord_channel is not None:
            await self._coord_channel.close()
