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


# Run in a fresh interpreter: imports ``module``, and reports GRPC_VERBOSITY as it was when grpc
# itself was first imported (or at the end, if nothing imported grpc).
_AT_GRPC_IMPORT = """
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and not seen:
            seen.append(os.environ.get("GRPC_VERBOSITY"))
        return None
sys.meta_path.insert(0, Watch())
import {module}
print(seen[0] if seen else os.environ.get("GRPC_VERBOSITY"), bool(seen))
"""


def _verbosity_when_grpc_loads(module: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    run = subprocess.run(
        [sys.executable, "-c", _AT_GRPC_IMPORT.format(module=module)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


@pytest.mark.parametrize("role", ["router", "prefill", "decode", "kvstore", "coordinator"])
def test_each_service_package_sets_it_before_grpc_is_loaded(role):
    """What ``python -m services.<role>`` imports first sets it, and grpc is not loaded yet."""
    assert _verbosity_when_grpc_loads(f"services.{role}") == ["ERROR", "False"]


def test_the_command_line_sets_it_before_it_loads_grpc():
    """``banaserve`` (health, migrate, migrations --watch, loadtest, ...) is a gRPC client
    whose stderr is the user's terminal: a server's goaway must not print gRPC core's lines."""
    assert _verbosity_when_grpc_loads("services.cli") == ["ERROR", "True"]
