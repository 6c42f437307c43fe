"""``bench compare``'s handle on a ``banaserve up`` process, against stand-in processes that
print what ``up`` prints: addresses parsed up to ``cluster ready``, a failed start reported,
a clean stop's exit code, and a hung ``up`` killed with its process group."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench.compare_cluster import UpCluster
from services.common.errors import DependencyUnavailableError

READY = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("redis 127.0.0.1:1001\\nrouter 127.0.0.1:1002\\ncoordinator 127.0.0.1:1003")
print("openai http://127.0.0.1:1004/v1\\ncluster ready: generate with ...", flush=True)
print("decode-0 127.0.0.1:9 (a restart, after ready)", flush=True)
while True:
    time.sleep(1)
"""
DIES = 'print("router 127.0.0.1:1002", flush=True); raise SystemExit(1)'
HANGS = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("router 127.0.0.1:1002\\ncluster ready", flush=True)
while True:
    time.sleep(1)
"""


def cluster(code: str, tmp_path: Path) -> UpCluster:
    return UpCluster([sys.executable, "-c", code], tmp_path / "up.log", start_timeout_s=30.0)


def test_addresses_until_ready_then_a_clean_stop(tmp_path):
    up = cluster(READY, tmp_path)
    up.start()
    assert up.addresses == {
        "redis": "127.0.0.1:1001", "router": "127.0.0.1:1002", "coordinator": "127.0.0.1:1003",
    }  # fmt: skip
    assert (up.router, up.coordinator) == ("127.0.0.1:1002", "127.0.0.1:1003")
    assert up.stop() == 0
    log = (tmp_path / "up.log").read_text()
    assert log.startswith(f"$ {sys.executable} -c") and "cluster ready" in log


def test_an_up_that_exits_before_ready_is_an_error(tmp_path):
    up = cluster(DIES, tmp_path)
    with pytest.raises(DependencyUnavailableError, match="did not get ready; see .*up.log"):
        up.start()
    assert up.stop() == 1


def test_an_up_that_ignores_sigterm_is_killed(tmp_path):
    up = cluster(HANGS, tmp_path)
    up.start()
    assert up.coordinator is None
    assert up.stop(timeout_s=0.5) is None


def test_up_runs_in_its_own_process_group_but_this_session(tmp_path):
    """A session is a scheduling group under the kernel's autogroup: ``up`` in one of its own
    (its workers pinned to every core) starved the measuring client for seconds."""
    up = cluster(READY, tmp_path)
    up.start()
    assert up._proc is not None
    pid = up._proc.pid
    assert os.getpgid(pid) == pid != os.getpgid(0)  # stop() can kill it whole
    assert os.getsid(pid) == os.getsid(0)
    assert up.stop() == 0
