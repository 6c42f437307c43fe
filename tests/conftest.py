"""Shared fixtures: models are built once per session into a temporary models dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.grpc_env import quiet_grpc_core

# The test process runs servers and clients in-process: gRPC core's raw INFO lines (a
# server's stop, a goaway) would otherwise land in every failure's captured output.
quiet_grpc_core()


def pytest_configure(config: pytest.Config) -> None:
    # One intra-op thread: tiny models gain nothing from two, and on a 2-core
    # machine OpenMP spinning against any other busy process costs ~30x.
    import torch

    torch.set_num_threads(1)
    # Generated gRPC code is built, never committed: bring it up to date before any
    # test module that imports it is collected.
    from services.rpc.codegen import generate

    generate()


@pytest.fixture(scope="session")
def banaserve_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private BANASERVE_HOME for the session (subprocesses get it via the environment)."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def models_dir(banaserve_home: Path) -> Path:
    return banaserve_home / "models"


@pytest.fixture(scope="session")
def tiny_llama(models_dir: Path) -> Path:
    from services.engine.models.prepare import prepare_model

    return prepare_model("tiny-llama", models_dir)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real pretrained model, prepared into the user's models dir (slow tests only)."""
    from services.common.config import models_dir as default_models_dir
    from services.engine.models.prepare import prepare_model

    return prepare_model("smollm2-135m", default_models_dir())
