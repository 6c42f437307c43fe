"""gRPC core's log level in a service process (services/common/grpc_env.py): ERROR unless the
user set GRPC_VERBOSITY, and set by importing a service's package, before grpc is loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.common.grpc_env import GRPC_CORE_VERBOSITY, quiet_grpc_core


def test_the_users_setting_wins(monkeypatch):
    monkeypatch.setenv("GRPC_VERBOSITY", "DEBUG")
    quiet_grpc_core()
    assert os.environ["GRPC_VERBOSITY"] == "DEBUG"
    monkeypatch.delenv("GRPC_VERBOSITY")
    quiet_grpc_core()
    assert os.environ["GRPC_VERBOSITY"] == GRPC_CORE_VERBOSITY == "ERROR"


@pytest.mark.parametrize("role", ["router", "prefill", "decode", "kvstore", "coordinator"])
def test_each_service_package_sets_it_before_grpc_is_loaded(role):
    """What ``python -m services.<role>`` imports first sets it, and grpc is not loaded yet."""
    code = (
        f"import os, sys; import services.{role}; "
        "print(os.environ.get('GRPC_VERBOSITY'), 'grpc' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert run.stdout.split() == ["ERROR", "False"], run.stderr
