"""``python -m services.prefill`` announces its address, serves, and drains on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import pytest

from services.rpc.gen.banaserve.v1 import prefill_pb2, prefill_pb2_grpc


@pytest.mark.integration
def test_main_prints_listening_serves_stats_and_stops_on_sigterm(tiny_llama, banaserve_home):
    env = {**os.environ, "BANASERVE_HOME": str(banaserve_home)}
    cmd = [
        sys.executable,
        "-m",
        "services.prefill",
        "--port",
        "0",
        "--model",
        "tiny-llama",
        "--num-kv-blocks",
        "64",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("LISTENING 127.0.0.1:"), (line, proc.stderr.read())
        with grpc.insecure_channel(line.split()[1]) as channel:
            stub = prefill_pb2_grpc.PrefillServiceStub(channel)
            stats = stub.Stats(prefill_pb2.PrefillServiceStatsRequest(), timeout=3)
        assert stats.kv.num_blocks_total > 0 and stats.kv.num_blocks_used == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
