"""``banaserve up`` keeps serving when a service dies: real processes, tiny-llama, one Redis and
one kvstore node.

A dead child comes back on the port it had and says so on the console; Redis and the kvstore
node are not needed to serve (requests recompute meanwhile) and the store works again once they
are back; a prefill worker killed with requests in flight is restarted, the router admits it
again, and every later request gives the same greedy tokens as before; the workers register
again with a restarted router; a stop while a child is being restarted still stops everything
cleanly.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
import torch

from services.client.client import BanaServeClient, BanaServeClientError
from services.common.types import SamplingParams
from services.rpc.gen.banaserve.v1 import kvstore_pb2, kvstore_pb2_grpc
from tests.e2e.test_cluster import wait_idle
from tests.e2e.test_up import children, cmdline, gone, is_kvstore, is_redis, start_up
from tests.engine.helpers import make_engine

pytestmark = pytest.mark.e2e

MAX_TOKENS = 16
BLOCK_SIZE = 16
ROLES = ("prefill", "decode")


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(5, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# Shorter than a block: no write-back to the store, whose block count is checked.
PROMPTS = [tokens(seed, 12) for seed in range(20)]
PREFIX = tokens(100, 6 * BLOCK_SIZE)  # 6 full blocks
LONG = [PREFIX + tokens(101, 20), PREFIX + tokens(102, 20)]
# A second prefix in the store, for one more try after the restart (below).
PREFIX_B = tokens(200, 6 * BLOCK_SIZE)
LONG_B = [PREFIX_B + tokens(201, 20), PREFIX_B + tokens(202, 20)]


class Console:
    """``up``'s stdout after the ready line, and its stderr (every service's log, kept so the
    pipe never fills up and blocks them), each read by a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._queue.put(line.rstrip("\n"))

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        self.stderr.extend(proc.stderr)

    def drain(self) -> list[str]:
        with contextlib.suppress(queue.Empty):
            while True:
                self.lines.append(self._queue.get_nowait())
        return self.lines

    def wait_for(self, *expected: str, within_s: float = 60.0) -> None:
        deadline = time.monotonic() + within_s
        while not set(expected) <= set(self.lines):
            try:
                self.lines.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no {expected} in {self.lines}") from None


def pids_of(up: subprocess.Popen, match: Callable[[list[str]], bool]) -> list[int]:
    pids = []
    for pid in children(up.pid):
        with contextlib.suppress(FileNotFoundError):  # reaped meanwhile
            if match(cmdline(pid)):
                pids.append(pid)
    return pids


def pid_of(up: subprocess.Popen, match: Callable[[list[str]], bool]) -> int:
    [pid] = pids_of(up, match)
    return pid


def is_prefill(argv: list[str]) -> bool:
    return "services.prefill" in argv


def is_router(argv: list[str]) -> bool:
    return "services.router" in argv


def is_decode(argv: list[str]) -> bool:
    return "services.decode" in argv


def outcome(client: BanaServeClient, prompt: list[int], first: threading.Event) -> object:
    """The greedy token ids, or the status code's name if the request failed."""
    generation = client.generate(
        prompt, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, timeout_s=60
    )
    try:
        for _ in generation:
            first.set()
    except BanaServeClientError as exc:
        return exc.code.name
    return generation.result.token_ids


def serve_all(client: BanaServeClient, prompts: Sequence[list[int]], first=None) -> list:
    """Every prompt at once; ``first`` is set when any token has come back."""
    first = first or threading.Event()
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: outcome(client, p, first), prompts))


def store_stats(address: str) -> kvstore_pb2.KVStoreServiceStatsResponse:
    with grpc.insecure_channel(address) as channel:
        stub = kvstore_pb2_grpc.KVStoreServiceStub(channel)
        return stub.Stats(kvstore_pb2.KVStoreServiceStatsRequest(), timeout=5)


def wait_until(check: Callable[[], bool], what: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def complete(client: BanaServeClient, prompt: list[int]):
    return client.complete(
        prompt, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, timeout_s=60
    )


def admitted(client: BanaServeClient) -> list[tuple[str, bool]]:
    return sorted((w.worker_id, w.active) for w in client.list_workers())


def test_up_restarts_dead_services_on_their_ports_and_serves_on(banaserve_home, tiny_llama):
    # Every new block written at once (not only reused ones): the store's contents after a
    # restart are what this test follows.
    up, lines = start_up(banaserve_home, "--restart-backoff", "0.2", "--store-write-policy", "all")
    address = {line.split()[0]: line.split()[1] for line in lines[:5]}
    console = Console(up)
    old_pids, new_pids = children(up.pid), []
    try:
        with BanaServeClient(address["router"]) as client:
            workers = admitted(client)
            before = serve_all(client, PROMPTS)
            assert all(isinstance(t, tuple) and len(t) == MAX_TOKENS for t in before)

            # Redis and the kvstore node killed: requests recompute, the two come back.
            os.kill(pid_of(up, is_redis), signal.SIGKILL)
            os.kill(pid_of(up, is_kvstore), signal.SIGKILL)
            assert serve_all(client, PROMPTS) == before
            console.wait_for(
                "redis exited (code -9); restarting in 0.2 s (restart 1 of 5)",
                "kvstore-0 exited (code -9); restarting in 0.2 s (restart 1 of 5)",
                f"redis ready again {address['redis']}",
                f"kvstore-0 ready again {address['kvstore-0']}",
            )
            node = address["kvstore-0"]
            wait_until(lambda: store_stats(node).metadata_synced, "the node is not in Redis")
            first = complete(client, LONG[0])
            # The restarted node holds the written-back blocks: 116 tokens, 7 full blocks.
            wait_until(lambda: store_stats(node).num_blocks == 7, "no write-back")
            complete(client, LONG_B[0])
            wait_until(lambda: store_stats(node).num_blocks == 14, "no second write-back")

            # The prefill worker killed with 20 requests in flight.
            started = threading.Event()
            with ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(serve_all, client, PROMPTS, started)
                assert started.wait(60)
                os.kill(pid_of(up, is_prefill), signal.SIGKILL)
                outcomes = in_flight.result()
            # Each one either finished, with the tokens it had before, or failed UNAVAILABLE.
            assert all(o in (b, "UNAVAILABLE") for o, b in zip(outcomes, before, strict=True))
            console.wait_for(
                "prefill-0 exited (code -9); restarting in 0.2 s (restart 1 of 5)",
                f"prefill-0 ready again {address['prefill-0']}",
            )
            wait_until(lambda: admitted(client) == workers, "the router did not admit it")
            assert serve_all(client, PROMPTS) == before
            # A new process has an empty prefix cache: the prefix comes from the restarted store.
            # A store prefix whose layers do not arrive in time is computed instead (by design:
            # prefix_fetch.py), which the loaded full suite hit twice; the worker then holds that
            # prefix locally, so the one retry uses the other prefix, still only in the store.
            second = complete(client, LONG[1])
            cached = [second.num_cached_tokens]
            if cached[0] == 0:
                cached.append(complete(client, LONG_B[1]).num_cached_tokens)
            assert cached[-1] == len(PREFIX), cached
            workers_at = {role: SimpleNamespace(address=address[f"{role}-0"]) for role in ROLES}
            wait_idle(workers_at)  # no KV block held, no reservation open

        # The router killed: it comes back on its port, and every worker registers again.
        os.kill(pid_of(up, is_router), signal.SIGKILL)
        console.wait_for(
            "router exited (code -9); restarting in 0.2 s (restart 1 of 5)",
            f"router ready again {address['router']}",
        )
        with BanaServeClient(address["router"]) as client:  # a new channel: no backoff
            wait_until(lambda: admitted(client) == workers, "the workers did not come back")
            assert serve_all(client, PROMPTS) == before

        # A stop while a restarted decode worker is still starting stops everything.
        killed = pid_of(up, is_decode)
        os.kill(killed, signal.SIGKILL)
        console.wait_for("decode-0 exited (code -9); restarting in 0.2 s (restart 1 of 5)")
        wait_until(lambda: pids_of(up, is_decode) not in ([], [killed]), "not respawned")
        new_pids = children(up.pid)
        assert f"decode-0 ready again {address['decode-0']}" not in console.drain()
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0, "".join(console.stderr)[-3000:]
    assert all(gone(pid) for pid in {*old_pids, *new_pids})
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = [c.token_ids for c in make_engine(tiny_llama).generate(LONG, params)]
    assert [list(first.token_ids), list(second.token_ids)] == want


def test_up_with_restarts_off_stops_the_cluster_when_a_child_dies(banaserve_home, tiny_llama):
    up, _ = start_up(banaserve_home, "--max-restarts", "0", "--kvstore", "0")
    pids = children(up.pid)
    os.kill(pid_of(up, is_decode), signal.SIGKILL)
    code = up.wait(timeout=60)
    stderr = up.stderr.read()
    assert code == 1
    assert "error: decode-0 exited (code -9); restarts are off; stopping the cluster" in stderr
    assert all(gone(pid) for pid in pids)
