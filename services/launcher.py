"""``banaserve up``: a local cluster, every service its own process on 127.0.0.1.

Lifecycle:
1. the router starts first; each service prints ``LISTENING HOST:PORT`` once it serves;
2. the workers start together, each pointed at the router, and register with it;
3. the cluster is ready once every worker shows as active in the router's ``ListWorkers``;
4. it runs until SIGINT/SIGTERM, or until a child exits on its own, which is reported and
   brings the rest down (a half cluster is worse than none);
5. stopping sends SIGTERM to the workers, then the router, and waits (bounded) for each;
   a child that does not exit in time is killed and reported.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO

from services.common.errors import ConfigError

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


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
    extra_env: dict[str, str] = field(default_factory=dict)

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
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


class Child:
    """One service process; ``address`` is known once it printed its LISTENING line."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: IO[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.address = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def wait_listening(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with code {self.proc.returncode}"
                    ) from None
                continue
            if line.startswith("LISTENING "):
                self.address = line.split()[1]
                return self.address
        raise RuntimeError(f"{self.name} did not start within {START_TIMEOUT_S:.0f}s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class LocalCluster:
    def __init__(self, spec: ClusterSpec, log: IO[str] = sys.stderr) -> None:
        self.spec = spec
        self.log = log
        self.children: list[Child] = []
        self._env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), **spec.extra_env}

    @property
    def router(self) -> Child:
        return self.children[0]

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def start(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            router = self._spawn(
                "router",
                "services.router",
                ["--model", self.spec.model, "--policy", self.spec.policy],
            )
            router.wait_listening(deadline)
            workers = [
                self._spawn(f"prefill-{i}", "services.prefill", self._worker_args(i))
                for i in range(self.spec.num_prefill)
            ]
            workers += [
                self._spawn(f"decode-{i}", "services.decode", self._worker_args(i))
                for i in range(self.spec.num_decode)
            ]
            workers += [
                self._spawn(
                    f"mixed-{i}", "services.decode", [*self._worker_args(i), "--role", "mixed"]
                )
                for i in range(self.spec.num_mixed)
            ]
            self._pin(workers)
            for worker in workers:
                worker.wait_listening(deadline)
            self._wait_registered(len(workers), deadline)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, module: str, args: list[str]) -> Child:
        argv = [sys.executable, "-m", module, "--port", "0", *args]
        child = Child(name, argv, self._env, self.log)
        self.children.append(child)
        return child

    def _worker_args(self, index: int) -> list[str]:
        args = [
            "--model",
            self.spec.model,
            "--threads",
            str(self.spec.threads),
            "--router",
            self.router.address,
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
            os.sched_setaffinity(worker.proc.pid, {cpus[i % len(cpus)]})

    def _wait_registered(self, num_workers: int, deadline: float) -> None:
        from services.client.client import BanaServeClient

        with BanaServeClient(self.router.address) as client:
            while sum(w.active for w in client.list_workers()) < num_workers:
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not register with the router in time")
                if dead := self.exited():
                    raise RuntimeError(f"{dead[0][0]} exited with code {dead[0][1]}")
                time.sleep(0.1)

    def exited(self) -> list[tuple[str, int]]:
        """Children that exited on their own, with their exit codes."""
        return [(c.name, c.proc.returncode) for c in self.children if c.proc.poll() is not None]

    def stop(self) -> dict[str, int]:
        """Workers first, then the router; returns every child's exit code."""
        return {c.name: c.stop() for c in reversed(self.children)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-llama", help="prepared model name or directory")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument(
        "--mixed", type=int, default=0, help="mixed workers (prefill and decode, colocated)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--pin", action="store_true", help="pin each worker to its own CPU")
    p.add_argument(
        "--policy",
        default="load",
        choices=("load", "round_robin", "prefix_affinity", "colocated"),
        help="routing policy",
    )
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks per worker")


def run_up(args: argparse.Namespace) -> int:
    spec = ClusterSpec(
        args.model,
        args.prefill,
        args.decode,
        args.mixed,
        args.threads,
        args.pin,
        args.policy,
        args.num_kv_blocks,
    )
    cluster = LocalCluster(spec)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        cluster.start()
    except RuntimeError as exc:
        print(f"banaserve: error: {exc}", file=sys.stderr)
        return 1
    for child in cluster.children:
        print(f"{child.name} {child.address}", flush=True)
    print(
        f"cluster ready: generate with `banaserve generate --router {cluster.router.address}`",
        flush=True,
    )
    dead: list[tuple[str, int]] = []
    while not stopping.is_set() and not (dead := cluster.exited()):
        stopping.wait(0.5)
    for name, code in dead:
        print(f"banaserve: {name} exited unexpectedly with code {code}; stopping", file=sys.stderr)
    codes = cluster.stop()
    bad = {n: c for n, c in codes.items() if c != 0 and (n, c) not in dead}
    for name, code in bad.items():
        print(f"banaserve: {name} stopped with code {code}", file=sys.stderr)
    return 1 if dead or bad else 0
