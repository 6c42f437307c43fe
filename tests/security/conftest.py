"""Certificates for the security tests: one cluster CA and its role certificates, and a second,
foreign CA whose certificates no server may accept. Created once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.rpc.certs import create_certs
from tests.kvstore.conftest import kv_prefix, redis_server  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    create_certs(directory)
    return directory


@pytest.fixture(scope="session")
def foreign_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("foreign-certs")
    create_certs(directory)
    return directory
