"""A launcher's children stop once it is gone (services/common/parent.py): a real router under a
stand-in launcher that is then killed outright, and the watch's own rules."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def stand_in_launcher(script: str, log: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """Runs ``script`` (given ``log``'s path; it starts a child and prints the child's pid) as
    a launcher: (the launcher, the child's pid). Both are killed at the end, so a failing test
    leaves nothing behind."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", script, str(log)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    pid = 0
    try:
        assert launcher.stdout is not None
        pid = int(launcher.stdout.readline())
        yield launcher, pid
    finally:
        launcher.kill()
        launcher.wait()
        if pid and not gone(pid):
            os.kill(pid, signal.SIGKILL)


def kill_and_wait_gone(launcher: subprocess.Popen, pid: int, within_s: float) -> bool:
    """SIGKILLs ``launcher``; whether ``pid`` has exited within ``within_s`` after."""
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + within_s
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return gone(pid)


def test_a_service_stops_once_its_launcher_is_killed(tmp_path):
    with stand_in_launcher(LAUNCHER, tmp_path / "router.log") as (launcher, router):
        time.sleep(1.5)
        assert not gone(router)  # the launcher alive: it serves on
        assert kill_and_wait_gone(launcher, router, 20), "the router outlived its launcher"
        log = (tmp_path / "router.log").read_text()
        assert f"the launcher (pid {launcher.pid}) is gone: stopping" in log


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
