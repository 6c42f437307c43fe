"""Real-process clusters for tests: ``banaserve up``'s ``LocalCluster`` started for a block and
checked to stop cleanly, and a bounded poll of another process's state."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

from services.launcher import ClusterSpec, LocalCluster

T = TypeVar("T")

LOG_TAIL_LINES = 80


@contextmanager
def running_cluster(
    spec: ClusterSpec, log_path: Path, killed: Collection[str] = ()
) -> Iterator[LocalCluster]:
    """The cluster of ``spec``, its children's output in ``log_path``; after the block every
    service but those the test ``killed`` (child names) must have exited 0."""
    with open(log_path, "w") as log:
        cluster = LocalCluster(spec, log)
        cluster.start()
        try:
            yield cluster
        finally:
            codes = cluster.stop()
    left = {name: code for name, code in codes.items() if name not in killed}
    assert set(left.values()) == {0}, f"services exited with {codes}; " + log_tail(log_path)


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` of a cluster's log, for a failure's message: a child that had to be
    killed at its stop has said where it waited there (services/rpc/server.py, the stuck
    report), and CI keeps no file but its own output."""
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"the log's last {len(tail)} lines:\n" + "\n".join(tail)


def wait_for(predicate: Callable[[], T], what: str, timeout_s: float = 60.0) -> T:
    """Polls another process's state until ``predicate()`` is truthy, bounded (the processes
    are not ours to signal); returns that value."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return result


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """A service's ``/metrics``: {family name: {(sample name, sorted labels): value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


def value(metrics, family: str, sample: str, **labels: str) -> float:
    return metrics[family].get((sample, tuple(sorted(labels.items()))), 0.0)
