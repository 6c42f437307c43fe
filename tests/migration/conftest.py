"""Fixtures shared by the migration tests (and the coordinator tests' real Redis, with a key
prefix per test, for the fencing test's coordinator process)."""

from __future__ import annotations

import pytest

from tests.coordinator.conftest import store_prefix  # noqa: F401 - a key prefix per test
from tests.kvstore.conftest import redis_server  # noqa: F401 - the session's Redis
from tests.migration.harness import LoopThread


@pytest.fixture
def loop():
    """An event loop on its own thread, for agents and servers the test drives with ``call``."""
    thread = LoopThread()
    yield thread
    thread.close()
