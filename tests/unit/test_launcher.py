"""``banaserve up``'s spec and flags (the processes themselves: tests/e2e/test_up.py)."""

from __future__ import annotations

import argparse

import pytest

from services.common.errors import ConfigError
from services.launcher import ClusterSpec, add_arguments


def test_kv_transport_defaults_to_ucx_and_accepts_none_but_nothing_else():
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).kv_transport == "ucx" == ClusterSpec().kv_transport
    assert p.parse_args(["--kv-transport", "none"]).kv_transport == "none"
    assert ClusterSpec(kv_transport="tcp").kv_transport == "tcp"
    with pytest.raises(ConfigError, match="kv transport"):
        ClusterSpec(kv_transport="rdma")
