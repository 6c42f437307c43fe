"""A service process of the local cluster, which can be started again on the same port.

``Child`` runs one service with ``--port 0`` and learns its address from the ``LISTENING
HOST:PORT`` line it prints; ``RedisChild`` runs Redis on a port picked up front and knows it is
ready when it answers PING. ``respawn`` (``services/supervisor.py`` calls it) runs the same
argv again with the port the child had, after checking no socket still listens there.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from services.common.config import DRAIN_TIMEOUT_S
from services.supervisor import START_TIMEOUT_S, PortInUseError

# How long a stopped child may take past its own drain (``--drain-timeout``) to exit.
STOP_TIMEOUT_S = 15.0
HOST = "127.0.0.1"


class StartInterrupted(Exception):
    """A stop was asked for (``stopping`` set: SIGINT or SIGTERM to ``up``) while a child was
    still starting; whoever started it stops what it started."""


def _check_stopping(stopping: threading.Event | None, name: str) -> None:
    if stopping is not None and stopping.is_set():
        raise StartInterrupted(f"stopped while {name} was starting")


class Child:
    """One service process. ``address`` is known once it is ready and kept across restarts:
    ``respawn`` starts the same argv again on the same port."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log: IO[str],
        announces: bool = True,
    ) -> None:
        """``announces``: the process prints ``LISTENING HOST:PORT`` on stdout, which is then
        read here; otherwise its stdout goes to ``log`` with its stderr."""
        self.name = name
        self.argv = argv
        self.address = ""
        # "HOST:PORT" and "http" or "https" of an ``HTTP HOST:PORT SCHEME`` line (the router's API)
        self.http_address = ""
        self.http_scheme = "http"
        self.metrics_address = ""  # "HOST:PORT" of a ``METRICS HOST:PORT`` line (--metrics-port)
        self.metrics_scheme = "http"  # "https": ``METRICS HOST:PORT https`` (--metrics-tls)
        self.cpus: set[int] = set()  # pinned to these (all if empty), again after a restart
        self._env = env
        self._log = log
        self._announces = announces
        self._popen(argv)

    def _popen(self, argv: list[str]) -> None:
        stdout = subprocess.PIPE if self._announces else self._log
        # A process group of its own: a Ctrl-C in the terminal reaches the launcher only, which
        # then stops the children in order (workers first, Redis last), each exactly once.
        self.proc = subprocess.Popen(
            argv, stdout=stdout, stderr=self._log, text=True, env=self._env, process_group=0
        )
        # A fresh queue per process: a dead one's reader thread never feeds the next one's.
        self._lines: queue.Queue[str] = queue.Queue()
        if self._announces:
            threading.Thread(target=_read_lines, args=(self.proc, self._lines), daemon=True).start()
        if self.cpus:
            os.sched_setaffinity(self.proc.pid, self.cpus)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def restart_argv(self) -> list[str]:
        """The argv that serves on the port the child had (it was started with ``--port 0``)."""
        argv = with_flag(self.argv, "--port", str(self.port))
        if self.http_address:
            argv = with_flag(argv, "--http-port", self.http_address.rsplit(":", 1)[1])
        return argv

    def respawn(self) -> None:
        """Starts the process again on its old ports; ``poll_ready`` says when it serves."""
        addresses = [a for a in (self.address, self.http_address) if a]
        for port in [int(a.rsplit(":", 1)[1]) for a in addresses]:
            if port_in_use(port):
                raise PortInUseError(f"port {HOST}:{port} is still in use")
        self._popen(self.restart_argv())

    def poll_ready(self, timeout_s: float = 0.0) -> bool:
        """True once the ``LISTENING HOST:PORT`` line came (``address`` is then set); waits up
        to ``timeout_s`` for each line."""
        try:
            while True:
                line = self._lines.get(timeout=timeout_s) if timeout_s else self._lines.get_nowait()
                if line.startswith("METRICS "):  # printed before LISTENING
                    _, self.metrics_address, *scheme = line.split()
                    self.metrics_scheme = scheme[0] if scheme else "http"
                if line.startswith("HTTP "):  # printed before LISTENING
                    _, self.http_address, *scheme = line.split()
                    self.http_scheme = scheme[0] if scheme else "http"
                if line.startswith("LISTENING "):
                    self.address = line.split()[1]
                    return True
        except queue.Empty:
            return False

    def wait_ready(self, deadline: float, stopping: threading.Event | None = None) -> str:
        """Waits for the ``LISTENING HOST:PORT`` line; returns the address. ``stopping`` set
        meanwhile ends the wait within a poll (StartInterrupted)."""
        while time.monotonic() < deadline:
            if self.poll_ready(timeout_s=0.2):
                return self.address
            self._raise_if_exited()
            _check_stopping(stopping, self.name)
        raise RuntimeError(f"{self.name} did not start within {START_TIMEOUT_S:.0f}s")

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def _raise_if_exited(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    @property
    def drain_timeout_s(self) -> float:
        """The child's ``--drain-timeout`` (its default when not given)."""
        value = flag_value(self.argv, "--drain-timeout")
        return DRAIN_TIMEOUT_S if value is None else float(value)

    def stop(self, force: threading.Event | None = None) -> int:
        """SIGTERM, then waits for the child to drain and exit: its drain and
        ``STOP_TIMEOUT_S`` more, or until ``force`` is set; then kills it."""
        return self.wait_stopped(self.terminate(), force)

    def terminate(self) -> float:
        """SIGTERM (``stop``'s first half); the deadline ``wait_stopped`` gives it."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return time.monotonic() + self.drain_timeout_s + STOP_TIMEOUT_S

    def wait_stopped(self, deadline: float, force: threading.Event | None = None) -> int:
        """``stop``'s second half: the exit code, the child killed at ``deadline``."""
        while not (force is not None and force.is_set()):
            try:
                return self.proc.wait(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    state = process_state(self.proc.pid)
                    self._say(f"{self.name} did not exit in time: killed; {state}")
                    break
        self.proc.kill()
        return self.proc.wait()

    def _say(self, line: str) -> None:
        """One line of the launcher's own in the cluster's log."""
        with contextlib.suppress(OSError, ValueError):  # a log closed or gone: said nowhere
            self._log.write(f"banaserve: {line}\n")
            self._log.flush()


def _read_lines(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)


def flag_value(argv: list[str], flag: str) -> str | None:
    """The last value ``argv`` gives ``flag`` (``--flag V`` or ``--flag=V``), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced by ``value`` (appended if ``flag`` is absent)."""
    if flag not in argv:
        return [*argv, flag, value]
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def process_state(pid: int) -> str:
    """What a process is doing, from /proc, for a launcher that is about to kill it: its
    threads' states (R running, S sleeping, D in the kernel, T stopped by a signal, t traced)
    and the kernel functions the non-running ones wait in, counted."""
    states: collections.Counter[str] = collections.Counter()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            # "pid (comm) S ...": comm may hold spaces and ")"; the state follows the last ")"
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text().strip() if state != "R" else ""
            states[f"{state} {wchan}".strip() if wchan not in ("", "0") else state] += 1
    if not states:
        return "its threads' states could not be read"
    listed = ", ".join(f"{n} {what}" for what, n in states.most_common())
    return f"its threads: {listed}"


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether a socket listens on ``host:port``. Connections of a dead server left in
    TIME_WAIT do not count: gRPC servers and Redis bind with SO_REUSEADDR, as this probe does."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


class RedisChild(Child):
    """Redis on a port picked up front: ``redis-server`` prints no LISTENING line, so it is
    ready once it answers PING (the embedded fallback is checked the same way)."""

    drain_timeout_s = 0.0  # Redis has no drain of its own: it stops at once

    def __init__(self, env: dict[str, str], log: IO[str], password_file: str = "") -> None:
        """``password_file``: Redis requires the password in it."""
        from services.kvstore.redis_server import free_port, redis_command
        from services.rpc.security import read_redis_password

        # Bound, closed and handed over: another process could take it in between, in which
        # case Redis fails to bind and exits, which start() reports.
        self._port = free_port(HOST)
        self._password = read_redis_password(Path(password_file)) if password_file else None
        argv = redis_command(self._port, HOST, password_file=password_file)
        super().__init__("redis", argv, env, log, announces=False)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def restart_argv(self) -> list[str]:
        return self.argv  # the port is in it already

    def poll_ready(self, timeout_s: float = 0.0) -> bool:
        """One PING (``timeout_s`` is not used: a PING is answered or refused at once)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis(
            HOST,
            self.port,
            password=self._password,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            if client.ping():
                self.address = f"{HOST}:{self.port}"
                return True
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        finally:
            client.close()
        return False

    def wait_ready(self, deadline: float, stopping: threading.Event | None = None) -> str:
        while time.monotonic() < deadline:
            self._raise_if_exited()
            if self.poll_ready():
                return self.address
            _check_stopping(stopping, self.name)
            time.sleep(0.05)
        raise RuntimeError(f"redis did not answer PING within {START_TIMEOUT_S:.0f}s")
