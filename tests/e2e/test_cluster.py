"""End to end, real processes: router + 1 prefill + 1 decode worker on tiny-llama.

Requests go client → router → prefill (KV streamed layer by layer) → decode → client. Greedy
outputs must equal the in-process engine's, token for token, and every KV block on both workers
must be free afterwards.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from services.client.client import BanaServeClient
from services.common.types import SamplingParams
from services.rpc.gen.banaserve.v1 import (
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from tests.engine.helpers import make_engine

pytestmark = pytest.mark.e2e
START_TIMEOUT_S = 60


class Service:
    def __init__(self, module: str, args: list[str], env: dict[str, str], log) -> None:
        self.name = module.rsplit(".", 1)[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        self.address = self._wait_listening()

    def _wait_listening(self) -> str:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True
        ).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"{self.name} exited with {self.proc.returncode}"
                continue
            if line.startswith("LISTENING "):
                return line.split()[1]
        raise AssertionError(f"{self.name} did not start within {START_TIMEOUT_S}s")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def cluster(banaserve_home, tiny_llama, tmp_path_factory):
    env = {**os.environ, "BANASERVE_HOME": str(banaserve_home), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path_factory.mktemp("logs") / "cluster.log", "w")  # noqa: SIM115
    services = []
    try:
        router = Service("services.router", ["--model", "tiny-llama"], env, log)
        services.append(router)
        worker_args = [
            "--model",
            "tiny-llama",
            "--threads",
            "1",
            "--num-kv-blocks",
            "512",
            "--router",
            router.address,
        ]
        services.append(Service("services.decode", worker_args, env, log))
        services.append(Service("services.prefill", worker_args, env, log))
        with BanaServeClient(router.address) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while len([w for w in client.list_workers() if w.active]) < 2:
                assert time.monotonic() < deadline, "workers did not register"
                time.sleep(0.1)
        yield {s.name: s for s in services}
    finally:
        codes = [s.stop() for s in reversed(services)]
        log.close()
    assert codes == [0] * len(codes), f"services exited with {codes}"


def prompt_ids(n: int, seed: int) -> list[int]:
    return torch.randint(5, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_workers_idle(cluster) -> None:
    with grpc.insecure_channel(cluster["decode"].address) as ch:
        stats = decode_pb2_grpc.DecodeServiceStub(ch).Stats(decode_pb2.DecodeServiceStatsRequest())
    assert stats.kv.num_blocks_used == 0 and not stats.reservations, stats
    with grpc.insecure_channel(cluster["prefill"].address) as ch:
        stats = prefill_pb2_grpc.PrefillServiceStub(ch).Stats(
            prefill_pb2.PrefillServiceStatsRequest()
        )
    assert stats.kv.num_blocks_used == 0, stats


def test_concurrent_greedy_requests_match_the_in_process_engine(cluster, tiny_llama):
    prompts = [prompt_ids(n, n) for n in (3, 17, 40, 64, 100, 150, 9, 33)]
    max_tokens = 24
    expected = make_engine(tiny_llama).generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    )
    with BanaServeClient(cluster["router"].address) as client, ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda p: client.complete(
                    p, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, timeout_s=60
                ),
                prompts,
            )
        )
    assert [list(r.token_ids) for r in results] == [c.token_ids for c in expected]
    assert [r.text for r in results] == [c.text for c in expected]
    assert_workers_idle(cluster)


def test_bad_input_gets_invalid_argument_and_the_cluster_stays_up(cluster):
    with BanaServeClient(cluster["router"].address) as client:
        for kwargs in ({"max_tokens": 0}, {"top_p": 1.5}):
            with pytest.raises(Exception) as err:
                client.complete([5, 6, 7], timeout_s=10, **kwargs)
            assert getattr(err.value, "code", None) == grpc.StatusCode.INVALID_ARGUMENT
        result = client.complete([5, 6, 7], temperature=0.0, max_tokens=3, timeout_s=30)
        assert len(result.token_ids) >= 1
    assert_workers_idle(cluster)
