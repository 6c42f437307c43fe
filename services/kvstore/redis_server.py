"""A local Redis for the kvstore's metadata: the real ``redis-server``, or an embedded stand-in.

``RedisServer`` runs ``redis-server`` as a child bound to 127.0.0.1 with persistence off, so a
``restart()`` comes back empty, as a lost Redis does. Where no ``redis-server`` is installed it
runs fakeredis's ``TcpFakeServer`` in a child process instead (``python -m
services.kvstore.redis_server --port N``, which prints ``LISTENING 127.0.0.1:N`` and serves until
SIGTERM) and logs a warning. The fallback speaks RESP and runs Lua (EVAL, EVALSHA, SCRIPT LOAD,
so ``register_script``) through the ``lupa`` package of the ``fakeredis[lua]`` extra; it has no
INFO command, so a Redis restart there is noticed by the node key going missing, not by run_id.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.arg_types import port_number
from services.common.logs import configure_logging
from services.rpc.security import read_redis_password

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_command(
    port: int, host: str = HOST, embedded: bool | None = None, password_file: str = ""
) -> list[str]:
    """The argv that serves Redis on ``host:port`` in the foreground: ``redis-server`` when it is
    installed (or ``embedded=False``), else the embedded fakeredis server. ``password_file``:
    it requires the password in that file (security.REDIS_SECRET_FILE); ``redis-server`` reads
    it through this module (``--exec-redis-server``), so it is never in a command line."""
    executable = shutil.which("redis-server")
    if embedded is None:
        embedded = executable is None
        if embedded:
            log.warning("redis-server not found: using the embedded fakeredis server")
    module = [sys.executable, "-m", "services.kvstore.redis_server"]
    secret = ["--password-file", password_file] if password_file else []
    if embedded:
        return [*module, "--host", host, "--port", str(port), *secret]
    if executable is None:
        raise FileNotFoundError("redis-server is not installed (`make setup` installs it)")
    if password_file:
        wrapped = [*module, "--exec-redis-server", "--host", host, "--port", str(port), *secret]
        return [*_ends_with_its_parent(), *wrapped]
    return [*_ends_with_its_parent(), executable, *redis_server_args(host, port)]


def redis_server_args(host: str, port: int) -> list[str]:
    return [
        "--bind", host,
        "--port", str(port),
        "--save", "",  # no RDB snapshots: a restart loses everything
        "--appendonly", "no",
        "--daemonize", "no",
        "--loglevel", "warning",
    ]  # fmt: skip


def exec_redis_server(host: str, port: int, password_file: str) -> NoReturn:
    """Becomes ``redis-server`` (the same pid: signals, its parent's death signal and the exit
    status are Redis's), its password handed over on stdin (``redis-server -`` reads its
    configuration there), not in its command line, which any local user can read."""
    password = read_redis_password(Path(password_file))
    executable = shutil.which("redis-server")
    if executable is None:
        raise FileNotFoundError("redis-server is not installed (`make setup` installs it)")
    read_end, write_end = os.pipe()
    os.write(write_end, f"requirepass {password}\n".encode())  # far below a pipe's buffer
    os.close(write_end)
    os.dup2(read_end, 0)
    os.close(read_end)
    os.execv(executable, [executable, "-", *redis_server_args(host, port)])


def _ends_with_its_parent() -> list[str]:
    """A prefix that makes the command get SIGTERM when the thread that started it ends
    (util-linux ``setpriv --pdeathsig``, then exec: the same pid). Our services watch their
    launcher themselves (services/common/parent.py), but ``redis-server`` is not ours: without
    this, a launcher killed outright (SIGKILL) left it serving on its port for ever. Launchers
    start and restart Redis from their main thread (``banaserve up``'s supervisor runs there),
    which ends only with the process. Empty where ``setpriv`` is missing (not Linux): Redis
    then outlives such a launcher, as before."""
    if sys.platform != "linux" or (setpriv := shutil.which("setpriv")) is None:
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


class RedisServer:
    """A Redis child process on a fixed port for its whole life (``restart`` keeps it)."""

    def __init__(
        self,
        port: int | None = None,
        host: str = HOST,
        embedded: bool | None = None,
        password_file: str = "",
    ) -> None:
        self.host = host
        self.password_file = password_file
        self.password = read_redis_password(Path(password_file)) if password_file else None
        self.embedded = shutil.which("redis-server") is None if embedded is None else embedded
        if embedded is None and self.embedded:
            log.warning("redis-server not found: using the embedded fakeredis server")
        self.port = port or free_port(host)
        self._proc: subprocess.Popen | None = None
        # Redis's own log, quoted when it fails to start; lives as long as this object.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> RedisServer:
        if self.running:
            raise RuntimeError(f"redis already running on port {self.port}")
        argv = redis_command(self.port, self.host, self.embedded, self.password_file)
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait_ping(timeout_s)
        return self

    def _wait_ping(self, timeout_s: float) -> None:
        client = redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if not self.running:
                    raise RuntimeError(f"redis exited on start: {self._log_tail()}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis did not answer PING within {timeout_s:.0f}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port; the data is gone (persistence is off)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._log.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve_embedded(host: str, port: int, password: str = "") -> None:
    """Serve fakeredis over TCP until SIGTERM/SIGINT. ``password``: clients may AUTH with it
    (fakeredis takes it, but does not refuse a client that does not: a stand-in only)."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer((host, port))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # shutdown() waits for serve_forever() to return, so they cannot share a thread.
    thread = threading.Thread(target=server.serve_forever, name="fakeredis", daemon=True)
    thread.start()
    if password:  # before it says it listens: no client connects before
        with redis.Redis(host, server.server_address[1]) as client:
            client.config_set("requirepass", password)
    print(f"LISTENING {host}:{server.server_address[1]}", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.kvstore.redis_server", description=__doc__)
    p.add_argument("--host", default=HOST)
    p.add_argument("--port", type=port_number, default=0, help="0: any free port")
    p.add_argument("--password-file", default="", help="require the password in this file")
    p.add_argument(
        "--exec-redis-server",
        action="store_true",
        help="become redis-server, the password handed over on stdin (needs --port)",
    )
    args = p.parse_args(argv)
    configure_logging("WARNING")
    if args.exec_redis_server:
        exec_redis_server(args.host, args.port, args.password_file)
    log.warning("serving the embedded fakeredis server, not a real Redis")
    password = read_redis_password(Path(args.password_file)) if args.password_file else ""
    serve_embedded(args.host, args.port, password)


if __name__ == "__main__":
    main()
