"""Fixtures shared by the migration tests."""

from __future__ import annotations

import pytest

from tests.migration.harness import LoopThread


@pytest.fixture
def loop():
    """An event loop on its own thread, for agents and servers the test drives with ``call``."""
    thread = LoopThread()
    yield thread
    thread.close()
