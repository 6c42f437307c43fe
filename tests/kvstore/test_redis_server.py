"""RedisServer: the real redis-server child, its restart on the same port, and the embedded
fakeredis fallback (tested here only to prove it can stand in; the kvstore tests use the real one)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.hashing import block_hashes
from services.kvstore.metadata import BlockEntry, MetadataSession, MetadataStore, NodeInfo
from services.kvstore.redis_server import RedisServer, redis_command
from tests.unit.test_parent import gone, kill_and_wait_gone, stand_in_launcher

pytestmark = pytest.mark.integration


def test_restart_keeps_the_port_and_loses_the_data(redis_server):
    with RedisServer(embedded=False) as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        port = server.port
        server.restart()
        assert server.port == port
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert client.get("k") is None  # the pool reconnects; persistence is off
        client.close()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, retry=Retry(NoBackoff(), 0)).ping()


@pytest.mark.parametrize("embedded", [False, True], ids=["redis-server", "embedded"])
def test_a_password_file_makes_redis_require_it_and_no_command_line_shows_it(
    redis_server, tmp_path, embedded
):
    """Session 43: ``up --tls-dir`` starts Redis with the certificates directory's password;
    ``redis-server`` reads it on stdin (its command line and the wrapper's name only the
    file), survives a restart, and the metadata store connects with it. The embedded
    stand-in takes the password but does not refuse a client without it."""
    secret = tmp_path / "redis.secret"
    secret.write_text("0123456789abcdef" * 4 + "\n")
    password = "0123456789abcdef" * 4
    with RedisServer(embedded=embedded, password_file=str(secret)) as server:
        for _ in range(2):
            cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
            assert password.encode() not in cmdline
            if not embedded:
                with pytest.raises(redis.AuthenticationError):
                    redis.Redis.from_url(server.url).ping()
            with redis.Redis.from_url(server.url, password=password) as client:
                assert client.ping()

            async def metadata(url=server.url):
                store = MetadataStore.from_url(url, prefix="pw", password=password)
                try:
                    await store.register_node(NodeInfo("kv-a", "a:1", "a:2", "tcp", "inc-1"))
                    return await store.live_nodes()
                finally:
                    await store.close()

            assert [n.node_id for n in asyncio.run(metadata())] == ["kv-a"]
            server.restart()


def test_redis_command_is_the_real_server_without_persistence(redis_server):
    argv = redis_command(6390)
    # setpriv --pdeathsig TERM -- : it ends with whoever started it (next test).
    assert [os.path.basename(argv[0]), *argv[1:4]] == ["setpriv", "--pdeathsig", "TERM", "--"]
    argv = argv[4:]
    assert os.path.basename(argv[0]) == "redis-server"
    assert argv[1:] == [
        "--bind", "127.0.0.1",
        "--port", "6390",
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--loglevel", "warning",
    ]  # fmt: skip
    assert redis_command(6390, embedded=True) == [
        sys.executable, "-m", "services.kvstore.redis_server", "--host", "127.0.0.1", "--port", "6390"
    ]  # fmt: skip


# Starts Redis as ``LocalCluster`` does (``RedisChild``), waits for its PING, prints its pid and
# sleeps: the test kills this process with SIGKILL.
LAUNCHER = """
import os, sys, time
from services.child_process import RedisChild
child = RedisChild(dict(os.environ), open(sys.argv[1], "w"))
child.wait_ready(time.monotonic() + 30)
print(child.proc.pid, flush=True)
time.sleep(600)
"""


def test_redis_stops_once_the_launcher_that_started_it_is_killed(redis_server, tmp_path):
    with stand_in_launcher(LAUNCHER, tmp_path / "redis.log") as (launcher, pid):
        assert "redis-server" in Path(f"/proc/{pid}/cmdline").read_text()  # setpriv exec'd it
        time.sleep(0.5)
        assert not gone(pid)
        assert kill_and_wait_gone(launcher, pid, 10), "redis-server outlived its launcher"


def test_start_on_a_taken_port_fails_with_redis_own_message(redis_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(port=taken.getsockname()[1], embedded=False)
        with pytest.raises(RuntimeError, match="exited on start"):
            server.start()
        server.close()


def test_stop_kills_a_server_that_does_not_exit_in_time(redis_server):
    server = RedisServer(embedded=False).start()
    proc = server._proc
    os.kill(server.pid, signal.SIGSTOP)  # SIGTERM stays pending
    server.stop(timeout_s=0.2)
    assert proc.returncode == -signal.SIGKILL
    server.close()


def test_embedded_fallback_serves_the_metadata_scripts():
    """fakeredis's TcpFakeServer runs Lua: EVALSHA via register_script works over TCP."""
    hashes = block_hashes(list(range(32)), 8, "m")
    node = NodeInfo("kv-a", "a:1", "a:2", "tcp", incarnation="i")

    async def main(url: str):
        store = MetadataStore.from_url(url, prefix="embedded")
        holdings = [BlockEntry(h, 10, 1) for h in hashes[:3]]
        async with MetadataSession(store, node, lambda: holdings, interval_s=0.05) as session:
            assert await store.server_run_id() is None  # no INFO: only node-key expiry counts
            found = await store.longest_prefix(hashes)
            synced = session.synced
        await store.close()
        return [loc.block_hash for loc in found], synced

    with RedisServer(embedded=True) as server:
        assert asyncio.run(main(server.url)) == (hashes[:3], True)


def test_embedded_module_prints_listening_and_exits_on_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.kvstore.redis_server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        host, port = proc.stdout.readline().split()[1].rsplit(":", 1)
        assert host == "127.0.0.1"
        assert redis.Redis(port=int(port)).ping()
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
        proc.stdout.close()
