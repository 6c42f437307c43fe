"""``banaserve up``'s spec and flags (the processes themselves: tests/e2e/test_up.py)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from services.common.errors import ConfigError
from services.launcher import ClusterSpec, stop_order
from services.supervisor import RestartConfig, restart_config
from services.up import add_arguments


def test_data_planes_default_to_tcp_and_accept_none_but_nothing_else():
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).kv_transport == "tcp" == ClusterSpec().kv_transport
    assert p.parse_args([]).kvstore_transport == "tcp" == ClusterSpec().kvstore_transport
    assert p.parse_args(["--kv-transport", "ucx"]).kv_transport == "ucx"
    assert p.parse_args(["--kv-transport", "none"]).kv_transport == "none"
    assert ClusterSpec(kv_transport="tcp").kv_transport == "tcp"
    with pytest.raises(ConfigError, match="kv transport"):
        ClusterSpec(kv_transport="rdma")


def test_up_takes_the_restart_flags():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--max-restarts", "0", "--restart-backoff", "0.2"])
    assert restart_config(args) == RestartConfig(max_restarts=0, backoff_s=0.2)


def test_the_router_stops_first_then_the_workers_then_the_coordinator_then_the_store():
    """Groups signalled together, one after another. The router drains while the workers serve; the coordinator outlives the workers' drains
    (it reverts a stopping worker's migrations); Redis, which keeps its records, goes last."""
    started = ["redis", "kvstore-0", "kvstore-1", "router", "prefill-0", "decode-0", "decode-1",
               "mixed-0", "coordinator"]  # fmt: skip
    children = [SimpleNamespace(name=name) for name in started]
    names = lambda groups: [[c.name for c in group] for group in groups]  # noqa: E731
    assert names(stop_order(children)) == [
        ["router"], ["mixed-0", "decode-1", "decode-0", "prefill-0"], ["coordinator"],
        ["kvstore-1", "kvstore-0"], ["redis"],
    ]  # fmt: skip
    assert names(stop_order(children[3:6])) == [["router"], ["decode-0", "prefill-0"]]
