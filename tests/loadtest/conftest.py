"""Real service processes on 127.0.0.1 for the load tests' smoke runs: Redis, a kvstore node, a
router with a tiny-llama prefill and decode worker, a coordinator of that router's cluster, and
a router with no worker of its own."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from services.kvstore.redis_server import RedisServer

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    address: str = ""


def spawn(name: str, module: str, args: list[str], env: dict[str, str], log) -> Proc:
    """Starts ``python -m module --port 0 ARGS`` and waits for its ``LISTENING HOST:PORT``."""
    argv = [sys.executable, "-m", module, "--port", "0", *args]
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in popen.stdout], daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with code {popen.returncode}") from None
            continue
        if line.startswith("LISTENING "):
            return Proc(name, popen, line.split()[1])
    popen.kill()
    raise RuntimeError(f"{name} did not start within {START_TIMEOUT_S:.0f}s")


def stop(proc: Proc) -> int:
    if proc.popen.poll() is None:
        proc.popen.terminate()
    try:
        return proc.popen.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        return proc.popen.wait()


def wait_registered(router: str, num_workers: int) -> None:
    from services.client.client import BanaServeClient

    deadline = time.monotonic() + START_TIMEOUT_S
    with BanaServeClient(router) as client:
        while sum(w.active for w in client.list_workers()) < num_workers:
            assert time.monotonic() < deadline, "workers did not register in time"
            time.sleep(0.1)


@pytest.fixture(scope="package")
def service_procs(banaserve_home, tiny_llama, tmp_path_factory) -> Iterator[dict[str, Proc]]:
    env = {**os.environ, "BANASERVE_HOME": str(banaserve_home), "OMP_NUM_THREADS": "1"}
    procs: list[Proc] = []
    with (
        open(tmp_path_factory.mktemp("logs") / "services.log", "w") as log,
        RedisServer(embedded=False) as redis,
    ):
        try:
            kv = ["--redis", redis.url, "--key-prefix", "loadtest", "--data-transport", "tcp"]
            procs.append(spawn("kvstore", "services.kvstore", kv, env, log))
            procs.append(spawn("router", "services.router", [], env, log))
            procs.append(spawn("bare-router", "services.router", [], env, log))
            worker = ["--model", "tiny-llama", "--num-kv-blocks", "512", "--router"]
            worker.append(procs[1].address)
            procs.append(spawn("prefill", "services.prefill", worker, env, log))
            # KV goes only to workers the router registered (docs/security.md): the prefill
            # load test's sink is not one, so it drives a prefill worker of its own.
            alone = ["--model", "tiny-llama", "--num-kv-blocks", "512"]
            procs.append(spawn("bare-prefill", "services.prefill", alone, env, log))
            decode = [*worker, "--kv-transport", "tcp"]
            procs.append(spawn("decode", "services.decode", decode, env, log))
            wait_registered(procs[1].address, 2)
            coordinator = ["--redis", redis.url, "--key-prefix", "loadtest-coordinator"]
            coordinator += ["--router", procs[1].address]
            procs.append(spawn("coordinator", "services.coordinator", coordinator, env, log))
            yield {p.name: p for p in procs}
        finally:
            codes = {p.name: stop(p) for p in reversed(procs)}
    assert set(codes.values()) <= {0}, f"services exited with {codes}"


@pytest.fixture(autouse=True)
def _models_from_the_test_home(banaserve_home, monkeypatch) -> None:
    """The in-process load tests resolve ``--model`` (decode's setup reads its config) where the
    service processes do, not in the user's own ``~/.cache/banaserve``."""
    monkeypatch.setenv("BANASERVE_HOME", str(banaserve_home))
