"""``banaserve up`` as a user runs it: one process per service, ready line, clean stop."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.types import SamplingParams
from tests.engine.helpers import make_engine

pytestmark = pytest.mark.e2e


# A line gRPC core writes itself: "I1207 15:03:43.896402   24476 chttp2_transport.cc:1403] ..."
GRPC_CORE_LINE = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.cc:\d+\].*$", re.M)


def start_up(home: Path, *flags: str) -> tuple[subprocess.Popen, list[str]]:
    env = {**os.environ, "BANASERVE_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--num-kv-blocks", "512", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # a process group of its own, as a shell gives it
    )
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"banaserve up ended early: {proc.stderr.read()[-8000:]}"
        lines.append(line.rstrip("\n"))
        if line.startswith("cluster ready"):
            return proc, lines
    raise AssertionError("banaserve up did not become ready")


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


def is_redis(argv: list[str]) -> bool:
    return "redis-server" in Path(argv[0]).name or "services.kvstore.redis_server" in argv


def is_kvstore(argv: list[str]) -> bool:
    return "services.kvstore" in argv


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def test_up_prints_services_serves_generate_and_stops_cleanly(banaserve_home, tiny_llama):
    proc, lines = start_up(banaserve_home)
    kids = children(proc.pid)
    try:
        names = ["redis", "kvstore-0", "router", "prefill-0", "decode-0"]
        assert [line.split()[0] for line in lines[:5]] == names
        assert all(re.fullmatch(r"\S+ 127\.0\.0\.1:\d+", line) for line in lines[:5])
        assert lines[-1].startswith("cluster ready")
        assert sum(is_redis(cmdline(pid)) for pid in kids) == 1
        assert sum(is_kvstore(cmdline(pid)) for pid in kids) == 1
        router = lines[2].split()[1]
        prompt = "Return the value of"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.cli",
                "generate",
                "--router",
                router,
                "--prompt",
                prompt,
                "--max-tokens",
                "12",
                "--ignore-eos",
                "--timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert run.returncode == 0, run.stderr
        [expected] = make_engine(tiny_llama).generate(
            [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        )
        assert run.stdout == expected.text + "\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert code == 0, err[-8000:]
    assert all(gone(pid) for pid in kids)  # Redis and the kvstore node included
    # The workers' report streams were cut as the router stopped: gRPC core said nothing of
    # it in its own text ("Got goaway", services/common/grpc_env.py).
    assert not GRPC_CORE_LINE.findall(err), GRPC_CORE_LINE.findall(err)[:5]


def test_up_without_kvstore_starts_no_redis_and_stops_cleanly_on_ctrl_c(banaserve_home, tiny_llama):
    proc, lines = start_up(banaserve_home, "--kvstore", "0")
    kids = children(proc.pid)
    argvs = [cmdline(pid) for pid in kids]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: the foreground group
    code = proc.wait(timeout=60)
    # Only `up` got it: each service is stopped once, in order, and exits 0.
    assert code == 0, proc.stderr.read()[-8000:]
    assert all(gone(pid) for pid in kids)
    names = [line.split()[0] for line in lines if not line.startswith("openai ")]
    assert names == ["router", "prefill-0", "decode-0", "cluster"]
    assert len(argvs) == 3 and not any(is_redis(a) or is_kvstore(a) for a in argvs)


def _is_zombie(pid: int) -> bool:
    return " Z " in Path(f"/proc/{pid}/stat").read_text()


def test_ctrl_c_while_up_starts_stops_what_started_at_once(banaserve_home, tiny_llama):
    """Ctrl-C before the cluster is ready: ``up`` stops within seconds instead of finishing the
    start (it printed "cluster ready" ~25 s later on a loaded machine, then stopped, exit 0),
    exits 130 and leaves no process behind."""
    env = {**os.environ, "BANASERVE_HOME": str(banaserve_home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--num-kv-blocks", "512"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    kids: set[int] = set()
    deadline = time.monotonic() + 20
    while not kids and time.monotonic() < deadline:  # Redis, the first child, is starting
        kids.update(children(proc.pid))
        time.sleep(0.02)
    assert kids, "up started no child"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: the foreground group
    signalled = time.monotonic()
    while proc.poll() is None and time.monotonic() < signalled + 20:
        with contextlib.suppress(OSError):  # it may exit between the poll and the read
            kids.update(children(proc.pid))  # a child spawned after the signal counts too
        time.sleep(0.02)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err[-8000:]
    assert time.monotonic() - signalled < 10
    assert "cluster ready" not in out
    assert "stopped every service started" in err
    assert all(gone(pid) for pid in kids)
