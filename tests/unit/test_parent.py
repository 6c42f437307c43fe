"""A launcher's children stop once it is gone (services/common/parent.py): a real router under a
stand-in launcher that is then killed outright, and the watch's own rules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common import parent

REPO = Path(__file__).resolve().parents[2]

# Starts a router the way ``LocalCluster`` does (``Child``, the launcher's environment), waits
# until it listens, prints its pid and sleeps: the test kills this process with SIGKILL.
LAUNCHER = """
import os, sys, time
from services.child_process import Child
from services.common.parent import child_env
log = open(sys.argv[1], "w")
argv = [sys.executable, "-m", "services.router", "--port", "0", "--no-http"]
child = Child("router", argv, child_env(dict(os.environ)), log)
child.wait_ready(time.monotonic() + 60)
print(child.proc.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by init counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_a_service_stops_once_its_launcher_is_killed(tmp_path):
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path / "router.log")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    router = 0
    try:
        assert launcher.stdout is not None
        router = int(launcher.stdout.readline())
        time.sleep(1.5)
        assert not gone(router)  # the launcher alive: it serves on
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 20
        while not gone(router) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(router), "the router outlived its launcher"
        log = (tmp_path / "router.log").read_text()
        assert f"the launcher (pid {launcher.pid}) is gone: stopping" in log
    finally:
        launcher.kill()
        launcher.wait()
        if router and not gone(router):
            os.kill(router, signal.SIGKILL)  # this test's failure leaves nothing behind


def test_the_watch_applies_to_launched_processes_only(monkeypatch):
    monkeypatch.delenv(parent.PARENT_PID_ENV, raising=False)
    assert parent.watch_parent() is None  # started by hand or in a container: not watched
    monkeypatch.setenv(parent.PARENT_PID_ENV, "not-a-pid")
    assert parent.watch_parent() is None
    assert parent.PARENT_PID_ENV not in os.environ  # never handed on to a grandchild
    assert parent.child_env({"A": "1"}) == {"A": "1", parent.PARENT_PID_ENV: str(os.getpid())}


@pytest.mark.parametrize("alive", [True, False])
def test_a_child_whose_launcher_is_already_gone_stops_at_once(alive):
    """Checked in a throwaway process: its parent is this test, named right or wrong."""
    code = (
        "import signal, sys, time\n"
        "from services.common.parent import watch_parent\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))\n"
        "watch_parent(0.05)\n"
        "time.sleep(2)\n"
    )
    env = {**os.environ, parent.PARENT_PID_ENV: str(os.getpid() if alive else 1)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, timeout=30)
    assert done.returncode == (0 if alive else 3)
