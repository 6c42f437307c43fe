"""A launcher child respawned on the port it had, even while its old connections are in
TIME_WAIT, and not while another socket listens there (a tiny real server stands in for a
service: it prints ``LISTENING HOST:PORT`` like every BanaServe service)."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from services import child_process
from services.child_process import (
    HOST,
    Child,
    StartInterrupted,
    flag_value,
    port_in_use,
    with_flag,
)
from services.common.config import DRAIN_TIMEOUT_S
from services.supervisor import PortInUseError

# Binds --port with SO_REUSEADDR (as gRPC servers and Redis do), greets each connection with
# one byte, keeps it open, and exits 0 on SIGTERM.
SERVER = r"""
import signal, socket, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", port))
server.listen()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(f"LISTENING 127.0.0.1:{server.getsockname()[1]}", flush=True)
conns = []
while True:
    conn = server.accept()[0]
    conn.sendall(b"x")
    conns.append(conn)
"""
TIME_WAIT = "06"  # the state column of /proc/net/tcp


def test_with_flag_replaces_a_flags_value_or_appends_it():
    argv = ["python", "-m", "services.router", "--port", "0", "--model", "m"]
    assert with_flag(argv, "--port", "4242") == [*argv[:4], "4242", "--model", "m"]
    assert with_flag(argv, "--http-port", "80") == [*argv, "--http-port", "80"]
    assert argv[4] == "0"  # not changed in place


def test_a_listening_socket_makes_a_port_in_use_a_closed_one_does_not():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, 0))
        port = listener.getsockname()[1]
        listener.listen()
        assert port_in_use(port)
    assert not port_in_use(port)


def tcp_states(port: int) -> list[str]:
    """The states of the IPv4 TCP sockets whose local port is ``port``."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return [r.split()[3] for r in rows if int(r.split()[1].split(":")[1], 16) == port]


def greet(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=5)
    assert conn.recv(1) == b"x"  # accepted by the server
    return conn


@pytest.mark.integration
def test_a_killed_child_comes_back_on_its_port_while_its_old_connections_are_in_time_wait(
    tmp_path,
):
    argv = [sys.executable, "-c", SERVER, "--port", "0"]
    with open(tmp_path / "child.log", "w") as log:
        child = Child("svc", argv, dict(os.environ), log)
        try:
            address = child.wait_ready(time.monotonic() + 30)
            port, first_pid = child.port, child.proc.pid
            conn = greet(address)
            child.kill()  # its socket closes first: that end goes to TIME_WAIT
            assert conn.recv(1) == b""
            conn.close()
            assert TIME_WAIT in tcp_states(port)
            assert not port_in_use(port)
            assert child.restart_argv() == [sys.executable, "-c", SERVER, "--port", str(port)]
            child.respawn()
            assert child.wait_ready(time.monotonic() + 30) == address
            assert child.proc.pid != first_pid and child.exit_code() is None
            greet(address).close()
            assert child.stop() == 0
            # Another process listens on the port now: no respawn, no process started.
            with socket.socket() as squatter:
                squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                squatter.bind((HOST, port))
                squatter.listen()
                stopped = child.proc
                with pytest.raises(PortInUseError, match=f"port {HOST}:{port} is still in use"):
                    child.respawn()
                assert child.proc is stopped
        finally:
            child.stop()


@pytest.mark.integration
def test_a_stop_asked_for_ends_the_wait_for_a_child_that_is_still_starting(tmp_path):
    """``up``'s SIGINT handler sets ``stopping`` while a child loads its model: the wait ends
    within a poll, not at the child's readiness (it waited for the whole cluster)."""
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]  # never announces
    stopping = threading.Event()
    with open(tmp_path / "child.log", "w") as log:
        child = Child("svc", argv, dict(os.environ), log)
        try:
            threading.Timer(0.3, stopping.set).start()
            started = time.monotonic()
            with pytest.raises(StartInterrupted, match="stopped while svc was starting"):
                child.wait_ready(started + 30, stopping)
            assert time.monotonic() - started < 2
        finally:
            assert child.stop() != 0  # terminated: it was never ready


def test_flag_value_reads_either_form_and_the_last_one_wins():
    argv = ["python", "-m", "services.router", "--drain-timeout", "3", "--port", "0"]
    assert flag_value(argv, "--drain-timeout") == "3"
    assert flag_value([*argv, "--drain-timeout=7.5"], "--drain-timeout") == "7.5"
    assert flag_value(argv, "--http-port") is None
    assert flag_value(["--drain-timeout"], "--drain-timeout") is None  # no value after it


# Ignores SIGTERM: a service still draining.
DRAINING = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


@pytest.mark.integration
def test_a_child_gets_its_drain_then_is_killed_and_force_kills_it_at_once(tmp_path, monkeypatch):
    """``stop`` waits the child's own ``--drain-timeout`` (its default when not given) plus
    ``STOP_TIMEOUT_S`` for it to exit, then kills it; ``force`` (up's second Ctrl-C) kills it
    within a poll."""
    monkeypatch.setattr(child_process, "STOP_TIMEOUT_S", 0.2)
    with open(tmp_path / "child.log", "w") as log:
        child = Child("svc", [sys.executable, "-c", DRAINING], dict(os.environ), log, False)
        assert child.drain_timeout_s == DRAIN_TIMEOUT_S
        child.argv = [*child.argv, "--drain-timeout", "0.5"]
        time.sleep(0.5)  # its handler is in place
        started = time.monotonic()
        assert child.stop() == -9
        assert 0.7 <= time.monotonic() - started < 3
        # What it was doing, for whoever reads why it was killed: one thread, asleep.
        said = (tmp_path / "child.log").read_text()
        assert re.search(r"banaserve: svc did not exit in time: killed; its threads: 1 S\b", said)

        child = Child("svc", [sys.executable, "-c", DRAINING], dict(os.environ), log, False)
        time.sleep(0.5)
        force = threading.Event()
        threading.Timer(0.3, force.set).start()
        started = time.monotonic()
        assert child.stop(force) == -9  # its drain would be 30 s
        assert time.monotonic() - started < 2


@pytest.mark.integration
def test_a_child_killed_at_its_deadline_is_said_to_be_frozen_if_it_was(tmp_path, monkeypatch):
    """A child stopped by a signal (SIGSTOP: it cannot drain, log or dump its stack) is killed
    at its deadline, and the log says that it was stopped, not only that it was slow."""
    monkeypatch.setattr(child_process, "STOP_TIMEOUT_S", 0.2)
    with open(tmp_path / "child.log", "w") as log:
        child = Child("svc", [sys.executable, "-c", DRAINING], dict(os.environ), log, False)
        child.argv = [*child.argv, "--drain-timeout", "0.1"]
        time.sleep(0.5)
        os.kill(child.proc.pid, signal.SIGSTOP)
        assert child.stop() == -9
    said = (tmp_path / "child.log").read_text()
    assert re.search(r"svc did not exit in time: killed; its threads: \d+ T\b", said), said
