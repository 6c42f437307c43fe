"""``banaserve up``'s cluster (its command, flags and supervision: services/up.py): every service
its own process on 127.0.0.1.

Lifecycle:
1. Redis starts first (``redis-server`` if installed, else the embedded fakeredis server) on a
   port picked here; it is ready once it answers PING;
2. the kvstore nodes and the router start next; each service prints ``LISTENING HOST:PORT``
   once it serves. The nodes share Redis under a key prefix unique to this cluster, so two
   clusters on one Redis never see each other's blocks;
3. the workers start together, each pointed at the router (prefill workers also at kvstore-0:
   any node answers lookups), and register with it; the coordinator, with ``--coordinator``,
   starts beside them (it finds the workers through the router as they register, and keeps
   its migrations in the same Redis under a key prefix of its own);
4. the cluster is ready once every worker shows as active in the router's ``ListWorkers``
   and the coordinator serves. A stop
   asked for meanwhile (``stopping``: ``up``'s SIGINT/SIGTERM) ends steps 1-4 within a poll,
   before the next child starts or while one loads: what started is stopped as in 6, and
   ``start`` raises StartInterrupted;
5. it runs until SIGINT/SIGTERM. A child that exits on its own is restarted on the port it had,
   after a growing delay, and the rest serve on (``services/supervisor.py``: Redis comes back
   empty and the nodes announce their blocks again; workers register again and the router
   admits them; workers reconnect to a restarted router); a child that keeps dying
   (``--max-restarts`` within ``--restart-window``) brings the cluster down;
6. stopping goes router first (it drains while the workers still serve its requests), then
   the workers (together), then the coordinator (still up while the workers drain: it reverts
   a stopping worker's migrations, docs/coordinator.md "Leases"), then the kvstore nodes and
   Redis last (so the nodes can withdraw their blocks, and the coordinator's records are
   kept), sending each group SIGTERM and waiting for each child (its
   ``--drain-timeout``, then ``STOP_TIMEOUT_S`` more); a child that does not exit in time, or
   any still running after a second Ctrl-C, is killed and reported. Children run in process
   groups of their own, so a Ctrl-C in the terminal reaches the launcher alone and this order
   holds.

``--kvstore 0`` leaves out the kvstore nodes, and Redis too unless ``--coordinator`` needs it;
prefill workers then get no store.
"""

from __future__ import annotations

import enum
import math
import os
import secrets
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from services.child_process import Child, RedisChild, StartInterrupted
from services.common.engine_args import KV_TRANSPORTS
from services.common.errors import ConfigError
from services.common.limits import MAX_THREADS
from services.common.parent import child_env
from services.kvstore.redis_server import free_port
from services.rpc.dataplane import KINDS as DATA_TRANSPORTS
from services.rpc.security import REDIS_SECRET_FILE, read_tokens, redis_password, security_argv
from services.supervisor import (
    START_TIMEOUT_S,
)

# The data planes of a cluster on one host. TCP: on a 2-vCPU machine UCX (shared memory and
# tcp/lo, through ucxx, its progress thread sharing each pinned worker's one core) made every
# PD mode slower — TPOT p50 15-41 % lower on TCP in each of six workload x mode pairs run back
# to back (docs/benchmarks.md, session 13) — and its listener binds every interface where the
# TCP plane binds loopback (docs/security.md). UCX stays one flag away (``--kv-transport ucx``) for hosts where
# its transports pay.
LOCAL_DATA_PLANE = "tcp"

WORKER_ROLES = ("prefill", "decode", "mixed")  # the names of the worker children: ROLE-i


@dataclass(frozen=True)
class ClusterSpec:
    model: str = "tiny-llama"
    num_prefill: int = 1
    num_decode: int = 1
    # Colocated workers (``--role mixed``): prefill and decode their own requests.
    num_mixed: int = 0
    threads: int = 1
    pin: bool = False
    policy: str = "load"
    num_kv_blocks: int | None = None
    # KV store nodes sharing one Redis; 0: no store (and no Redis).
    num_kvstore: int = 1
    # One host's data planes: TCP, not UCX (``LOCAL_DATA_PLANE``).
    kvstore_transport: str = LOCAL_DATA_PLANE
    # The data plane decode (and mixed) workers take KV on; "none": the TransferKV stream only.
    kv_transport: str = LOCAL_DATA_PLANE
    kvstore_capacity_bytes: int = 1 << 30
    # False: prefill workers fetch a cached prefix whole before computing (a baseline).
    kvstore_overlap: bool = True
    # Seconds a prefill worker's store write-back may wait for it to be idle (None: its default,
    # services/prefill/write_backs.py; 0: at once).
    store_write_back_delay_s: float | None = None
    # Which new blocks prefill workers write to the store, "reused" or "all" (None: their
    # default, services/prefill/write_backs.py).
    store_write_policy: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # The coordinator service (services/coordinator/): runs migrations on request.
    coordinator: bool = False
    # Mutual TLS (``banaserve certs DIR``) and the client API's tokens: off by default on
    # 127.0.0.1, given to every service when set (docs/security.md).
    tls_dir: str = ""
    api_token_file: str = ""
    # Extra flags per service module ("router", "prefill", "decode", "kvstore"), appended to
    # its command line (e.g. the admission limits, docs/reliability.md).
    service_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Every service serves Prometheus metrics, each on a free port of its host (``up
    # --metrics``; a ``--metrics-port`` in ``service_args`` wins); ``Child.metrics_address``.
    metrics: bool = False

    def __post_init__(self) -> None:
        counts = (self.num_prefill, self.num_decode, self.num_mixed)
        if min(counts) < 0:
            raise ConfigError(f"worker counts must be >= 0, got {counts}")
        if self.num_prefill + self.num_mixed < 1 or self.num_decode + self.num_mixed < 1:
            raise ConfigError(
                "a cluster needs a worker that prefills and one that decodes "
                "(at least one prefill and one decode worker, or one mixed worker)"
            )
        if self.policy == "colocated" and self.num_mixed < 1:
            raise ConfigError("policy 'colocated' needs at least one mixed worker (--mixed K)")
        if not 1 <= self.threads <= MAX_THREADS:
            raise ConfigError(f"threads must be in 1..{MAX_THREADS}, got {self.threads}")
        if self.num_kvstore < 0:
            raise ConfigError(f"kvstore nodes must be >= 0, got {self.num_kvstore}")
        if self.kvstore_transport not in DATA_TRANSPORTS:
            raise ConfigError(
                f"kvstore transport must be one of {', '.join(DATA_TRANSPORTS)}, "
                f"got {self.kvstore_transport!r}"
            )
        if self.kv_transport not in KV_TRANSPORTS:
            raise ConfigError(
                f"kv transport must be one of {', '.join(KV_TRANSPORTS)}, got {self.kv_transport!r}"
            )
        store_transport = self.kvstore_transport if self.num_kvstore else ""
        if self.tls_dir and "ucx" in (self.kv_transport, store_transport):
            raise ConfigError(
                "with --tls-dir every data plane must authenticate its peers and UCX does not "
                "(docs/security.md): pass --kv-transport tcp and --kvstore-transport tcp"
            )
        if self.kvstore_capacity_bytes < 1:
            raise ConfigError(
                f"kvstore capacity must be >= 1 byte, got {self.kvstore_capacity_bytes}"
            )
        delay = self.store_write_back_delay_s
        if delay is not None and not (math.isfinite(delay) and delay >= 0):
            raise ConfigError(f"store write-back delay must be >= 0 seconds, got {delay}")
        if self.store_write_policy not in (None, "reused", "all"):
            raise ConfigError(
                f"store write policy must be 'reused' or 'all', got {self.store_write_policy!r}"
            )
        processes = {"prefill": self.num_prefill, "decode": self.num_decode + self.num_mixed,
                     "kvstore": self.num_kvstore}  # fmt: skip
        for module, count in processes.items():
            names = {a.split("=", 1)[0] for a in self.service_args.get(module, ())}
            if count > 1 and (flags := sorted(names & ONE_PROCESS_FLAGS)):
                raise ConfigError(
                    f"{flags[0]} names one process's port, address, id or directory, and this "
                    f"cluster runs {count} {module} processes: each would get the same"
                )

    @property
    def modules(self) -> set[str]:
        """The service modules this cluster runs (``service_args``' keys)."""
        optional = {"prefill": self.num_prefill, "kvstore": self.num_kvstore,
                    "coordinator": self.coordinator}  # fmt: skip
        return {"router", "decode", *(name for name, count in optional.items() if count)}

    @property
    def unused_service_args(self) -> list[str]:
        """The services ``service_args`` has flags for that this cluster does not run: said,
        not refused (``bench compare --up-args`` gives every mode the same flags, and a
        colocated cluster runs no coordinator)."""
        return sorted(k for k, v in self.service_args.items() if v and k not in self.modules)


# Flags whose value belongs to one process: refused in the extra flags of a service that runs
# more than one (``up --decode 2 --decode-args "--data-port 5000"`` started a second worker
# that could not bind, or two that registered one address).
ONE_PROCESS_FLAGS = frozenset(
    {"--port", "--data-port", "--http-port", "--metrics-port", "--advertise", "--advertise-data",
     "--worker-id", "--node-id", "--migration-data-port", "--advertise-migration-data",
     "--disk-dir"}
)  # fmt: skip


class Mode(enum.Enum):
    """``banaserve up --mode``: one system run three ways (DESIGN.md §5, Modes)."""

    COLOCATED = "colocated"  # mixed workers, prefix-affinity routing, no store (vLLM-style)
    STATIC_PD = "static-pd"  # fixed prefill/decode split, no store, no migration (DistServe)
    BANASERVE = "banaserve"  # split + store + load-only routing + automatic coordinator


# What a mode decides; the rest of a ClusterSpec is the same in every mode.
MODE_FIELDS = frozenset(
    {"num_prefill", "num_decode", "num_mixed", "policy", "num_kvstore", "coordinator"}
)


# ``banaserve``'s flags of its services, before any given for them (the last of a flag wins):
# the coordinator decides on its own; and a decode worker prefills a prompt itself when its
# prefix cache holds all but at most 128 of its tokens, or any prompt while the prefill worker
# it would go to has 1,280 prompt tokens queued and it fewer (conditional disaggregation, the
# router's rule: docs/services.md; 1,024 until session 31, when 1,280 left it fewer long
# prompts, the prefill worker idle less, and mixed's makespan 6-7 % shorter), at most 64
# tokens a step, its decodes' included: a prompt it takes then delays its decodes by under 64
# prompt tokens' compute a step (~0.15 s here),
# not by a whole prompt or a long chunk (docs/benchmarks.md, sessions 29 and 30: on a machine
# whose one prefill worker saturates, this is what makes banaserve serve what static PD cannot,
# within the TPOT SLO).
BANASERVE_SERVICE_ARGS: dict[str, tuple[str, ...]] = {
    "coordinator": ("--auto",),
    "router": ("--local-prefill-max-tokens", "128", "--local-prefill-queue-tokens", "1280"),
    "decode": ("--max-num-batched-tokens", "64"),
}


def mode_spec(
    mode: Mode, num_workers: int = 2, num_prefill: int | None = None, **fields: Any
) -> ClusterSpec:
    """The cluster of ``mode`` with ``num_workers`` workers in all: colocated, that many mixed
    workers; a PD mode, ``num_prefill`` prefill workers (default: half, at least one) and the
    rest decode. ``fields``: the other ClusterSpec fields (model, threads, pin...); the
    services of ``banaserve`` run with ``BANASERVE_SERVICE_ARGS`` before their own
    ``service_args``."""
    if num_workers < 1 or (mode is not Mode.COLOCATED and num_workers < 2):
        raise ConfigError(f"mode {mode.value} needs more workers than {num_workers}")
    owned = sorted(MODE_FIELDS & fields.keys())
    if mode is Mode.COLOCATED and num_prefill is not None:  # every worker is a mixed one
        owned.insert(0, "num_prefill")
    if owned:
        raise ConfigError(f"mode {mode.value} decides {', '.join(owned)}")
    if mode is Mode.COLOCATED:
        return ClusterSpec(
            num_prefill=0, num_decode=0, num_mixed=num_workers, policy="colocated",
            num_kvstore=0, **fields,
        )  # fmt: skip
    prefill = max(1, num_workers // 2) if num_prefill is None else num_prefill
    if not 1 <= prefill < num_workers:
        raise ConfigError(f"{prefill} prefill workers of {num_workers}: leave one to decode")
    split = {"num_prefill": prefill, "num_decode": num_workers - prefill, "num_mixed": 0}
    if mode is Mode.STATIC_PD:
        return ClusterSpec(**split, policy="load", num_kvstore=0, **fields)
    given = fields.pop("service_args", {})
    service_args = {k: (*v, *given.get(k, ())) for k, v in BANASERVE_SERVICE_ARGS.items()}
    service_args |= {k: tuple(v) for k, v in given.items() if k not in service_args}
    return ClusterSpec(
        **split, policy="load", num_kvstore=1, coordinator=True, service_args=service_args,
        **fields,
    )  # fmt: skip


def process_names(spec: ClusterSpec) -> list[str]:
    """The processes ``LocalCluster(spec).start`` runs, in start order."""
    store = spec.num_kvstore > 0
    names = ["redis"] if store or spec.coordinator else []
    names += [f"kvstore-{i}" for i in range(spec.num_kvstore)] + ["router"]
    for role, count in (
        ("prefill", spec.num_prefill),
        ("decode", spec.num_decode),
        ("mixed", spec.num_mixed),
    ):
        names += [f"{role}-{i}" for i in range(count)]
    return names + (["coordinator"] if spec.coordinator else [])


class LocalCluster:
    def __init__(
        self,
        spec: ClusterSpec,
        log: IO[str] = sys.stderr,
        stopping: threading.Event | None = None,
    ) -> None:
        """``stopping``: set (by ``up``'s SIGINT/SIGTERM handler) to end ``start`` early: it
        then stops what it started and raises StartInterrupted."""
        self.spec = spec
        self.log = log
        self.stopping = stopping or threading.Event()
        self.children: list[Child] = []
        # Each service learns this process's pid and stops once it is gone (parent.py).
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), **spec.extra_env}
        self._env = child_env(env)
        self.kvstore_key_prefix = f"banaserve:kv:{secrets.token_hex(4)}"

    @property
    def router(self) -> Child:
        return self.child("router")

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def start(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            nodes = self._spawn_kvstore(deadline)
            router = self._spawn(
                "router",
                "services.router",
                ["--model", self.spec.model, "--policy", self.spec.policy],
            )
            for child in [*nodes, router]:
                child.wait_ready(deadline, self.stopping)
            # every node: lookups move on to another when one stops answering
            workers = self._spawn_workers(",".join(n.address for n in nodes) or None)
            self._pin(workers)
            coordinator = self._spawn_coordinator()  # it finds the workers as they register
            for child in [*workers, *coordinator]:
                child.wait_ready(deadline, self.stopping)
            self._wait_registered(len(workers), deadline)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, module: str, args: list[str]) -> Child:
        if self.stopping.is_set():
            raise StartInterrupted(f"stopped before {name} started")
        argv = [sys.executable, "-m", module, "--port", "0", *args]
        if self.spec.metrics:  # a port of its own, kept across restarts (Child.restart_argv)
            argv += ["--metrics-port", str(free_port())]
        argv += security_argv(self.spec.tls_dir, self.spec.api_token_file)
        argv += self.spec.service_args.get(module.rsplit(".", 1)[-1], ())
        child = Child(name, argv, self._env, self.log)
        self.children.append(child)
        return child

    def _spawn_kvstore(self, deadline: float) -> list[Child]:
        """Starts Redis and waits for it (the nodes connect at start), then spawns the nodes."""
        if not (self.spec.num_kvstore or self.spec.coordinator):
            return []
        # With TLS on, Redis takes the certificates directory's password, as the services do.
        secret = Path(self.spec.tls_dir) / REDIS_SECRET_FILE
        redis = RedisChild(
            self._env, self.log, str(secret) if redis_password(self.spec.tls_dir) else ""
        )
        self.children.append(redis)
        redis.wait_ready(deadline, self.stopping)
        args = [
            "--redis",
            redis.url,
            "--key-prefix",
            self.kvstore_key_prefix,
            "--data-transport",
            self.spec.kvstore_transport,
            "--capacity-bytes",
            str(self.spec.kvstore_capacity_bytes),
        ]
        return [
            self._spawn(f"kvstore-{i}", "services.kvstore", [*args, "--node-id", f"kvstore-{i}"])
            for i in range(self.spec.num_kvstore)
        ]

    def _spawn_coordinator(self) -> list[Child]:
        if not self.spec.coordinator:
            return []
        redis = self.child("redis")
        prefix = f"banaserve:coord:{self.kvstore_key_prefix.rsplit(':', 1)[1]}"
        args = ["--router", self.router.address, "--redis", redis.url, "--key-prefix", prefix]
        return [self._spawn("coordinator", "services.coordinator", args)]

    def _spawn_workers(self, kvstore: str | None) -> list[Child]:
        common = self._worker_args()
        prefill = [*common, "--kvstore", kvstore] if kvstore else common
        if kvstore and not self.spec.kvstore_overlap:
            prefill.append("--no-kvstore-overlap")
        if kvstore and self.spec.store_write_back_delay_s is not None:
            prefill += ["--store-write-back-delay", str(self.spec.store_write_back_delay_s)]
        if kvstore and self.spec.store_write_policy is not None:
            prefill += ["--store-write-policy", self.spec.store_write_policy]
        decode = common
        roles = [  # in WORKER_ROLES' names
            ("prefill", "services.prefill", prefill, self.spec.num_prefill),
            ("decode", "services.decode", decode, self.spec.num_decode),
            ("mixed", "services.decode", [*decode, "--role", "mixed"], self.spec.num_mixed),
        ]
        # Each worker registers with the router under its process name (``decode-0``), so the
        # names ``up`` prints are the ids ``banaserve migrate`` and ``ListWorkers`` use.
        return [
            self._spawn(f"{role}-{i}", module, ["--worker-id", f"{role}-{i}", *args])
            for role, module, args, count in roles
            for i in range(count)
        ]

    def _worker_args(self) -> list[str]:
        args = [
            "--model",
            self.spec.model,
            "--threads",
            str(self.spec.threads),
            "--router",
            self.router.address,
            "--kv-transport",  # the same plane on both ends of the handoff
            self.spec.kv_transport,
        ]
        if self.spec.num_kv_blocks:
            args += ["--num-kv-blocks", str(self.spec.num_kv_blocks)]
        return args

    def _pin(self, workers: list[Child]) -> None:
        """One CPU per worker, round robin, so 1 prefill + 1 decode behave like two devices."""
        if not self.spec.pin:
            return
        cpus = sorted(os.sched_getaffinity(0))
        for i, worker in enumerate(workers):
            worker.cpus = {cpus[i % len(cpus)]}
            os.sched_setaffinity(worker.proc.pid, worker.cpus)

    def _wait_registered(self, num_workers: int, deadline: float) -> None:
        from services.client.client import BanaServeClient

        token = read_tokens(Path(self.spec.api_token_file))[0] if self.spec.api_token_file else ""
        with BanaServeClient(self.router.address, tls_dir=self.spec.tls_dir, token=token) as client:
            while sum(w.active for w in client.list_workers()) < num_workers:
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not register with the router in time")
                if dead := self.exited():
                    raise RuntimeError(f"{dead[0][0]} exited with code {dead[0][1]}")
                if self.stopping.wait(0.1):
                    raise StartInterrupted("stopped while the workers registered")

    def exited(self) -> list[tuple[str, int]]:
        """Children that exited on their own, with their exit codes."""
        return [(c.name, c.proc.returncode) for c in self.children if c.proc.poll() is not None]

    def stop(self, force: threading.Event | None = None) -> dict[str, int]:
        """The router, the workers, the coordinator, the kvstore nodes, Redis (module
        docstring, 6); every child's exit code. The router drains while every worker still
        serves: requests in flight finish within its ``--drain-timeout`` (docs/services.md,
        "Stopping"). ``force`` set: each child still running is killed."""
        codes: dict[str, int] = {}
        for group in stop_order(self.children):
            # One group at a time, its children signalled together: each drains on its own.
            deadlines = [child.terminate() for child in group]
            for child, deadline in zip(group, deadlines, strict=True):
                codes[child.name] = child.wait_stopped(deadline, force)
        return codes


def stop_order(children: Sequence[Child]) -> list[list[Child]]:
    """``LocalCluster.stop``'s order, in groups stopped together: the router, the workers, the
    coordinator, the kvstore nodes, then Redis (the nodes withdraw their blocks from it)."""
    backwards = list(reversed(children))
    groups = [
        [c for c in backwards if c.name == "router"],
        [c for c in backwards if c.name.startswith(WORKER_ROLES)],
        [c for c in backwards if c.name == "coordinator"],
        [c for c in backwards if c.name.startswith("kvstore")],
    ]
    grouped = [c for group in groups for c in group]
    groups.append([c for c in backwards if c not in grouped])  # Redis
    return [group for group in groups if group]
