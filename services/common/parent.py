"""A service started by a launcher (``banaserve up``, ``LocalCluster``) ends when it is gone.

The launcher stops its children in order on SIGTERM or Ctrl-C, but a launcher killed outright
(SIGKILL, a killed test run) never gets to: its children, re-parented to init, kept serving,
holding ports, memory and CPU (a whole test cluster ran on for an hour that way). So the
launcher names itself in each child's environment (``PARENT_PID_ENV``), and the child watches
its parent pid from a daemon thread: once it is no longer that process, the child sends
itself SIGTERM, which drains and stops it like any stop (``services/rpc/server.py``). A service
started any other way (a container, by hand) has no such variable and is not watched.

Polling ``os.getppid`` rather than ``PR_SET_PDEATHSIG``: the kernel sends that signal when the
*thread* that spawned the child ends, and a launcher respawns children from whichever thread
noticed the death.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

PARENT_PID_ENV = "BANASERVE_PARENT_PID"
POLL_S = 1.0


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child of this process: it names this process as the one to outlive."""
    return {**env, PARENT_PID_ENV: str(os.getpid())}


def watch_parent(poll_s: float = POLL_S) -> int | None:
    """If a launcher named itself (``PARENT_PID_ENV``), stop this process once that launcher
    is gone; the launcher's pid, or None. The variable is taken out of this process's
    environment, so a process this one starts does not watch a grandparent."""
    value = os.environ.pop(PARENT_PID_ENV, "")
    if not value:
        return None
    try:
        parent = int(value)
    except ValueError:
        log.warning("ignoring %s=%r: not a process id", PARENT_PID_ENV, value)
        return None

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("the launcher (pid %d) is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return parent
